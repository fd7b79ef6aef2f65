"""The LLM structured-pruning family on every decoder family: units from the IR, the passes run,
removal is exact, the pruned checkpoint reloads.

Families: every causal LM of the zoo (benchmarks/zoo_models.py) plus Falcon (GQA with the new
decoder architecture, and Falcon-7B's multi-query parallel block), GPT-J, StarCoder2, GPT-BigCode
(multi-query) and Phi (phi-1/2: parallel attention + MLP, partial rotary), built tiny from their
transformers configs. For each, FLAP, llm-prune (wanda-sp + lsq), NIRVANA and magnitude run on
random [8, 16] token ids: the achieved sparsity is within one unit of the target, the plan without
compensation zeroed then cut gives the same logits, and `slimc.save` (format hf, reloaded and
compared) succeeds. `FAMILIES` is the table: what the analysis offers per family, and why the rest
is left whole.
"""

from __future__ import annotations

import math

import pytest
import torch

from slimc.compiler.emit.save import save
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext
from slimc.compiler.surgery import mask_plan
from slimc.passes.flap import Flap
from slimc.passes.llm_prune import LlmPrune
from slimc.passes.magnitude import Magnitude
from slimc.passes.nirvana import Nirvana
from slimc.passes.structured.units import ATTN, MLP, decoder_units

import zoo_models as Z  # noqa: E402  (benchmarks/ is on pytest's pythonpath)

SPARSITY = 0.3

