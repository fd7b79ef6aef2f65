"""Dimension rules for ops found outside the zoo: empty concat slices, in-place and SELU-family
activations, PReLU, instance norm and recurrent layers (LSTM / GRU / RNN).

Each network is imported with torch.export, grouped, and held to the surgery contract of
`tests/compiler/surgery/test_surgery_zoo.py`: zero a plan's channels, record the output, remove
them, and require the same output and exactly the expected parameters gone; the pruned module is
then exported to ONNX and must match PyTorch in ONNX Runtime. The ONNX importer is checked on
the same networks: it must find the same prunable groups.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from slimc.compiler.analysis.channel_atoms import Atom, make, positions, unify
from slimc.compiler.analysis.coupling import find_groups, prunable_groups, why_nothing_prunable
from slimc.compiler.frontends.import_onnx import import_onnx, load_onnx
from slimc.compiler.frontends.import_torch import import_module
from slimc.compiler.groups import Group
from slimc.compiler.surgery.torch_module import apply_plan, mask_plan

from onnx_roundtrip import onnx_roundtrip_case, perturb_parameters_

TOL = 1e-5  # relative to the output's max magnitude, as the zoo tests
ORT_TOL = 1e-4


def _groups(module: nn.Module, x: torch.Tensor) -> list[Group]:
    module.eval()
    return find_groups(import_module(module, None, (x,)), module)


def _expected_removed(model: nn.Module, plan: dict[Group, list[int]]) -> int:
    """Parameters the plan must drop, from shapes alone (a tensor cut along two axes counted once)."""
    named = dict(model.named_parameters())
    cut: dict[str, dict[int, set]] = {}
    for g, chans in plan.items():
        for s in g.slices:
            if s.param in named:
                cut.setdefault(s.param, {}).setdefault(s.axis, set()).update(s.rows(chans).tolist())
    total = 0
    for name, axes in cut.items():
        shape = list(named[name].shape)
        for axis, idx in axes.items():
            shape[axis] -= len(idx)
        total += named[name].numel() - int(torch.tensor(shape).prod())
    return total


def _check_exact(model: nn.Module, x: torch.Tensor, plan: dict[Group, list[int]]) -> nn.Module:
    """Mask, record, remove: the outputs agree and exactly the planned parameters are gone."""
    pruned = copy.deepcopy(model).eval()
    expected = _expected_removed(pruned, plan)
    mask_plan(pruned, plan)
    with torch.no_grad():
        ref = pruned(x)
    stats = apply_plan(pruned, plan)
    with torch.no_grad():
        out = pruned(x)
    scale = max(1.0, float(ref.abs().max()))
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < TOL * scale
    assert stats["params_removed"] == expected > 0
    return pruned


def _check_onnx_matches(pruned: nn.Module, x: torch.Tensor, tmp_path) -> None:
    """The pruned module exports to ONNX and ONNX Runtime gives PyTorch's output."""
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "pruned.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(pruned, (x,), dynamo=True, verbose=False).save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = pruned(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < ORT_TOL * max(1.0, float(want.abs().max()))


def _plan(g: Group, n: int = 2) -> dict[Group, list[int]]:
    return {g: list(range(1, 1 + n))}


def _key(g: Group) -> frozenset:
    return frozenset((s.param, s.axis, tuple(map(tuple, s.index.tolist()))) for s in g.slices)


# --- a concat with an empty slice -------------------------------------------------------------

class EmptySliceCat(nn.Module):
    """The reproduction as reported: shapes written as constants (reshape(-1, 3, 4), reshape(-1, 12))."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        t = self.fc(x).reshape(-1, 3, 4)
        return self.out(torch.cat([t[:, :0], t], 1).reshape(-1, 12))


class EmptySliceCatFollowingShapes(nn.Module):
    """The same graph with reshapes that follow the input's width, so its 3-block group can shrink."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        t = self.fc(x)
        t = t.reshape(t.shape[0], -1, 4)
        return self.out(torch.cat([t[:, :0], t], 1).flatten(1))


