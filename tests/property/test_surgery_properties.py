"""Property tests of the surgery contract: random plans on the zoo, zeroed-then-removed equals masked.

A plan is drawn per example: a few prunable, exact groups of the model, each with an index list that
is empty, one channel, a random list (repeats and any order allowed), all but one channel, or every
channel. Then:

- a plan that leaves a group a kept size that is not a multiple of `Group.multiple_of` is refused
  by `mask_plan` and `apply_plan` with a `SlimcError`;
- otherwise `mask_plan` runs, and `apply_plan` gives outputs equal to the masked model's to float
  rounding. A plan that removes every channel of a group may instead be refused, with a
  `SlimcError` and the model left as it was (a convolution, a norm or a reshape has no zero-width
  form); a plan that keeps a channel of every group must not be refused.

A plan naming an unprunable group or an index outside a group is refused and leaves the model
untouched. PyTorch models come from `benchmarks/zoo_models.py` (every entry), ONNX models from
`benchmarks/onnx_zoo.py` (exported once per session, run in ONNX Runtime).
"""

from __future__ import annotations

import copy
import functools
import inspect
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimc.compiler.analysis.coupling import find_groups
from slimc.compiler.frontends.import_onnx import import_onnx, load_onnx
from slimc.compiler.frontends.import_torch import import_module
from slimc.compiler.groups import Group, channels
from slimc.compiler.surgery import apply_plan, mask_plan
from slimc.errors import SlimcError

import onnx_zoo as OZ  # benchmarks/onnx_zoo.py (benchmarks/ is on pytest's pythonpath)
import zoo_models as Z  # benchmarks/zoo_models.py
from onnx_roundtrip import export_onnx, feeds_for, perturb_parameters_, run_ort

TOL = 1e-5  # relative to max(1, the masked output's largest magnitude)
ONNX_MODELS = ["llama (GQA)", "gpt2 (fused qkv, Split)", "inception-concat", "flatten-cnn"]

PROPERTY = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- plans --------------------------------------------------------------------------------------

KINDS = ("empty", "one", "random", "all_but_one", "all")


@st.composite
def plans(draw, groups: list[Group], max_groups: int = 3) -> dict[Group, list[int]]:
    """A plan over some of `groups`: each group gets one of KINDS of index lists."""
    picked = draw(st.lists(st.integers(0, len(groups) - 1), min_size=1, max_size=min(max_groups, len(groups)), unique=True))
    plan: dict[Group, list[int]] = {}
    for i in picked:
        g = groups[i]
        kind = draw(st.sampled_from(KINDS))
        if kind == "empty":
            idx: list[int] = []
        elif kind == "one":
            idx = [draw(st.integers(0, g.size - 1))]
        elif kind == "random":
            idx = draw(st.lists(st.integers(0, g.size - 1), max_size=g.size))
        elif kind == "all_but_one":
            keep = draw(st.integers(0, g.size - 1))
            idx = [c for c in range(g.size) if c != keep]
        else:
            idx = draw(st.permutations(range(g.size)))
        plan[g] = list(idx)
    return plan


def _breaks_multiple(plan: dict[Group, list[int]]) -> bool:
    for g, idx in plan.items():
        n = len(channels(idx))
        if n and g.multiple_of > 1 and (g.size - n) % g.multiple_of:
            return True
    return False


def _empties_a_group(plan: dict[Group, list[int]]) -> bool:
    return any(len(channels(idx)) == g.size for g, idx in plan.items())


