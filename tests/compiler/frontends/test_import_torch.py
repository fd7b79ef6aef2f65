"""PyTorch importer: torch.export -> canonical IR, parameter names, module paths, HF models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimc.compiler.frontends.import_torch import import_module
from slimc.errors import SlimcError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


def test_cnn_lowers_to_canonical_ops_with_module_paths_and_param_names():
    g = import_module(Block().eval(), {"x": torch.randn(1, 3, 5, 5)})
    g.verify()
    ops = [n.op for n in g.nodes]
    assert ops == ["conv", "norm", "unary", "reduce", "linear"]
    conv, bn = g.nodes[:2]
    assert conv.module == "conv" and conv.source_op == "aten.conv2d.default"
    assert conv.inputs[1].param == "conv.weight" and conv.inputs[2].param == "conv.bias"
    assert bn.attrs["kind"] == "batch" and [v.param for v in bn.inputs[1:]] == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    assert g.nodes[3].attrs == {"fn": "mean", "axes": [2, 3], "keepdim": False}
    assert set(g.params) >= {"conv.weight", "fc.weight", "bn.running_var"}
    assert g.inputs[0].shape == (1, 3, 5, 5) and g.outputs[0].shape == (1, 2)


def test_unknown_ops_become_opaque_with_their_source_op():
    class M(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    g = import_module(M(), {"x": torch.randn(4)})
    opaque = [n for n in g.nodes if n.op == "opaque"]
    assert opaque and "fft" in opaque[0].source_op


def test_export_failure_is_a_slimc_error_with_advice():
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    with pytest.raises(SlimcError, match="example inputs"):
        import_module(Bad(), {"x": torch.randn(3)}, strict=True)


def _llama(**kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_hf_model_with_kwargs_modeloutput_and_tied_embeddings():
    model = _llama(tie_word_embeddings=True)
    g = import_module(model, {"input_ids": torch.randint(0, 32, (1, 4))})  # use_cache=False added
    g.verify()
    names = {n for n, _ in model.named_parameters()}
    assert set(g.params) - {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} <= names
    # the tie is one value: the embedding and lm_head read the same parameter
    emb = next(n for n in g.nodes if n.op == "embedding")
    head = [n for n in g.nodes if n.op == "linear" and n.module == "lm_head"][0]
    assert emb.inputs[0] is head.inputs[1] and emb.inputs[0].param == "model.embed_tokens.weight"
    assert len(g.outputs) == 1 and g.outputs[0].shape == (1, 4, 32)
    sdpa = [n for n in g.nodes if n.op == "sdpa"]
    assert len(sdpa) == 1 and sdpa[0].module == "model.layers.0.self_attn"
    # the rotary embedding runs under no_grad (a higher-order op): inlined, not opaque
    assert not any(n.op == "opaque" and "rotary" in n.module for n in g.nodes)


def test_a_training_mode_model_is_traced_in_eval_mode_and_left_as_it_was():
    m = Block().train()
    g = import_module(m, {"x": torch.randn(2, 3, 5, 5)})
    assert next(n for n in g.nodes if n.source_op.startswith("aten.") and "norm" in n.source_op).op == "norm"
    assert m.training and m.bn.training