EXTRA = {
    "falcon-gqa": Z.extra_causal_lm("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=True, num_kv_heads=2),
    "falcon-mqa": Z.extra_causal_lm("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "gptj": Z.extra_causal_lm("GPTJConfig", n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "starcoder2": Z.extra_causal_lm("Starcoder2Config", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64),
    "gpt-bigcode-mqa": Z.extra_causal_lm("GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "phi": Z.extra_causal_lm("PhiConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             partial_rotary_factor=0.5, max_position_embeddings=64),
}

# family -> (attention unit role or the reason attention is left whole, MLP unit roles, source of the units)
MQA = "a single KV head (multi-query attention) is never removed"
FAMILIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "llama-gqa": ("attention.kv_group", ("mlp.neuron",), "names"),
    "llama-mha": ("attention.head", ("mlp.neuron",), "names"),
    "llama-gqa-eager": ("attention.kv_group", ("mlp.neuron",), "names"),
    "mistral-gqa": ("attention.kv_group", ("mlp.neuron",), "names"),
    "mistral-mha": ("attention.head", ("mlp.neuron",), "names"),
    "qwen2-mha": ("attention.head", ("mlp.neuron",), "names"),
    "qwen2-gqa": ("attention.kv_group", ("mlp.neuron",), "names"),
    "qwen3-gqa": ("attention.kv_group", ("mlp.neuron",), "names"),
    "qwen3-mha": ("attention.head", ("mlp.neuron",), "names"),
    "gemma-mqa": (MQA, ("mlp.neuron",), "ir"),
    "gemma-gqa": ("attention.kv_group", ("mlp.neuron",), "names"),
    "phi3-gqa": ("slice at offsets fixed by the code", ("mlp.neuron",), "ir"),  # fused qkv_proj sliced at config offsets
    "phi3-mha": ("slice at offsets fixed by the code", ("mlp.neuron",), "ir"),
    "gpt2": ("attention.head", ("mlp.neuron",), "ir"),  # Conv1D: input axis 0
    "gpt-neox": ("attention.head", ("mlp.neuron",), "ir"),  # per-head interleaved fused qkv
    "opt": ("attention.head", ("mlp.neuron",), "ir"),
    "mixtral": ("attention.kv_group", ("moe.expert_neuron",), "ir"),
    "qwen2-moe": ("attention.kv_group", ("moe.expert_neuron", "mlp.neuron"), "ir"),  # experts + shared expert
    "falcon-gqa": ("broadcast_to.default", ("mlp.neuron",), "ir"),  # an op without a dimension rule
    "falcon-mqa": (MQA, ("mlp.neuron",), "ir"),
    "gptj": ("attention.head", ("mlp.neuron",), "ir"),
    "starcoder2": ("attention.kv_group", ("mlp.neuron",), "ir"),
    "gpt-bigcode-mqa": (MQA, ("mlp.neuron",), "ir"),
    "phi": ("attention.head", ("mlp.neuron",), "ir"),
}


def test_the_table_covers_every_causal_lm_of_the_zoo():
    zoo = {e.name for e in Z.ZOO if e.build.__qualname__.startswith("_causal_lm.")}
    assert zoo <= set(FAMILIES) and set(EXTRA) <= set(FAMILIES)


def build(name: str) -> Model:
    m = EXTRA[name]() if name in EXTRA else Z.by_name(name).build()[0]
    return Model(module=m, config=m.config)


def calib() -> torch.Tensor:
    return torch.randint(0, Z.VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: Model) -> torch.Tensor:
    ids = torch.randint(0, Z.VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    return model.module(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_units_found(name):
    attn_want, mlp_want, source = FAMILIES[name]
    model = build(name)
    layers = decoder_units(model)
    assert len(layers) == len(layers.groups) == 2 and {lg.source for lg in layers.groups} == {source}
    for units in layers:
        attn = [u for u in units if u.kind == ATTN]
        mlp = [u for u in units if u.kind == MLP]
        assert tuple(u.group.role for u in mlp) == mlp_want
        if attn_want.startswith("attention."):
            assert [u.group.role for u in attn] == [attn_want]
        else:
            assert not attn
            whole = [w["reason"] for w in layers.whole if w["layer"] == units[0].layer and w["part"] == ATTN]
            assert any(attn_want in r for r in whole), whole
        for u in units:
            assert u.cost > 0 and u.size >= 2 and u.group.exact and u.group.prunable
            assert u.out_index.shape[0] == u.size
            if u.observable:  # the output projection is a linear; its weight's input axis holds out_index
                w = dict(model.module.named_parameters())[u.out_param]
                assert u.out_index.numel() == w.shape[u.in_axis]
    if name == "gpt2":  # transformers' Conv1D stores [in, out]
        assert {u.in_axis for units in layers for u in units} == {0}
    if name in ("mixtral", "qwen2-moe"):  # 3-D expert tensors: no linear's input carries their neurons
        assert {u.observable for units in layers for u in units if u.group.role == "moe.expert_neuron"} == {False}


def passes(name: str):
    """(the pass with its compensation, the same choice without compensation)."""
    if name == "flap":
        return Flap(sparsity=SPARSITY), Flap(sparsity=SPARSITY, bias_compensation=False)
    if name == "llm-prune":
        return (LlmPrune(sparsity=SPARSITY, criterion="wanda-sp", compensation="lsq"),
                LlmPrune(sparsity=SPARSITY, criterion="wanda-sp", compensation="none"))
    if name == "nirvana":
        return Nirvana(sparsity=SPARSITY, samples=4), Nirvana(sparsity=SPARSITY, samples=4)
    return Magnitude(sparsity=SPARSITY), Magnitude(sparsity=SPARSITY)


def tolerance(p, units) -> float:
    """How far from the target (in parameters) the achieved removal may be: one unit of each pool
    the method allocates from (one pool for FLAP's AL-AM and the global allocator, two for NIRVANA),
    plus what rounding widths adds (NIRVANA rounds each MLP width up to 8 neurons; expert neurons
    stay multiples of grouped_mm's alignment)."""
    flat = [u for us in units for u in us]
    mlp = [u for u in flat if u.kind == MLP]
    if isinstance(p, Nirvana):
        one_unit = max((u.cost for u in flat if u.kind == ATTN), default=0) + max(u.cost for u in mlp)
    else:
        one_unit = max(u.cost for u in flat)
    rounding = sum((math.lcm(p.config.round_neurons_to, u.group.multiple_of) - 1) * u.cost for u in mlp)
    return one_unit + rounding


@pytest.mark.parametrize("method", ["flap", "llm-prune", "nirvana", "magnitude"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pass_runs_exactly_and_the_checkpoint_reloads(family, method, tmp_path):
    dense = build(family)
    tokens = calib()
    ctx = PassContext(calibration=tokens)
    real, plain = passes(method)

    # without compensation: zeroing the plan, then cutting, gives the same logits
    masked, cut = dense.clone(), dense.clone()
    if method == "magnitude":
        plan, _ = plain.plan(masked)
        for group, removed in plan.items():  # every MLP set loses floor(p * width), kept width rounded to its multiple
            assert -1e-6 < SPARSITY * group.size - len(removed) < group.multiple_of, (group, len(removed))
    else:
        plan = plain.plan(masked, tokens).plan
    mask_plan(masked, plan)
    res = plain(cut, ctx)
    assert res.modified
    torch.testing.assert_close(logits(cut), logits(masked), rtol=0, atol=1e-5)

    # with the method's compensation: the target is met and the checkpoint reloads (save verifies it)
    model = dense.clone()
    res = real(model, ctx)
    st = res.stats
    attention_whole = not FAMILIES[family][0].startswith("attention.")
    if method != "magnitude":
        achieved = st["params_removed"] / st["prunable_params"]
        assert st["sparsity"] == pytest.approx(achieved)
        assert abs(st["params_removed"] - SPARSITY * st["prunable_params"]) <= tolerance(real, real.usable_units(dense)[0]), st
        if attention_whole:
            assert any(w["part"] == ATTN for w in st["left_whole"]) and st["kv_groups_pruned"] == 0
    report = save(model, tmp_path / "out")
    assert report["verification"]["hf"]["ok"]
