"""Units of every decoder family: the IR and the Llama name path agree, refusals are clear,
Conv1D projections are compensated along their input axis, MoE experts are handled per method."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.analysis import llm
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext
from slimc.errors import SlimcError
from slimc.passes.flap import Flap
from slimc.passes.llm_prune import LlmPrune
from slimc.passes.nirvana import Nirvana
from slimc.passes.structured.units import ATTN, MLP, decoder_units, out_weight

import zoo_models as Z  # noqa: E402  (benchmarks/ is on pytest's pythonpath)

NAMED = ["llama-gqa", "llama-mha", "llama-gqa-eager", "mistral-gqa", "qwen2-gqa", "qwen3-gqa", "gemma-gqa"]


def zoo(name: str) -> Model:
    m = Z.by_name(name).build()[0]
    return Model(module=m, config=m.config)


def extra(config_cls_name: str, **kw) -> Model:
    import transformers

    cfg = getattr(transformers, config_cls_name)(vocab_size=Z.VOCAB, **kw)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return Model(module=m, config=m.config)


def falcon_gqa() -> Model:
    return extra("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2)


def calib(n: int = 8, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, Z.VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _key(units):
    return [(u.kind, u.group.name, u.group.role, u.size, u.cost, u.out_proj, u.in_axis, u.observable,
             sorted((s.param, s.axis, tuple(s.index.reshape(-1).tolist())) for s in u.group.slices))
            for us in units for u in us]


@pytest.mark.parametrize("name", NAMED)
def test_names_and_ir_give_identical_units(name):
    model = zoo(name)
    by_names, by_ir = decoder_units(model), decoder_units(model, use_names=False)
    assert {lg.source for lg in by_names.groups} == {"names"} and {lg.source for lg in by_ir.groups} == {"ir"}
    assert _key(by_names) == _key(by_ir)


def test_the_name_path_needs_an_unambiguous_layout():
    mqa = zoo("gemma-mqa")  # one KV head: the names would offer it; the IR does not
    assert {lg.source for lg in decoder_units(mqa).groups} == {"ir"}
    model = zoo("llama-gqa")
    attn = model.module.model.layers[0].self_attn
    attn.sinks = nn.Parameter(torch.zeros(4))  # a per-head tensor the names do not know
    assert llm._plain_view(model.config, "model.layers", 0, model.module.model.layers[0]) is None
    assert llm._plain_view(model.config, "model.layers", 1, model.module.model.layers[1]) is not None


def test_one_export_per_layer_signature(monkeypatch):
    calls = []
    real = llm.analyse_layer
    monkeypatch.setattr(llm, "analyse_layer", lambda path, i, *a: calls.append(i) or real(path, i, *a))
    model = extra("GPT2Config", n_embd=32, n_layer=4, n_head=4, n_positions=32)
    first = decoder_units(model)
    assert calls == [0] and [lg.index for lg in first.groups] == [0, 1, 2, 3]
    assert [u.group.name for us in first for u in us][2:4] == ["transformer.h.1.attn:head", "transformer.h.1.mlp:neuron"]
    assert first[3][0].group.slices[0].param == "transformer.h.3.attn.c_attn.weight"
    # after pruning layer 2 alone, it has its own signature: one more export
    from slimc.compiler.surgery import apply_plan

    apply_plan(model, {first[2][1].group: [0, 5, 9]})
    calls.clear()
    again = decoder_units(model)
    assert calls == [0, 2] and again[2][1].size == 125 and again[3][1].size == 128


def test_a_layer_without_any_mappable_unit_is_refused():
    model = falcon_gqa()  # attention: broadcast_to has no dimension rule

    class Flip(nn.Module):  # an activation whose op has no rule either
        def forward(self, x):
            return torch.flip(x, [-1])

    model.module.transformer.h[1].mlp.act = Flip()
    with pytest.raises(SlimcError, match=r"layer 1 \(transformer\.h\.1\).*attention: .*broadcast_to.*MLP: .*flip"):
        decoder_units(model)
    with pytest.raises(SlimcError, match="layer 1"):
        Flap(sparsity=0.2)(model, PassContext(calibration=calib()))
    assert len(decoder_units(model, strict=False)[1]) == 0


def test_layers_sharing_parameters_are_refused():
    model = zoo("llama-gqa")
    layers = model.module.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    with pytest.raises(SlimcError, match="share a parameter"):
        decoder_units(model)


def test_only_the_mappable_part_is_pruned_and_the_stats_say_why():
    model = falcon_gqa()
    res = Flap(sparsity=0.3)(model, PassContext(calibration=calib()))
    whole = res.stats["left_whole"]
    assert {w["part"] for w in whole} == {ATTN} and all("broadcast_to" in w["reason"] for w in whole)
    assert res.stats["kv_groups_pruned"] == 0 and res.stats["neurons_pruned"] > 0
    assert all(layer["kv_groups"] is None for layer in res.stats["layers"])


@torch.no_grad()
def _mean_output(model: Model, path: str, tokens: torch.Tensor) -> torch.Tensor:
    seen = []
    h = model.module.get_submodule(path).register_forward_hook(lambda mod, a, o: seen.append(o.reshape(-1, o.shape[-1])))
    model.module(input_ids=tokens, use_cache=False)
    h.remove()
    return torch.cat(seen).double().mean(0)


@pytest.mark.parametrize("compensation", ["mean", "lsq"])
def test_conv1d_projections_are_compensated_along_their_input_axis(compensation):
    """GPT-2's c_proj weights are [in, out]: layer 0 still sees dense inputs, so its mean output holds."""
    dense = extra("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32)
    tokens = calib(16)
    pruned = dense.clone()
    Flap(sparsity=0.4, structure="UL-UM", compensation=compensation)(pruned, PassContext(calibration=tokens))
    for path in ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"):  # input axis 0 lost entries
        assert pruned.module.get_submodule(path).weight.shape[0] < dense.module.get_submodule(path).weight.shape[0]
    path = "transformer.h.0.attn.c_proj"  # (layer 0's MLP reads the pruned attention's output: not the dense inputs)
    torch.testing.assert_close(_mean_output(pruned, path, tokens), _mean_output(dense, path, tokens), rtol=1e-4, atol=1e-5)


def test_conv1d_lsq_reconstructs_better_than_the_mean_bias():
    dense = extra("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32)
    tokens = calib(32)
    path = "transformer.h.0.mlp.c_proj"
    err = {}
    for mode in ("none", "mean", "lsq"):
        m = dense.clone()
        LlmPrune(sparsity=0.4, criterion="wanda-sp", allocator="uniform", compensation=mode)(m, PassContext(calibration=tokens))
        outs = []
        for model in (dense, m):
            got = []
            h = model.module.get_submodule(path).register_forward_hook(lambda mod, a, o: got.append(o))
            with torch.no_grad():
                model.module(input_ids=tokens, use_cache=False)
            h.remove()
            outs.append(torch.cat(got))
        err[mode] = float(((outs[1] - outs[0]) ** 2).mean())
    assert err["lsq"] < err["mean"] < err["none"], err


@pytest.mark.parametrize("family", ["gpt2", "falcon-gqa", "qwen2-moe"])
def test_sequential_lsq_on_conv1d_on_layers_without_attention_units_and_on_moe(family):
    model = falcon_gqa() if family == "falcon-gqa" else (
        extra("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32) if family == "gpt2" else zoo(family))
    dense = model.clone()
    res = Flap(sparsity=0.3, compensation="lsq-seq")(model, PassContext(calibration=calib()))
    assert res.stats["params_removed"] > 0
    ids = calib(2, 9, seed=3)
    with torch.no_grad():
        assert torch.isfinite(model.module(input_ids=ids).logits).all()
        assert model.num_parameters() < dense.num_parameters()
    if family == "qwen2-moe":  # experts need input statistics FLAP cannot take: left whole, the shared expert pruned
        assert any("experts" in w["name"] for w in res.stats["left_whole"])


def test_moe_expert_neurons_are_pruned_by_saliency_in_grouped_mm_multiples():
    model = zoo("mixtral")
    units = decoder_units(model)
    experts = [u for us in units for u in us if u.group.role == "moe.expert_neuron"]
    assert experts and all(not u.observable and u.group.multiple_of == 4 for u in experts)
    res = LlmPrune(sparsity=0.3, criterion="saliency", allocator="global", compensation="none")(model, PassContext(calibration=calib()))
    assert res.stats["neurons_pruned"] > 0 and "left_whole" not in res.stats
    for us in decoder_units(model):
        for u in us:
            if u.group.role == "moe.expert_neuron":
                assert u.size % 4 == 0 and u.size < 48
    from slimc.passes.cfsp import Cfsp

    # CFSP removes MLP neurons only and scores them by input statistics: Mixtral offers it none
    with pytest.raises(SlimcError, match="no decoder layer has units this method can remove"):
        Cfsp(sparsity=0.2)(zoo("mixtral"), PassContext(calibration=calib()))


def test_nirvana_prunes_mqa_models_mlp_only_and_says_why():
    model = extra("GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=4, n_positions=64)
    res = Nirvana(sparsity=0.3, samples=4)(model, PassContext(calibration=calib()))
    reasons = [w["reason"] for w in res.stats["left_whole"] if w["part"] == ATTN]
    assert any("single KV head" in r for r in reasons) and res.stats["kv_groups_pruned"] == 0


def test_out_weight_is_out_by_in_for_linear_and_conv1d():
    gpt2 = extra("GPT2Config", n_embd=32, n_layer=1, n_head=4, n_positions=32)
    (attn, mlp), = decoder_units(gpt2)
    tensors = dict(gpt2.module.named_parameters())
    assert out_weight(mlp, tensors).shape == (32, 128) and out_weight(attn, tensors).shape == (32, 32)
    assert out_weight(mlp, tensors).data_ptr() == tensors["transformer.h.0.mlp.c_proj.weight"].data_ptr()  # a view
    llama = zoo("llama-gqa")
    (attn, mlp), *_ = decoder_units(llama)
    assert out_weight(mlp, dict(llama.module.named_parameters())).shape == (32, 48)


def test_inspect_lists_the_same_units_and_shows_mqa_single_kv_head_as_not_prunable():
    from slimc.cli.app import llm_summary

    info = llm_summary(zoo("gemma-mqa"))
    assert info["per_layer"][0] == {"layer": 0, "query_heads": 4, "kv_heads": 1, "group_size": 4, "mlp_neurons": 48}
    kv = [g for g in info["groups"] if g["role"] == "attention.kv_group" and g["layer"] == 0]
    assert kv and kv[0]["size"] == 1 and not kv[0]["prunable"] and "single KV head" in kv[0]["reason"]
    assert [g["name"] for g in info["groups"] if g["prunable"]] == [
        f"model.layers.{i}.mlp:neuron" for i in range(2)]
    gpt2 = llm_summary(extra("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32))
    assert {(g["role"], g["prunable"]) for g in gpt2["groups"]} == {("attention.head", True), ("mlp.neuron", True)}
    assert gpt2["per_layer"][1]["query_heads"] == 4 and gpt2["flops_per_token"] > 0


def test_llama_units_cost_and_projection():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = Model(module=LlamaForCausalLM(cfg).eval(), config=cfg)
    (attn, mlp), = decoder_units(model)
    assert (attn.kind, mlp.kind) == (ATTN, MLP)
    assert attn.cost == (2 * 2 + 2) * 8 * 32 and mlp.cost == 3 * 32
    assert attn.out_proj == "model.layers.0.self_attn.o_proj" and attn.out_index.shape == (2, 16) and attn.in_axis == 1
