"""The surgery contract on every architecture of the zoo (benchmarks/zoo_models.py).

For each model: import it with torch.export, find its groups, pick random prunable groups and
random channels, zero them (`mask_plan`), record the output, remove them (`apply_plan`), and
require the same output (fp32, max abs diff < 1e-5 of the output scale) and exactly the expected
number of parameters gone. Then the pruned model is exported to ONNX (dynamo) and run in ONNX
Runtime. Refusals are tested too: MoE models do not export to ONNX (grouped_mm), and groups the
analysis cannot remove exactly carry a reason.
"""

from __future__ import annotations

import copy
import functools
import inspect
import random
import zlib

import pytest
import torch

from slimc.compiler.analysis.coupling import find_groups
from slimc.compiler.frontends.import_torch import import_module
from slimc.compiler.groups import Group, Role
from slimc.compiler.surgery.torch_module import apply_plan, mask_plan

import zoo_models as Z  # noqa: E402  (benchmarks/ is on pytest's pythonpath)

ZOO = Z.ZOO
TOL = 1e-5  # relative to the output's max magnitude
ORT_TOL = 1e-4


def _kwargs(model: torch.nn.Module, inputs: dict) -> dict:
    kw = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kw["use_cache"] = False
    return kw


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return Z.main_output(model(**_kwargs(model, inputs))).float()


def _param_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _expected_removed(model: torch.nn.Module, plan: dict[Group, list[int]]) -> int:
    """Parameters that removing the plan must drop, from shapes alone (overlaps counted once)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    removed: dict[int, dict[int, set]] = {}
    for g, chans in plan.items():
        for s in g.slices:
            if s.param in named:
                t = named[s.param]
                removed.setdefault(id(t), {}).setdefault(s.axis % t.dim(), set()).update(s.rows(chans).tolist())
    total = 0
    for name, p in model.named_parameters():
        axes = removed.get(id(p))
        if not axes:
            continue
        new = list(p.shape)
        for a, idx in axes.items():
            new[a] -= len(idx)
        total += p.numel() - int(torch.tensor(new).prod())
    return total


def _random_plan(groups: list[Group], rng: random.Random, max_groups: int = 6) -> dict[Group, list[int]]:
    by_role: dict[str, list[Group]] = {}
    for g in groups:
        by_role.setdefault(g.role, []).append(g)
    chosen = [rng.choice(gs) for _, gs in sorted(by_role.items())]
    rest = [g for g in groups if g not in chosen]
    rng.shuffle(rest)
    chosen += rest[: max(0, max_groups - len(chosen))]
    return {g: sorted(rng.sample(range(g.size), _how_many(g, rng))) for g in chosen}


def _how_many(g: Group, rng: random.Random) -> int:
    """1 .. size-1 channels, keeping the size a multiple of `g.multiple_of`."""
    k = g.multiple_of
    options = [n for n in range(1, g.size) if (g.size - n) % k == 0]
    return rng.choice(options)


@functools.lru_cache(maxsize=None)
def _analysed(name: str):
    entry = Z.by_name(name)
    model, inputs = entry.build()
    graph = import_module(model, inputs)
    graph.verify()
    return model, inputs, find_groups(graph, model)


@functools.lru_cache(maxsize=None)
def _pruned(name: str):
    """Mask, record, remove: (pruned model, inputs, masked reference output, stats, expected, plan)."""
    model, inputs, groups = _analysed(name)
    model = copy.deepcopy(model)
    exact = [g for g in groups if g.prunable and g.exact and g.size > g.multiple_of]
    plan = _random_plan(exact, random.Random(zlib.crc32(name.encode())))  # stable across runs
    expected = _expected_removed(model, plan)
    mask_plan(model, plan)
    ref = _run(model, inputs)
    stats = apply_plan(model, plan)
    return model, inputs, ref, stats, expected, plan


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_zoo_groups_have_the_expected_roles(entry):
    _, _, groups = _analysed(entry.name)
    for role in entry.expect_roles:
        assert any(g.role == role and g.prunable for g in groups), f"no prunable {role} group in {entry.name}"
    for g in groups:
        assert g.prunable or g.reason, f"{g.name} is unprunable without a reason"
        assert not g.exact or not g.inexact_reason


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_zoo_masked_then_removed_is_exact(entry):
    model, inputs, ref, stats, expected, plan = _pruned(entry.name)
    assert plan, f"no exact prunable group in {entry.name}"
    out = _run(model, inputs)
    assert out.shape == ref.shape
    scale = max(1.0, float(ref.abs().max()))
    diff = float((out - ref).abs().max())
    assert diff < TOL * scale, f"{entry.name}: pruned output differs by {diff:.3g} (scale {scale:.3g})"
    assert stats["params_removed"] == expected > 0


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_zoo_numel_per_channel_matches_surgery(entry):
    """Each group alone: params dropped == numel_per_channel * n (parameters only, not buffers)."""
    model, inputs, groups = _analysed(entry.name)
    shapes = _param_shapes(model)
    rng = random.Random(7)
    exact = [g for g in groups if g.prunable and g.exact and g.size > g.multiple_of]
    for g in rng.sample(exact, min(3, len(exact))):
        n = _how_many(g, rng)
        only_params = Group(g.name, g.size, [s for s in g.slices if s.param in shapes])
        m = copy.deepcopy(model)
        stats = apply_plan(m, {g: rng.sample(range(g.size), n)})
        assert stats["params_removed"] == only_params.numel_per_channel(shapes) * n
        _run(m, inputs)  # still runs


@pytest.mark.parametrize("entry", [e for e in ZOO if e.onnx_refusal is None], ids=lambda e: e.name)
def test_zoo_pruned_model_runs_in_onnxruntime(entry, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, inputs, ref, *_ = _pruned(entry.name)
    kw = _kwargs(model, inputs)
    program = torch.onnx.export(model, (), kwargs=kw, dynamo=True, verbose=False)
    path = tmp_path / f"{entry.name}.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    names = [i.name for i in sess.get_inputs()]
    feed = {n: tensors[n].numpy() for n in names} if set(names) <= set(tensors) else dict(zip(names, (t.numpy() for t in tensors.values())))
    got = torch.from_numpy(sess.run(None, feed)[0]).float()
    want = _run(model, inputs)
    scale = max(1.0, float(want.abs().max()))
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < ORT_TOL * scale
    assert float((want - ref).abs().max()) < TOL * scale


@pytest.mark.parametrize("entry", [e for e in ZOO if e.onnx_refusal is not None], ids=lambda e: e.name)
def test_zoo_moe_onnx_export_is_a_documented_refusal(entry):
    """torch.onnx (dynamo) has no translation for transformers' grouped_mm_fallback: it must fail."""
    model, inputs, _ = _analysed(entry.name)
    assert "grouped_mm" in entry.onnx_refusal
    with pytest.raises(Exception, match="(?i)grouped_mm|translat|unsupported|dispatch"):
        torch.onnx.export(model, (), kwargs=_kwargs(model, inputs), dynamo=True, verbose=False)


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_moe_experts_are_prunable_but_not_exact(name):
    """Removing an expert changes the routing softmax (not exact) but leaves a consistent model."""
    model, inputs, groups = _analysed(name)
    experts = [g for g in groups if g.role == Role.EXPERT]
    assert experts and all(g.prunable and not g.exact and "softmax" in g.inexact_reason for g in experts)
    g = experts[0]
    params = g.params()
    assert any(p.endswith("gate.weight") for p in params) and any("gate_up_proj" in p for p in params)
    assert {a.attr for a in g.attrs} == {"num_experts"}
    m = copy.deepcopy(model)
    apply_plan(m, {g: [1]})
    experts_mod = m.get_submodule(g.attrs[0].module)
    assert experts_mod.num_experts == g.size - 1
    out = _run(m, inputs)
    assert torch.isfinite(out).all() and out.shape == _run(model, inputs).shape


