"""The LLM recogniser: KV-group and MLP-neuron units, exact removal, sizes read after surgery."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from slimc.compiler.analysis import llm
from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.calibration.layerwise import DecoderStream
from slimc.compiler.groups import Role
from slimc.compiler.surgery import apply_plan, mask_plan
from slimc.errors import SlimcError

import zoo_models as Z  # noqa: E402  (benchmarks/ is on pytest's pythonpath)


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


# ---- units from the IR, layer by layer (decoder_layer_groups) ------------------------------------


def _example(module):
    def make():
        s = DecoderStream.capture(module, torch.arange(5)[None] % Z.VOCAB, 1)
        return s.hidden[0], s.kwargs[0]

    return make


def _zoo(name):
    return Z.by_name(name).build()[0]


def test_ir_groups_per_layer_match_the_whole_model_analysis():
    from slimc.compiler.analysis.coupling import model_groups
    from slimc.compiler.model import Model

    m = _zoo("qwen2-moe")
    per_layer = llm.decoder_layer_groups(m, _example(m))
    whole = {g.name: g for g in model_groups(Model(module=m, config=m.config)) if g.prunable and g.exact}
    for lg in per_layer:
        for g in lg.attention + lg.mlp:
            ref = whole[g.name]
            assert (g.size, g.role, g.layer) == (ref.size, ref.role, ref.layer)
            assert {(s.param, s.axis, tuple(s.index.reshape(-1).tolist())) for s in g.slices} == \
                   {(s.param, s.axis, tuple(s.index.reshape(-1).tolist())) for s in ref.slices}
    assert [g.role for g in per_layer[1].mlp] == [Role.EXPERT_NEURON, Role.MLP_NEURON]


def test_output_projection_reads_the_input_axis_from_the_module_type():
    gpt2, llama = _zoo("gpt2"), _zoo("llama-gqa")
    first = llm.decoder_layer_groups(gpt2, _example(gpt2))[0]
    (a2, m2) = first.attention + first.mlp
    p = llm.output_projection(m2, gpt2)
    assert (p.module, p.in_axis, p.observable) == ("transformer.h.0.mlp.c_proj", 0, True)  # Conv1D [in, out]
    assert llm.output_projection(a2, gpt2).index.shape == (4, 8)
    lg = llm.decoder_layer_groups(llama, _example(llama), use_names=False)[0]
    p = llm.output_projection(lg.attention[0], llama)
    assert (p.module, p.param, p.in_axis) == ("model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.o_proj.weight", 1)
    mix = _zoo("mixtral")
    (experts,) = llm.decoder_layer_groups(mix, _example(mix))[0].mlp
    p = llm.output_projection(experts, mix)
    assert (p.param, p.in_axis, p.observable) == ("model.layers.0.mlp.experts.down_proj", 2, False)


def test_attention_shapes_count_real_kv_heads():
    for name, want in (("gemma-mqa", (4, 1)), ("llama-gqa", (4, 2)), ("llama-gqa-eager", (4, 2)), ("gpt2", (4, 4))):
        m = _zoo(name)
        path, layers = llm.find_layer_list(m)
        graph, _ = llm.export_layer(path, 0, layers[0], *_example(m)())
        (shape,) = llm.attention_shapes(graph)
        assert (shape.query_heads, shape.kv_heads, shape.head_dim) == (*want, 8), name


def test_fused_qkv_of_phi3_is_left_whole_with_the_reason():
    m = _zoo("phi3-gqa")
    lg = llm.decoder_layer_groups(m, _example(m))[0]
    assert not lg.attention and [g.role for g in lg.mlp] == [Role.MLP_NEURON]
    assert "slice at offsets fixed by the code" in lg.reason("attn")
    assert {s.param for s in lg.mlp[0].slices} == {"model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_layer_signature_and_retarget():
    m = _zoo("gpt-neox")
    path, layers = llm.find_layer_list(m)
    assert llm.layer_signature(layers[0]) == llm.layer_signature(layers[1])
    lg = llm.analyse_layer(path, 0, layers[0], *_example(m)())
    moved = llm.retarget(lg, path, 1)
    assert moved.prefix == "gpt_neox.layers.1" and moved.attention[0].name == "gpt_neox.layers.1.attention:head"
    assert all(s.param.startswith("gpt_neox.layers.1.") for g in moved.attention + moved.mlp for s in g.slices)
    assert all(a.module.startswith("gpt_neox.layers.1.") for g in moved.attention for a in g.attrs)
    with torch.no_grad():
        layers[1].mlp.dense_h_to_4h.weight.data = layers[1].mlp.dense_h_to_4h.weight.data[:40]
    assert llm.layer_signature(layers[0]) != llm.layer_signature(layers[1])


def test_mqa_has_no_kv_group_unit_and_says_so():
    m = _zoo("gemma-mqa")
    lg, lg1 = llm.decoder_layer_groups(m, _example(m))
    assert not lg.attention and (lg.query_heads, lg.kv_heads) == (4, 1)
    kv = [w for w in lg.whole if w.role == Role.KV_GROUP]
    assert kv and kv[0].size == 1 and "single KV head" in kv[0].reason
    # layer 1 shares layer 0's export: its reasons name its own modules
    assert "model.layers.1.self_attn" in lg1.reason("attn") and "layers.0" not in lg1.reason("attn")