def _close(out: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> tuple[bool, float]:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return False, float("inf")
    finite = np.isfinite(ref)
    scale = max(1.0, float(np.abs(ref[finite]).max()) if finite.any() else 1.0)
    if not np.array_equal(np.isfinite(out), finite):
        return False, float("inf")
    diff = float(np.abs(out[finite] - ref[finite]).max()) if finite.any() else 0.0
    return diff <= TOL * scale, diff


# ---- PyTorch zoo ---------------------------------------------------------------------------------


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    kw = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kw["use_cache"] = False
    with torch.no_grad():
        return Z.main_output(model(**kw)).float()


@functools.lru_cache(maxsize=None)
def _analysed(name: str):
    model, inputs = Z.by_name(name).build()
    groups = find_groups(import_module(model, inputs), model)
    return model, inputs, groups


def _exact_groups(groups: list[Group]) -> list[Group]:
    return [g for g in groups if g.prunable and g.exact]


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def check_torch_plan(name: str, plan: dict[Group, list[int]]) -> None:
    """The contract for one plan on one zoo model (see the module docstring)."""
    base, inputs, _ = _analysed(name)
    model = copy.deepcopy(base)
    if _breaks_multiple(plan):
        with pytest.raises(SlimcError, match="multiple of"):
            mask_plan(model, plan)
        with pytest.raises(SlimcError, match="multiple of"):
            apply_plan(model, plan)
        return
    mask_plan(model, plan)
    ref = _run(model, inputs)
    shapes = _shapes(model)
    try:
        stats = apply_plan(model, plan)
    except SlimcError:
        assert _empties_a_group(plan), "a plan that keeps a channel of every group was refused"
        assert _shapes(model) == shapes, "a refused plan changed the model"
        ok, diff = _close(_run(model, inputs), ref)
        assert ok, f"a refused plan changed the outputs by {diff:.3g}"
        return
    ok, diff = _close(_run(model, inputs), ref)
    assert ok, f"{name}: pruned output differs from the masked one by {diff:.3g}"
    assert stats["params_removed"] == sum(int(np.prod(s)) for s in _param_shapes(base).values()) - sum(
        int(np.prod(s)) for s in _param_shapes(model).values())


def _param_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", [e.name for e in Z.ZOO])
@PROPERTY
@given(data=st.data())
def test_random_plans_keep_the_surgery_contract_on_the_zoo(name, data):
    _, _, groups = _analysed(name)
    exact = _exact_groups(groups)
    assert exact, f"{name} has no prunable exact group"
    check_torch_plan(name, data.draw(plans(exact), label="plan"))


@pytest.mark.parametrize("name", ["resnet-bottleneck", "llama-gqa", "gpt2", "mixtral"])
@settings(PROPERTY, max_examples=10)
@given(data=st.data())
def test_bad_plans_are_refused_and_leave_the_model_untouched(name, data):
    """An unprunable group with indices, or an index outside its group: SlimcError, nothing cut."""
    base, inputs, groups = _analysed(name)
    exact = _exact_groups(groups)
    plan = data.draw(plans(exact), label="plan")
    unprunable = [g for g in groups if not g.prunable]
    bad = data.draw(st.sampled_from(["unprunable", "too_big", "negative"] if unprunable else ["too_big", "negative"]), label="bad")
    if bad == "unprunable":
        g = data.draw(st.sampled_from(unprunable), label="unprunable group")
        plan[g] = [data.draw(st.integers(0, g.size - 1))]
    else:
        g = data.draw(st.sampled_from(exact), label="group")
        wrong = data.draw(st.integers(g.size, 4 * g.size) if bad == "too_big" else st.integers(-4 * g.size, -1))
        plan[g] = list(plan.get(g, [])) + [wrong]
    model = copy.deepcopy(base)
    shapes = _shapes(model)
    ref = _run(model, inputs)
    with pytest.raises(SlimcError):
        mask_plan(model, plan)
    with pytest.raises(SlimcError):
        apply_plan(model, plan)
    assert _shapes(model) == shapes
    assert torch.equal(_run(model, inputs), ref)


# ---- regression tests: examples the properties found ---------------------------------------------


def test_emptied_conv_group_is_refused_before_anything_is_cut():
    """Removing every channel of a conv group left a [0, 3, 3, 3] weight that torch refuses to run."""
    base, inputs, groups = _analysed("resnet-bottleneck")
    g = next(g for g in groups if g.name == "stem.0:channel")
    model = copy.deepcopy(base)
    shapes = _shapes(model)
    with pytest.raises(SlimcError, match="zero width"):
        apply_plan(model, {g: list(range(g.size))})
    assert _shapes(model) == shapes


@pytest.mark.parametrize("name, role", [("opt", "attention.head"), ("gpt2", "attention.head"), ("gpt2", "mlp.neuron"),
                                        ("whisper-encoder", "attention.head")])
def test_emptied_heads_and_conv1d_neurons_are_refused(name, role):
    """Every head (num_heads -> 0: OPT's reshape by it failed) or every GPT-2 Conv1D neuron: SlimcError."""
    base, _, groups = _analysed(name)
    g = next(g for g in groups if g.role == role and g.prunable)
    with pytest.raises(SlimcError, match="keep at least one channel"):
        apply_plan(copy.deepcopy(base), {g: list(range(g.size))})


def test_emptied_linear_mlp_runs_and_equals_the_masked_model():
    """A Llama MLP of nn.Linears may lose every neuron: it then adds nothing, as when masked."""
    check_torch_plan("llama-gqa", {g: list(range(g.size)) for g in _analysed("llama-gqa")[2] if g.role == "mlp.neuron"})


def test_expert_neurons_off_their_multiple_are_refused():
    """Keeping 47 of 48 expert neurons broke grouped_mm's 16-byte strides at run time."""
    base, _, groups = _analysed("mixtral")
    g = next(g for g in groups if g.role == "moe.expert_neuron")
    assert g.multiple_of == 4
    with pytest.raises(SlimcError, match="multiple of 4"):
        apply_plan(copy.deepcopy(base), {g: [0]})
    with pytest.raises(SlimcError, match="zero width"):
        apply_plan(copy.deepcopy(base), {g: list(range(g.size))})
    check_torch_plan("mixtral", {g: [0, 1, 2, 3]})


# ---- ONNX zoo ------------------------------------------------------------------------------------

_TMP = Path(tempfile.mkdtemp(prefix="slimc-property-onnx-"))


@functools.lru_cache(maxsize=None)
def _onnx_analysed(name: str):
    torch.manual_seed(0)
    module, inputs = OZ.ZOO[name]()
    perturb_parameters_(module)
    src = export_onnx(module, inputs, _TMP / f"{len(list(_TMP.iterdir()))}.onnx")
    model = load_onnx(src)
    return src, feeds_for(model, inputs), find_groups(import_onnx(model))


def _initializer_shapes(model) -> dict[str, tuple]:
    return {n: tuple(v.shape) for n, v in model.graph.initializers.items()}


def check_onnx_plan(name: str, plan: dict[Group, list[int]], tmp: Path) -> None:
    src, feeds, _ = _onnx_analysed(name)
    model = load_onnx(src)
    mask_plan(model, plan)
    ref = run_ort(model, feeds, tmp / "masked.onnx")
    shapes = _initializer_shapes(model)
    try:
        apply_plan(model, plan)
    except SlimcError:
        assert _empties_a_group(plan), "a plan that keeps a channel of every group was refused"
        assert _initializer_shapes(model) == shapes, "a refused plan changed the model"
        return
    out = run_ort(model, feeds, tmp / "pruned.onnx")
    for a, b in zip(out, ref):
        ok, diff = _close(a, b)
        assert ok, f"{name}: pruned output differs from the masked one by {diff:.3g}"


@pytest.mark.parametrize("name", ONNX_MODELS)
@settings(PROPERTY, max_examples=5)
@given(data=st.data())
def test_random_plans_keep_the_surgery_contract_on_onnx_models(name, data, tmp_path_factory):
    _, _, groups = _onnx_analysed(name)
    exact = _exact_groups(groups)
    assert exact, f"{name} has no prunable exact group"
    check_onnx_plan(name, data.draw(plans(exact), label="plan"), tmp_path_factory.mktemp("plan"))


def test_onnx_emptied_heads_are_refused_at_the_reshape():
    """Every KV group of a Llama layer: the empty [1, 8, 0] reshape was mapped to a wrong axis and ORT
    refused the file (MatMul: incompatible dimensions)."""
    src, _, groups = _onnx_analysed("llama (GQA)")
    g = next(g for g in groups if g.role == "attention.kv_group")
    model = load_onnx(src)
    shapes = _initializer_shapes(model)
    with pytest.raises(SlimcError, match="Reshape.*cannot be reshaped"):
        apply_plan(model, {g: list(range(g.size))})
    assert _initializer_shapes(model) == shapes


def test_onnx_emptied_mlp_runs_and_equals_the_masked_model(tmp_path):
    src, _, groups = _onnx_analysed("llama (GQA)")
    check_onnx_plan("llama (GQA)", {g: list(range(g.size)) for g in groups if g.role == "mlp.neuron"}, tmp_path)