def test_empty_parts_take_no_place_in_a_sum():
    empty, full, inner = Atom(0), Atom(3), Atom(4)
    assert make("sum", [empty, full]) is full
    axis = Atom(12)
    assert unify(axis, make("prod", [make("sum", [empty, full]), inner]))
    sizes = sorted(leaf.size for leaf, _ in positions(axis).values())
    assert sizes == [3, 4]


def test_concat_with_an_empty_slice_is_analysed_not_crashed():
    """Regression: channel_atoms.positions raised RuntimeError (reshape of 0 elements) on this graph."""
    x = torch.randn(2, 5)
    groups = _groups(EmptySliceCat(), x)
    by_size = {g.size: g for g in groups if any(s.param == "fc.weight" and s.axis == 0 for s in g.slices)}
    assert set(by_size) == {3, 4}
    three = by_size[3]
    assert {(s.param, s.axis) for s in three.slices} == {("fc.weight", 0), ("fc.bias", 0), ("out.weight", 1)}
    assert three.slices[0].index.shape == (3, 4)  # block b owns fc rows 4b .. 4b+3
    assert not by_size[4].prunable and "inner factor" in by_size[4].reason
    assert all(g.prunable or g.reason for g in groups)


def test_concat_with_an_empty_slice_groups_are_exact(tmp_path):
    torch.manual_seed(0)
    model = EmptySliceCatFollowingShapes().eval()
    x = torch.randn(2, 5)
    groups = prunable_groups(_groups(model, x))
    assert [g.size for g in groups] == [3]
    pruned = _check_exact(model, x, {groups[0]: [1]})
    assert pruned.fc.out_features == 8 and pruned.out.in_features == 8
    _check_onnx_matches(pruned, x, tmp_path)


# --- activations ------------------------------------------------------------------------------

