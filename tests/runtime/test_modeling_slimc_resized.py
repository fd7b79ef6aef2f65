"""runtime/modeling_slimc_resized.py: the modeling file shipped in resized checkpoints.

It must stand alone (torch + transformers), apply a record to a freshly built stock model (ties kept,
new and removed parameters, attributes), build randomly initialised resized models, and load weights
strictly, returning the stock class.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimc.runtime import modeling_slimc_resized as R

FMT = {"format": R.FORMAT, "version": R.VERSION}


def tiny_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True, **kw)


def meta_llama(cfg: LlamaConfig | None = None) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(cfg or tiny_config())


RECORD = {
    **FMT,
    "shapes": {"model.layers.0.mlp.gate_proj.weight": [40, 32], "model.layers.0.mlp.up_proj.weight": [40, 32],
               "model.layers.0.mlp.down_proj.weight": [32, 40]},
    "new_parameters": {"model.layers.0.self_attn.o_proj.bias": [32]},
    "removed_parameters": [],
    "attributes": {"model.layers.0.mlp.gate_proj": {"out_features": 40}, "model.layers.0.mlp.up_proj": {"out_features": 40},
                   "model.layers.0.mlp.down_proj": {"in_features": 40}},
}


def resized_config(record=RECORD, cfg: LlamaConfig | None = None) -> R.SlimcResizedConfig:
    base = (cfg or tiny_config()).to_dict()
    base["architectures"] = ["LlamaForCausalLM"]
    return R.SlimcResizedConfig(base_config=base, slimc_resize=record)


def test_the_file_depends_on_torch_and_transformers_only():
    tree = ast.parse(open(R.__file__).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file is copied into checkpoints"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "typing", "torch", "transformers"}, roots


def test_resize_applies_shapes_new_and_removed_parameters_and_attributes():
    m = meta_llama()
    touched = R.resize(m, RECORD)
    mlp, attn = m.model.layers[0].mlp, m.model.layers[0].self_attn
    assert mlp.gate_proj.weight.shape == (40, 32) and mlp.down_proj.weight.shape == (32, 40) and mlp.down_proj.in_features == 40
    assert isinstance(attn.o_proj.bias, nn.Parameter) and attn.o_proj.bias.shape == (32,) and attn.o_proj.bias.is_meta
    assert "model.layers.0.self_attn.o_proj.bias" in dict(m.named_parameters())
    assert set(touched) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                            "model.layers.0.self_attn.o_proj"}
    # a removed parameter becomes None (nn.Linear then computes without it)
    with torch.device("meta"):
        biased = LlamaForCausalLM(tiny_config(attention_bias=True))
    R.resize(biased, {**FMT, "removed_parameters": ["model.layers.1.self_attn.q_proj.bias"]})
    assert biased.model.layers[1].self_attn.q_proj.bias is None


def test_resize_keeps_tied_weights_tied_and_tuple_attributes_tuples():
    m = meta_llama()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    R.resize(m, {**FMT, "shapes": {"lm_head.weight": [80, 32]}, "attributes": {"model.embed_tokens": {"num_embeddings": 80}}})
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.lm_head.weight.shape == (80, 32)
    ln = nn.LayerNorm(8)
    holder = nn.Sequential(ln)
    R.resize(holder, {**FMT, "attributes": {"0": {"normalized_shape": [6]}}})
    assert ln.normalized_shape == (6,)


@pytest.mark.parametrize("record, match", [
    ({**FMT, "shapes": {"model.layers.5.mlp.up_proj.weight": [1, 1]}}, "has no module 'model.layers.5.mlp.up_proj'"),
    ({**FMT, "shapes": {"model.layers.0.mlp.up_proj.bias": [1]}}, "resizes 'model.layers.0.mlp.up_proj.bias', which"),
    ({**FMT, "new_parameters": {"model.layers.0.mlp.up_proj.weight": [1, 1]}}, "already has"),
    ({**FMT, "removed_parameters": ["model.layers.0.mlp.up_proj.bias"]}, "removes 'model.layers.0.mlp.up_proj.bias'"),
    ({**FMT, "attributes": {"model.layers.0.mlp": {"heads": 2}}}, "which LlamaMLP does not have"),
    ({**FMT, "attributes": {"model.nowhere": {"x": 2}}}, "attributes of 'model.nowhere'"),
    ({"format": "other"}, "expected format 'slimc-resize'"),
    ({**FMT, "version": R.VERSION + 1}, "is newer than this file reads"),
])
def test_bad_records_are_refused_with_what_is_wrong(record, match):
    with pytest.raises(ValueError, match=match):
        R.resize(meta_llama(), record)


def test_base_config_and_stock_class():
    base = R.base_config({"model_type": "gpt2", "n_layer": 1, "architectures": ["GPT2LMHeadModel"], "auto_map": {"x": "y"}})
    assert type(base).__name__ == "GPT2Config" and base.n_layer == 1
    assert R.stock_class(base).__name__ == "GPT2LMHeadModel"
    base.architectures = ["NotATransformersClass"]  # falls back to the causal LM registered for the config type
    assert R.stock_class(base).__name__ == "GPT2LMHeadModel"
    with pytest.raises(ValueError, match="not known"):
        R.base_config({"model_type": "no-such-model"})
    with pytest.raises(ValueError, match="no 'model_type'"):
        R.base_config({})


def test_from_config_builds_the_stock_class_resized_and_initialised():
    cfg = resized_config()
    model = R.SlimcResizedForCausalLM.from_config(cfg)
    assert type(model) is LlamaForCausalLM
    assert model.model.layers[0].mlp.up_proj.weight.shape == (40, 32)
    bias = model.model.layers[0].self_attn.o_proj.bias
    weight = model.model.layers[0].mlp.up_proj.weight
    assert torch.isfinite(weight).all() and 0 < float(weight.detach().std()) < 0.1  # initialised like the stock init (std 0.02)
    assert torch.equal(bias, torch.zeros(32))
    out = model(input_ids=torch.randint(0, 96, (1, 5))).logits
    assert out.shape == (1, 5, 96) and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="builds no model of its own"):
        R.SlimcResizedForCausalLM(cfg)


def write_checkpoint(out, seed: int = 0) -> LlamaForCausalLM:
    """A resized checkpoint written by hand: weights from a resized random model, config with the record."""
    torch.manual_seed(seed)
    model = R.SlimcResizedForCausalLM.from_config(resized_config()).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias.normal_()
    model.save_pretrained(str(out))
    cfg = resized_config().to_dict()
    cfg["auto_map"] = {"AutoConfig": "modeling_slimc_resized.SlimcResizedConfig",
                       "AutoModelForCausalLM": "modeling_slimc_resized.SlimcResizedForCausalLM"}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "modeling_slimc_resized.py").write_text(open(R.__file__).read())
    return model


def test_from_pretrained_returns_the_stock_model_with_the_weights(tmp_path):
    ref = write_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 96, (2, 6))
    for got in (R.SlimcResizedForCausalLM.from_pretrained(tmp_path / "ckpt"),
                AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)):
        assert type(got) is LlamaForCausalLM and not got.training
        assert got.lm_head.weight is got.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(got(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_save_pretrained_of_a_loaded_model_writes_the_same_weights(tmp_path):
    """The returned model is the stock class: save_pretrained writes its (resized) tensors, which load
    again under the resized config."""
    write_checkpoint(tmp_path / "a")
    model = R.SlimcResizedForCausalLM.from_pretrained(tmp_path / "a")
    model.save_pretrained(str(tmp_path / "b"))
    again = R.SlimcResizedForCausalLM.from_pretrained(tmp_path / "b", config=R.SlimcResizedConfig.from_pretrained(tmp_path / "a"))
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_loading_is_strict(tmp_path):
    write_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    extra = dict(cfg, slimc_resize={**RECORD, "new_parameters": {**RECORD["new_parameters"], "model.layers.1.mlp.down_proj.bias": [32]}})
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(extra))
    with pytest.raises(ValueError, match="the checkpoint lacks model.layers.1.mlp.down_proj.bias"):
        R.SlimcResizedForCausalLM.from_pretrained(tmp_path / "ckpt")
    fewer = dict(cfg, slimc_resize={**RECORD, "new_parameters": {}})
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(fewer))
    with pytest.raises(ValueError, match="has no model.layers.0.self_attn.o_proj.bias"):
        R.SlimcResizedForCausalLM.from_pretrained(tmp_path / "ckpt")
    wrong = dict(cfg, slimc_resize={**RECORD, "shapes": {**RECORD["shapes"], "model.layers.0.mlp.up_proj.weight": [48, 32]}})
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight is \[40, 32\] in the checkpoint, \[48, 32\]"):
        R.SlimcResizedForCausalLM.from_pretrained(tmp_path / "ckpt")
