"""The LLM recogniser: KV-group and MLP-neuron units, exact removal, sizes read after surgery."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.groups import Role
from slimc.compiler.surgery import apply_plan, mask_plan
from slimc.errors import SlimcError


def _llama(kv=2, heads=6, tie=True, cls=LlamaForCausalLM, cfg_cls=LlamaConfig, **kw):
    cfg = cfg_cls(vocab_size=101, hidden_size=96, intermediate_size=80, num_hidden_layers=3, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=16, tie_word_embeddings=tie, **kw)
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kv,heads", [(2, 6), (6, 6), (1, 6)])
def test_units_and_costs(kv, heads):
    m = _llama(kv, heads)
    views = decoder_layers(m)
    assert len(views) == 3
    v = views[1]
    G = heads // kv
    assert (v.num_kv_heads, v.group_size, v.head_dim, v.intermediate_size) == (kv, G, 16, 80)
    assert v.kv_group.role == (Role.KV_GROUP if G > 1 else Role.HEAD) and v.kv_group.layer == 1
    shapes = {k: t.shape for k, t in m.named_parameters()}
    # a KV group: q and o carry G*d_h rows/cols of hidden, k and v d_h rows each
    assert v.kv_group.numel_per_channel(shapes) == (2 * G + 2) * 16 * 96
    assert v.mlp_neuron.numel_per_channel(shapes) == 3 * 96


def test_mask_then_remove_is_exact_with_biases():
    m = _llama(2, 6, tie=False, cls=Qwen2ForCausalLM, cfg_cls=Qwen2Config)  # Qwen2: q/k/v biases
    views = decoder_layers(m)
    plan = {views[0].kv_group: [0], views[2].kv_group: [1], views[1].mlp_neuron: list(range(0, 80, 3))}
    ids = torch.randint(0, 101, (2, 9))
    mask_plan(m, plan)
    with torch.no_grad():
        y0 = m(ids).logits
    apply_plan(m, plan)
    with torch.no_grad():
        y1 = m(ids).logits
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-5)
    after = decoder_layers(m)
    assert [v.num_kv_heads for v in after] == [1, 2, 1]
    assert [v.intermediate_size for v in after] == [80, 80 - 27, 80]


def test_not_an_llm():
    with pytest.raises(SlimcError, match="decoder LLM"):
        decoder_layers(torch.nn.Linear(3, 3))
