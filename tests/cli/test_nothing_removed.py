"""`compress run` with a pruning recipe on networks outside the zoo: a CSP-style network of in-place
LeakyReLUs is pruned, and a recipe that removes nothing says so (console, report.json, report.md),
with the reason the analysis gives."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

import slimc.compiler.frontends.import_torch as import_torch
from slimc.cli.app import app, dispatch

from onnx_roundtrip import export_onnx, perturb_parameters_


def compress(*args) -> object:
    """Run the CLI in-process, exactly as `compress ARGS` dispatches it."""
    return CliRunner().invoke(app, dispatch([str(a) for a in args]), catch_exceptions=False)


def _cbl(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1, inplace=True))


class CSP(nn.Module):
    """A cross-stage-partial block: two 1x1 splits, a residual bottleneck on one, concat, fuse."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = _cbl(3, 2 * c, 3)
        self.split1, self.split2 = _cbl(2 * c, c), _cbl(2 * c, c)
        self.block = nn.Sequential(_cbl(c, c), _cbl(c, c, 3))
        self.fuse = _cbl(2 * c, 2 * c)
        self.head = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        a, b = self.split1(y), self.split2(y)
        b = b + self.block(b)
        return self.head(self.fuse(torch.cat([a, b], 1)))


def _csp_pt2(path):
    net = perturb_parameters_(CSP()).eval()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), path)
    return sum(p.numel() for p in net.parameters())


def test_csp_network_of_inplace_leaky_relus_is_pruned(tmp_path):
    """Regression: aten.leaky_relu_ had no lowering, so no group was prunable and nothing was removed."""
    before = _csp_pt2(tmp_path / "csp.pt2")
    out = tmp_path / "out"
    r = compress("run", tmp_path / "csp.pt2", "--recipe", "group-magnitude-25", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    (p,) = report["passes"]
    assert p["modified"] and p["stats"]["groups_pruned"] >= 5 and "nothing_removed" not in p["stats"]
    assert report["output"]["parameters"] < 0.8 * before
    assert report["notes"] == [] and "note:" not in r.stdout
    assert report["verification"]["pt2"]["ok"]


def test_a_recipe_that_removes_nothing_says_why(tmp_path, monkeypatch):
    """With an op the importer cannot lower, every group is blocked: the console, report.json and
    report.md say that nothing was removed and name the op."""
    _csp_pt2(tmp_path / "csp.pt2")
    monkeypatch.delitem(import_torch._LOWERINGS, "leaky_relu_")  # as before the lowering existed
    out = tmp_path / "out"
    r = compress("run", tmp_path / "csp.pt2", "--recipe", "group-magnitude-25", "-o", out)
    assert r.exit_code == 0, r.output
    lines = [ln.strip() for ln in r.stdout.splitlines() if "note:" in ln]
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith("note: the recipe removed nothing (no prunable group")
    assert "aten.leaky_relu_.default" in lines[0] and "without a dimension rule" in lines[0]
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] == [lines[0].removeprefix("note: ")]
    assert report["passes"][0]["stats"]["channels_removed"] == 0
    assert report["output"]["parameters"] == report["input"]["parameters"]
    md = (out / "report.md").read_text()
    assert f"**Note:** {report['notes'][0]}." in md
    assert md.index("**Note:**") < md.index("## Timings")


def test_onnx_model_without_hidden_channels_says_so(tmp_path):
    """A single layer has no channel between two layers: the reason says the model's ends block it."""
    net = perturb_parameters_(nn.Linear(6, 3)).eval()
    export_onnx(net, (torch.randn(2, 6),), tmp_path / "one.onnx")
    r = compress("run", tmp_path / "one.onnx", "--recipe", "group-magnitude-25", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "note: the recipe removed nothing (no prunable group: all" in r.stdout
    assert "model's inputs and outputs" in r.stdout


def test_recipes_that_change_nothing_by_design_get_no_note(tmp_path):
    net = perturb_parameters_(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))).eval()
    export_onnx(net, (torch.randn(2, 6),), tmp_path / "mlp.onnx")
    r = compress("run", tmp_path / "mlp.onnx", "--recipe", "identity", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "note:" not in r.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["notes"] == []
