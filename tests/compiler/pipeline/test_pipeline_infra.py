"""Pass base class, manager history, failure naming, and the registry's refusal of duplicates."""

import pytest
from pydantic import Field

from slimc.errors import PipelineError
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import Pass, PassConfig, PassContext, PassManager, PassResult, register_pass


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
        raise AssertionError("postcondition broken")


def test_history_and_stats():
    m = PassManager([_Count(), _Count(step=2)]).run(Model())
    assert [(r.name, r.modified, r.stats["n"]) for r in m.history] == [("_test_count", True, 1), ("_test_count", True, 3)]


def test_failure_names_the_pass_and_those_before():
    with pytest.raises(PipelineError) as e:
        PassManager([_Count(), _Boom()]).run(Model())
    assert e.value.failed == "_test_boom" and e.value.before == ["_test_count"]
    assert "kaput" in str(e.value) and "_test_count" in str(e.value)


def test_postconditions_run_only_when_verifying():
    with pytest.raises(AssertionError):
        _Checked()(Model(), PassContext(verify=True))
    assert _Checked()(Model(), PassContext(verify=False)).modified is False


def test_registry_refuses_duplicates():
    register_pass(_Count)
    register_pass(_Count)  # the same class again is harmless

    class Other(_Count):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_pass(Other)