class ConvAct(nn.Module):
    def __init__(self, act: nn.Module, c: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.act = act
        self.c2 = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


ACTIVATIONS = {
    "leaky_relu_": lambda: nn.LeakyReLU(0.1, inplace=True),
    "elu_": lambda: nn.ELU(inplace=True),
    "mish_": lambda: nn.Mish(inplace=True),
    "selu": lambda: nn.SELU(),
    "selu_": lambda: nn.SELU(inplace=True),
    "celu": lambda: nn.CELU(0.7),
    "celu_": lambda: nn.CELU(inplace=True),
    "prelu1": lambda: nn.PReLU(),  # one shared slope: couples nothing
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_let_conv_channels_through(name, tmp_path):
    torch.manual_seed(0)
    model = ConvAct(ACTIVATIONS[name]()).eval()
    x = torch.randn(2, 3, 6, 6)
    groups = prunable_groups(_groups(model, x))
    assert len(groups) == 1, [g.reason for g in _groups(model, x)]
    (g,) = groups
    assert g.params() == ["c1.bias", "c1.weight", "c2.weight"] and g.size == 8
    pruned = _check_exact(model, x, _plan(g))
    _check_onnx_matches(pruned, x, tmp_path)


def test_per_channel_prelu_slopes_shrink_with_their_channels(tmp_path):
    torch.manual_seed(0)
    model = perturb_parameters_(ConvAct(nn.PReLU(8))).eval()
    x = torch.randn(2, 3, 6, 6)
    (g,) = prunable_groups(_groups(model, x))
    assert g.params() == ["act.weight", "c1.bias", "c1.weight", "c2.weight"]
    assert [(a.module, a.attr, a.per_channel) for a in g.attrs] == [("act", "num_parameters", 1)]
    pruned = _check_exact(model, x, _plan(g, 3))
    assert pruned.act.num_parameters == 5 and pruned.act.weight.shape == (5,)
    _check_onnx_matches(pruned, x, tmp_path)


def test_prelu_on_features_of_a_linear_uses_axis_one():
    """PyTorch's PReLU slopes follow axis 1, not the last axis: a [B, C] linear output couples."""
    model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 4)
    (g,) = prunable_groups(_groups(model, x))
    assert g.params() == ["0.bias", "0.weight", "1.weight", "2.weight"]
    _check_exact(perturb_parameters_(model), x, _plan(g))


# --- instance norm ----------------------------------------------------------------------------

INSTANCE_NORMS = {
    "plain": dict(),
    "affine": dict(affine=True),
    "tracked": dict(affine=True, track_running_stats=True),
    "tracked-no-affine": dict(track_running_stats=True),
}


@pytest.mark.parametrize("kind", sorted(INSTANCE_NORMS))
def test_instance_norm_channels_are_prunable(kind, tmp_path):
    torch.manual_seed(0)
    model = perturb_parameters_(ConvAct(nn.InstanceNorm2d(8, **INSTANCE_NORMS[kind]))).eval()
    x = torch.randn(2, 3, 6, 6)
    (g,) = prunable_groups(_groups(model, x))
    norm = nn.InstanceNorm2d(8, **INSTANCE_NORMS[kind])
    own = sorted(f"act.{n}" for n, _ in [*norm.named_parameters(), *norm.named_buffers()] if n != "num_batches_tracked")
    assert g.params() == sorted(["c1.bias", "c1.weight", "c2.weight", *own])
    # without tensors to re-derive it from, surgery updates num_features through the group
    assert [a.attr for a in g.attrs] == ([] if own else ["num_features"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # InstanceNorm warns when num_features disagrees with its input
        pruned = _check_exact(model, x, _plan(g))
    assert pruned.act.num_features == 6
    _check_onnx_matches(pruned, x, tmp_path)


def test_instance_norm_statistics_block_the_axes_they_reduce():
    """InstanceNorm1d over [B, C, L] with L the features of a linear: L must stay whole."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.norm = nn.InstanceNorm1d(3, affine=True)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.norm(self.fc(x)))

    groups = _groups(Net(), torch.randn(2, 3, 4))
    (fc_rows,) = [g for g in groups if ("fc.weight", 0) in {(s.param, s.axis) for s in g.slices}]
    assert not fc_rows.prunable and "instance norm statistics" in fc_rows.reason
    # the channel axis (3) is blocked by the model input, not by the norm
    (chan,) = [g for g in groups if "norm.weight" in g.params()]
    assert "instance norm" not in chan.reason


# --- recurrent layers -------------------------------------------------------------------------

class Recurrent(nn.Module):
    """pre -> relu -> proj -> RNN -> head: proj's outputs are the RNN's input features."""

    def __init__(self, cls=nn.LSTM, hidden: int = 5, **kw):
        super().__init__()
        self.pre = nn.Linear(4, 8)
        self.proj = nn.Linear(8, 6)
        self.rnn = cls(6, hidden, **kw)
        self.head = nn.Linear(hidden * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(self.proj(torch.relu(self.pre(x))))
        return self.head(y)


RECURRENT = {
    "lstm": (nn.LSTM, dict(batch_first=True)),
    "lstm-2-layers-bidirectional": (nn.LSTM, dict(num_layers=2, bidirectional=True)),
    "gru": (nn.GRU, dict(batch_first=True)),
    "rnn": (nn.RNN, dict()),
}


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_recurrent_input_features_couple_to_their_producer(name, tmp_path):
    cls, kw = RECURRENT[name]
    torch.manual_seed(0)
    model = perturb_parameters_(Recurrent(cls, **kw)).eval()
    x = torch.randn(2, 7, 4)
    groups = _groups(model, x)
    prunable = {g.size: g for g in prunable_groups(groups)}
    assert set(prunable) == {8, 6}  # pre's hidden units are untouched by the RNN
    feats = prunable[6]
    first = ["rnn.weight_ih_l0"] + (["rnn.weight_ih_l0_reverse"] if kw.get("bidirectional") else [])
    assert {(s.param, s.axis) for s in feats.slices} == {("proj.weight", 0), ("proj.bias", 0), *((p, 1) for p in first)}
    assert [(a.module, a.attr) for a in feats.attrs] == [("rnn", "input_size")]
    head_in = next(g for g in groups if ("head.weight", 1) in {(s.param, s.axis) for s in g.slices})
    assert not head_in.prunable and "hidden size is kept whole" in head_in.reason
    assert all(not g.prunable for g in groups if any(s.param.startswith("rnn.weight_hh") for s in g.slices))
    pruned = _check_exact(model, x, {feats: [0, 4], prunable[8]: [2]})
    assert pruned.rnn.input_size == 4
    _check_onnx_matches(pruned, x, tmp_path)


def test_unbatched_lstm_input_is_analysed():
    model = perturb_parameters_(Recurrent(nn.LSTM)).eval()
    x = torch.randn(7, 4)
    feats = next(g for g in prunable_groups(_groups(model, x)) if g.size == 6)
    _check_exact(model, x, _plan(feats))


def test_onnx_lstm_couples_its_input_weights_but_keeps_them_whole(tmp_path):
    """The ONNX LSTM's W [dirs, 4H, I] joins its producer's group; until the ONNX surgery can cut
    it, that group is refused with the reason, and everything else is analysed as in PyTorch."""
    from onnx_roundtrip import export_onnx

    model = perturb_parameters_(Recurrent(nn.LSTM, batch_first=True)).eval()
    x = torch.randn(2, 7, 4)
    graph = import_onnx(load_onnx(export_onnx(model, (x,), tmp_path / "lstm.onnx")))
    groups = find_groups(graph)
    assert sorted(g.size for g in prunable_groups(groups)) == [8]
    feats = next(g for g in groups if g.size == 6 and len(g.slices) == 3)
    assert not feats.prunable and "ONNX surgery" in feats.reason
    (node,) = [n for n in graph.nodes if n.op == "rnn"]
    assert {(s.param, s.axis) for s in feats.slices} >= {(node.inputs[-3].name, 2)}  # W's input axis
    node.attrs.pop("features_fixed")  # the rule itself couples exactly what PyTorch's does
    assert sorted(g.size for g in prunable_groups(find_groups(graph))) == [6, 8]


# --- the ONNX importer on the same networks ---------------------------------------------------

ONNX_CASES = {
    "leaky_relu": lambda: ConvAct(nn.LeakyReLU(0.1)),
    "elu": lambda: ConvAct(nn.ELU()),
    "selu": lambda: ConvAct(nn.SELU()),
    "celu": lambda: ConvAct(nn.CELU(0.7)),
    "mish": lambda: ConvAct(nn.Mish()),
    "prelu": lambda: ConvAct(nn.PReLU(8)),
    "instance_norm": lambda: ConvAct(nn.InstanceNorm2d(8, affine=True)),
}


@pytest.mark.parametrize("name", sorted(ONNX_CASES))
def test_onnx_equivalents_are_grouped_and_pruned_exactly(name, tmp_path):
    torch.manual_seed(0)
    model = perturb_parameters_(ONNX_CASES[name]()).eval()
    x = torch.randn(2, 3, 6, 6)
    case = onnx_roundtrip_case(model, (x,), tmp_path)
    assert case.prunable == 1 and case.exact, case.error
    assert case.params_removed > 0


def test_why_nothing_prunable_names_ops_without_a_rule():
    class Fft(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.fft.fft(self.a(x)).real)

    why = why_nothing_prunable(_groups(Fft(), torch.randn(2, 4)))
    assert why.startswith("no prunable group") and "without a dimension rule: aten.fft_fft" in why
    assert why_nothing_prunable(_groups(nn.Linear(4, 2), torch.randn(2, 4))).startswith("no prunable group")
    assert why_nothing_prunable(_groups(ConvAct(nn.ReLU()), torch.randn(1, 3, 6, 6))) == ""
    assert "no channel group" in why_nothing_prunable([])
