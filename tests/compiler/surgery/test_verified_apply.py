"""apply_plan on a slimc Model checks the pruned module runs and equals the masked one, refusing the groups that break it.

The analysis sees the widths a graph shows; a module that keeps a width in a plain attribute
(`self.inner = heads * hd`) cannot be updated by any surgery. Such groups must be left whole with
the reason, the rest pruned, and the pass must return a model that runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimc.compiler.analysis.coupling import model_groups
from slimc.compiler.model import Model
from slimc.compiler.surgery import apply_plan, mask_plan


class StaleWidthAttention(nn.Module):
    """Attention that stores its inner width at construction, as many research codebases do."""

    def __init__(self, dim: int = 16, heads: int = 4, hd: int = 8):
        super().__init__()
        self.num_heads, self.hd, self.inner = heads, hd, heads * hd
        self.qkv = nn.Linear(dim, 3 * heads * hd)
        self.proj = nn.Linear(self.inner, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.hd] * 3, dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.hd**0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, N, self.inner))


class Block(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.attn = StaleWidthAttention(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 24), nn.Linear(24, dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


def model() -> Model:
    torch.manual_seed(0)
    return Model(module=Block().eval(), example_inputs={"x": torch.randn(1, 5, 16)})


def test_groups_whose_removal_breaks_the_module_are_refused_and_the_rest_pruned():
    m = model()
    groups = [g for g in model_groups(m) if g.prunable and g.exact and g.size >= 2]
    assert groups, "the analysis offers groups on this block"
    plan = {g: [0] for g in groups}
    masked = m.clone()
    mask_plan(masked, plan)
    with pytest.warns(UserWarning, match="left whole because removing their channels breaks the model"):
        stats = apply_plan(m, plan)
    refused = {r["group"] for r in stats["groups_refused"]}
    assert refused, "a head group of the stale-width attention must be refused"
    assert any("invalid for input of size" in r["reason"] or "shape" in r["reason"] for r in stats["groups_refused"])
    assert stats["params_removed"] > 0  # the MLP neuron group is still pruned
    # the returned model runs and equals the masked model on the groups that were cut
    kept = {g: v for g, v in plan.items() if g.name not in refused}
    expected = model()
    mask_plan(expected, kept)
    x = m.example_inputs["x"]
    with torch.no_grad():
        assert torch.allclose(m.module(x), expected.module(x), atol=1e-5)


def test_without_verify_the_stale_width_breaks_the_module():
    """The failure the check prevents is real: cut unchecked, the module no longer runs."""
    m = model()
    groups = [g for g in model_groups(m) if g.prunable and g.exact and g.size >= 2 and "qkv" in " ".join(s.param for s in g.slices)]
    assert groups
    apply_plan(m, {groups[0]: [0]}, verify=False)
    with pytest.raises(RuntimeError):
        m.module(m.example_inputs["x"])


def test_a_plan_that_holds_is_applied_without_refusals():
    m = model()
    groups = [g for g in model_groups(m) if g.prunable and g.exact and "fc1" in " ".join(s.param for s in g.slices)]
    stats = apply_plan(m, {groups[0]: [1, 3]})
    assert "groups_refused" not in stats and m.module.fc1.out_features == 22


def test_group_magnitude_returns_a_model_that_runs_and_reports_the_refusal():
    import slimc

    m = model()
    with pytest.warns(UserWarning, match="left whole"):
        out = slimc.compress(m, "group-magnitude-25", overrides=["group-magnitude.roles=null"])
    x = out.example_inputs["x"]
    with torch.no_grad():
        assert out.module(x).shape == (1, 5, 16)  # it runs
    stats = out.history[-1].stats
    assert stats.get("groups_refused") and stats["params_removed"] > 0
