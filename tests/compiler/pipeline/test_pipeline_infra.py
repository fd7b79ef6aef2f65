"""Pass base class, manager history, failure naming, order and needs checks, instruments, and the registry."""

import math

import pytest
import torch
from pydantic import Field
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import (
    NEEDS_CALIBRATION,
    NEEDS_DECODER_LM,
    PASSES,
    Pass,
    PassConfig,
    PassContext,
    PassManager,
    PassResult,
    get_pass,
    register_pass,
    unregister_pass,
)
from slimc.compiler.pipeline.recipes import Recipe
from slimc.errors import PipelineError, PostconditionError, SlimcError


@pytest.fixture
def registry():
    """Passes registered by a test are removed afterwards: the global registry is left as it was."""
    before = dict(PASSES)
    yield register_pass
    for name in set(PASSES) - set(before):
        unregister_pass(name)
    assert PASSES == before


class _Count(Pass):
    name = "_test_count"

    class Config(PassConfig):
        step: int = Field(1, ge=1)

    def call(self, model, ctx):
        model.example_inputs = {"n": (model.example_inputs or {"n": 0})["n"] + self.config.step}
        return PassResult(model, True, {"n": model.example_inputs["n"]})


class _Boom(Pass):
    name = "_test_boom"

    def call(self, model, ctx):
        raise RuntimeError("kaput")


class _Checked(Pass):
    name = "_test_checked"

    def call(self, model, ctx):
        return PassResult(model, False)

    def ensures(self, model, ctx):
        raise PostconditionError("postcondition broken")


def test_history_and_stats():
    m = PassManager([_Count(), _Count(step=2)]).run(Model())
    assert [(r.name, r.modified, r.stats["n"]) for r in m.history] == [("_test_count", True, 1), ("_test_count", True, 3)]


def test_failure_names_the_pass_and_those_before():
    with pytest.raises(PipelineError) as e:
        PassManager([_Count(), _Boom()]).run(Model())
    assert e.value.failed == "_test_boom" and e.value.before == ["_test_count"]
    assert "kaput" in str(e.value) and "_test_count" in str(e.value)


def test_postconditions_run_only_when_verifying():
    with pytest.raises(PostconditionError):
        _Checked()(Model(), PassContext(verify=True))
    assert _Checked()(Model(), PassContext(verify=False)).modified is False


def test_registry_refuses_duplicates(registry):
    registry(_Count)
    registry(_Count)  # the same class again is harmless
    assert get_pass("_test_count") is _Count

    class Other(_Count):
        pass

    with pytest.raises(ValueError, match="already registered"):
        registry(Other)


def test_registry_refuses_an_unknown_stage(registry):
    class Odd(_Count):
        name = "_test_odd"
        stage = "sideways"

    with pytest.raises(ValueError, match="stage"):
        registry(Odd)


class _Stage(_Count):
    def call(self, model, ctx):
        return PassResult(model, False)


class _Structure(_Stage):
    name, stage = "_test_structure", "structure"


class _Sparsity(_Stage):
    name, stage = "_test_sparsity", "sparsity"


class _Quantize(_Stage):
    name, stage = "_test_quantize", "quantize"


def test_order_is_checked_before_any_pass_runs():
    ran = []

    class Probe(_Count):
        name = "_test_probe"

        def call(self, model, ctx):
            ran.append(1)
            return PassResult(model, False)

    PassManager([_Structure(), Probe(), _Sparsity(), _Quantize()]).run(Model())  # in order; stage-less anywhere
    assert ran == [1]
    for bad in ([Probe(), _Sparsity(), _Structure()], [_Quantize(), _Sparsity()], [_Quantize(), _Structure()]):
        with pytest.raises(SlimcError, match="cannot run after"):
            PassManager(bad).run(Model())
    assert ran == [1]


def test_recipes_check_the_order_when_built(registry):
    for cls in (_Structure, _Quantize):
        registry(cls)
    with pytest.raises(SlimcError, match="recipe 'r'.*'_test_structure' \\(structure\\) cannot run after '_test_quantize'"):
        Recipe("r", passes=[("_test_quantize", {}), ("_test_structure", {})]).build()


class _NeedsLM(_Stage):
    name = "_test_needs_lm"

    def needs(self):
        return frozenset({NEEDS_DECODER_LM, NEEDS_CALIBRATION})


def tiny_lm() -> Model:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    return Model(module=m, config=m.config)


def test_needs_are_checked_for_every_pass_before_the_first_runs():
    from slimc.compiler.calibration.sources import open_source

    ran = []

    class First(_Count):
        name = "_test_first"

        def call(self, model, ctx):
            ran.append(1)
            return PassResult(model, False)

    cnn = Model(module=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    with pytest.raises(SlimcError, match="'_test_needs_lm' needs a decoder language model .*; Sequential is not one"):
        PassManager([First(), _NeedsLM()]).run(cnn)
    lm = tiny_lm()  # a decoder LM, but no tokenizer for text calibration
    with pytest.raises(SlimcError, match="needs the model's tokenizer"):
        PassManager([First(), _NeedsLM()]).run(lm, PassContext(calibration=open_source("pydoc")))
    assert ran == []
    PassManager([First(), _NeedsLM()]).run(lm, PassContext(calibration=torch.zeros(2, 8, dtype=torch.long)))  # ids: fine
    assert ran == [1]


def test_manager_places_the_model_on_the_context_dtype():
    lm = tiny_lm()
    PassManager([]).run(lm, PassContext(dtype=torch.bfloat16))
    assert {p.dtype for p in lm.module.parameters()} == {torch.bfloat16}
    rotary = [b for n, b in lm.module.named_buffers() if n.endswith("inv_freq")]
    assert rotary and all(b.dtype == torch.float32 for b in rotary)  # as transformers loads a bf16 checkpoint


class _Scale(_Stage):
    name = "_test_scale"

    class Config(PassConfig):
        factor: float = 2.0

    def call(self, model, ctx):
        with torch.no_grad():
            model.module.lm_head.weight.mul_(self.config.factor)
        return PassResult(model, True)


def test_check_passes_records_the_drift_after_each_pass():
    lm = tiny_lm()
    with torch.no_grad():
        before = lm.module(input_ids=lm.probe_ids(), use_cache=False).logits.double()
    out = PassManager([_Scale(factor=1.0), _Scale(factor=2.0)]).run(lm, PassContext(check_passes=True))
    first, second = (r.checks["probe"] for r in out.history)
    assert first == {"finite": True, "max_abs_drift_from_previous": 0.0, "max_abs_drift_from_input": 0.0}
    expected = float(before.abs().max())  # logits doubled: they moved by their own size
    assert second["finite"] and math.isclose(second["max_abs_drift_from_previous"], expected, rel_tol=1e-5)
    assert second["max_abs_drift_from_input"] == second["max_abs_drift_from_previous"]
    assert all(not r.checks for r in PassManager([_Scale()]).run(tiny_lm()).history)  # off by default


def test_check_passes_stops_at_non_finite_outputs():
    with pytest.raises(PipelineError, match="_test_scale.*not finite"):
        PassManager([_Scale(factor=float("nan"))]).run(tiny_lm(), PassContext(check_passes=True))