def test_phi3_fused_qkv_heads_are_a_documented_refusal():
    """Phi-3 slices its fused qkv_proj at offsets computed from the config: heads stay whole."""
    _, _, groups = _analysed("phi3-gqa")
    heads = [g for g in groups if g.role in (Role.KV_GROUP, Role.HEAD)]
    assert heads and all(not g.prunable and "slice" in g.reason for g in heads)
    mlp = [g for g in groups if g.role == Role.MLP_NEURON]
    assert mlp and all(g.prunable for g in mlp)
    # the fused gate_up_proj: neuron j owns gate row j and up row j + width
    s = next(s for s in mlp[0].slices if s.param.endswith("gate_up_proj.weight"))
    assert s.index[3].tolist() == [3, 3 + mlp[0].size]


def test_llm_hidden_width_is_unprunable_with_a_reason():
    _, _, groups = _analysed("llama-gqa")
    hidden = [g for g in groups if g.role == Role.HIDDEN]
    assert len(hidden) == 1 and not hidden[0].prunable and "norm" in hidden[0].reason or "mean" in hidden[0].reason
    # it spans the (tied) embedding, every projection's input and every norm
    params = hidden[0].params()
    assert "model.embed_tokens.weight" in params and "model.norm.weight" in params
    assert sum(p.endswith("q_proj.weight") for p in params) == 2


@pytest.mark.parametrize("name, expected", [
    ("gpt2", {("num_heads", 1), ("split_size", 8)}),
    ("bert", {("num_attention_heads", 1), ("all_head_size", 8)}),
    ("vit", {("num_attention_heads", 1)}),
    ("whisper-encoder", {("num_heads", 1)}),
])
def test_head_groups_carry_the_attributes_that_count_heads(name, expected):
    model, inputs, groups = _analysed(name)
    heads = [g for g in groups if g.role == Role.HEAD and g.prunable]
    assert heads
    for g in heads:
        assert expected <= {(a.attr, a.per_channel) for a in g.attrs}
    g = heads[0]
    m = copy.deepcopy(model)
    before = {a.attr: getattr(m.get_submodule(a.module), a.attr) for a in g.attrs}
    apply_plan(m, {g: [0, 2]})
    for a in g.attrs:
        assert getattr(m.get_submodule(a.module), a.attr) == before[a.attr] - 2 * a.per_channel
    _run(m, inputs)
