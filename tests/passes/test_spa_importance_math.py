"""SPA importance maths: per-weight criteria, aggregation over channel groups, channel-level criteria, normalisers."""

import math
import zlib

import pytest
import torch

from slimc.compiler.groups import Group, Slice
from slimc.passes._spa_importance_math import AGGREGATIONS, CRITERIA, NORMALISERS, channel_scores, normalise, weight_scores


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def _close(got, expect):
    torch.testing.assert_close(got, _f64(expect), rtol=0, atol=1e-12)


def _group():
    # Rows of a.weight and columns of b.weight are the channels. The weights each channel owns:
    #   channel 0: a [1, -2], b [2, 0]    channel 1: a [0, 3], b [0, 1]    channel 2: a [-1, 1], b [-1, 0]
    g = Group("g", 3, [Slice("a.weight", 0, torch.arange(3)[:, None]), Slice("b.weight", 1, torch.arange(3)[:, None])])
    tensors = {
        "a.weight": torch.tensor([[1.0, -2.0], [0.0, 3.0], [-1.0, 1.0]]),
        "b.weight": torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    }
    return g, tensors


def test_constants():
    assert CRITERIA == ("l1", "l2", "taylor", "obd", "fpgm", "lamp", "bn_scale", "random")
    assert AGGREGATIONS == ("sum", "mean", "max")
    assert NORMALISERS == ("none", "mean", "max", "gaussian", "lamp")


def test_weight_scores_elementwise():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    g = torch.tensor([[2.0, 0.5], [-4.0, 0.0]])
    f = torch.tensor([[1.0, 2.0], [4.0, 0.5]])
    torch.testing.assert_close(weight_scores("l1", w), _f64([[1, 2], [0.5, 3]]), rtol=0, atol=0)
    torch.testing.assert_close(weight_scores("l2", w), _f64([[1, 4], [0.25, 9]]), rtol=0, atol=0)
    torch.testing.assert_close(weight_scores("taylor", w, grad=g), _f64([[2, 1], [2, 0]]), rtol=0, atol=0)
    torch.testing.assert_close(weight_scores("obd", w, fisher=f), _f64([[0.5, 4], [0.5, 2.25]]), rtol=0, atol=0)


def test_weight_scores_errors():
    w = torch.ones(2, 2)
    with pytest.raises(ValueError, match="grad"):
        weight_scores("taylor", w)
    with pytest.raises(ValueError, match="fisher"):
        weight_scores("obd", w)
    with pytest.raises(ValueError, match="shape"):
        weight_scores("taylor", w, grad=torch.ones(3))
    with pytest.raises(ValueError, match="unknown"):
        weight_scores("fpgm", w)  # a channel-level criterion has no per-weight score
    with pytest.raises(ValueError, match="unknown"):
        weight_scores("nope", w)


@pytest.mark.parametrize(
    "criterion, aggregation, expect",
    [
        ("l1", "sum", [5, 4, 3]),
        ("l1", "mean", [5 / 4, 4 / 4, 3 / 4]),
        ("l1", "max", [2, 3, 1]),
        ("l2", "sum", [9, 10, 3]),  # sum of squares: the square of the group L2 norm
        ("l2", "mean", [9 / 4, 10 / 4, 3 / 4]),
        ("l2", "max", [4, 9, 1]),
    ],
)
def test_magnitude_criteria_aggregate_over_all_slices(criterion, aggregation, expect):
    g, tensors = _group()
    got = channel_scores(g, tensors, criterion, aggregation)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (3,)
    _close(got, expect)


def test_taylor_uses_only_slices_with_a_gradient():
    g, tensors = _group()
    grads = {"a.weight": torch.tensor([[0.5, 1.0], [1.0, -1.0], [2.0, 0.0]])}  # b.weight has no gradient
    # |w * g| on a.weight: channel 0 [0.5, 2], channel 1 [0, 3], channel 2 [2, 0]
    _close(channel_scores(g, tensors, "taylor", "sum", grads=grads), [2.5, 3, 2])
    _close(channel_scores(g, tensors, "taylor", "mean", grads=grads), [1.25, 1.5, 1])  # two weights counted per channel
    _close(channel_scores(g, tensors, "taylor", "max", grads=grads), [2, 3, 2])


def test_obd_half_fisher_times_square():
    g, tensors = _group()
    fishers = {"b.weight": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
    # 0.5 * f * w^2 on the columns of b.weight: [2, 0], [0, 2.5], [1.5, 0]
    _close(channel_scores(g, tensors, "obd", "sum", fishers=fishers), [2, 2.5, 1.5])
    _close(channel_scores(g, tensors, "obd", "mean", fishers=fishers), [1, 1.25, 0.75])


def test_channel_owning_several_indices():
    w = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    v = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    # channel 0 owns rows {0, 2} of w and columns {0, 1} of v; channel 1 owns rows {1, 3} and columns {2, 3}
    g = Group("heads", 2, [Slice("w", 0, torch.tensor([[0, 2], [1, 3]])), Slice("v", 1, torch.tensor([[0, 1], [2, 3]]))])
    tensors = {"w": w, "v": v}
    _close(channel_scores(g, tensors, "l1", "sum"), [1 + 3 + 1 + 1, 2 + 4 + 0 + 2])
    _close(channel_scores(g, tensors, "l1", "mean"), [6 / 4, 8 / 4])
    _close(channel_scores(g, tensors, "l2", "sum"), [1 + 9 + 1 + 1, 4 + 16 + 0 + 4])
    _close(channel_scores(g, tensors, "l2", "max"), [9, 16])
    # fpgm over the concatenated vectors [1, 3, 1, -1] and [2, 4, 0, 2]: distance sqrt(1 + 1 + 1 + 9)
    _close(channel_scores(g, tensors, "fpgm"), [math.sqrt(12), math.sqrt(12)])


def test_missing_tensors_are_skipped():
    g, tensors = _group()
    del tensors["b.weight"]
    _close(channel_scores(g, tensors, "l1", "sum"), [3, 3, 2])
    with pytest.raises(ValueError, match="none of its tensors"):
        channel_scores(g, {}, "l2")


def test_fpgm_geometric_median_scores_lowest():
    # Channel vectors (x, y) with x in a.weight rows and y in b.weight columns: (0, 0), (1, 1), (3, 3).
    g = Group("g", 3, [Slice("a.weight", 0, torch.arange(3)[:, None]), Slice("b.weight", 1, torch.arange(3)[:, None])])
    tensors = {"a.weight": torch.tensor([[0.0], [1.0], [3.0]]), "b.weight": torch.tensor([[0.0, 1.0, 3.0]])}
    r2 = math.sqrt(2)
    expect = [r2 + 3 * r2, r2 + 2 * r2, 3 * r2 + 2 * r2]
    _close(channel_scores(g, tensors, "fpgm"), expect)
    _close(channel_scores(g, tensors, "fpgm", "max"), expect)  # the aggregation does not apply
    assert int(channel_scores(g, tensors, "fpgm").argmin()) == 1


def test_fpgm_identical_channels_are_exactly_zero_apart():
    g = Group("g", 2, [Slice("w", 0, torch.arange(2)[:, None])])
    got = channel_scores(g, {"w": torch.tensor([[0.1, 0.7, 1e3], [0.1, 0.7, 1e3]])}, "fpgm")
    torch.testing.assert_close(got, _f64([0, 0]), rtol=0, atol=0)


def test_lamp_criterion_on_channel_sums_of_squares():
    g, tensors = _group()
    # sums of squares [9, 10, 3]; ascending 3, 9, 10 -> 3 / 22, 9 / 19, 10 / 10
    _close(channel_scores(g, tensors, "lamp"), [9 / 19, 1, 3 / 22])


def test_bn_scale_sums_abs_gamma_of_scale_slices():
    ch = torch.arange(3)[:, None]
    g = Group(
        "conv",
        3,
        [
            Slice("c.weight", 0, ch),  # 4-D conv weight: not a scale
            Slice("bn.weight", 0, ch),
            Slice("bn.bias", 0, ch),  # 1-D but a shift, not a scale
            Slice("bn.running_mean", 0, ch),  # buffer not passed: skipped
            Slice("ln.weight", 0, torch.tensor([[0, 1], [2, 3], [4, 5]])),  # a scale with two entries per channel
        ],
    )
    tensors = {
        "c.weight": torch.full((3, 2, 1, 1), 10.0),
        "bn.weight": torch.tensor([0.5, -2.0, 1.0]),
        "bn.bias": torch.tensor([100.0, 100.0, 100.0]),
        "ln.weight": torch.tensor([1.0, -1.0, 0.0, 0.25, 2.0, 0.0]),
    }
    _close(channel_scores(g, tensors, "bn_scale"), [0.5 + 2, 2 + 0.25, 1 + 2])


def test_bn_scale_without_scale_slice():
    g, tensors = _group()
    with pytest.raises(ValueError, match="has no normalisation scale"):
        channel_scores(g, tensors, "bn_scale")


def test_random_is_deterministic_per_name_and_seed():
    g, tensors = _group()
    a = channel_scores(g, tensors, "random", seed=3)
    b = channel_scores(g, tensors, "random", seed=3)
    assert a.dtype == torch.float64 and a.shape == (3,)
    assert torch.equal(a, b)
    assert bool(((a >= 0) & (a < 1)).all())
    gen = torch.Generator().manual_seed(3 + zlib.crc32(b"g"))
    assert torch.equal(a, torch.rand(3, generator=gen, dtype=torch.float64))
    assert not torch.equal(a, channel_scores(g, tensors, "random", seed=4))
    other = Group("h", 3, g.slices)
    assert not torch.equal(a, channel_scores(other, tensors, "random", seed=3))


def test_channel_scores_errors():
    g, tensors = _group()
    with pytest.raises(ValueError, match="unknown criterion"):
        channel_scores(g, tensors, "nope")
    with pytest.raises(ValueError, match="unknown aggregation"):
        channel_scores(g, tensors, "l1", "median")
    with pytest.raises(ValueError, match="grads"):
        channel_scores(g, tensors, "taylor")
    with pytest.raises(ValueError, match="grads"):
        channel_scores(g, tensors, "taylor", grads={"other.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="fishers"):
        channel_scores(g, tensors, "obd")
    with pytest.raises(ValueError, match="shape"):
        channel_scores(g, tensors, "taylor", grads={"a.weight": torch.ones(2, 3)})


def test_normalise_methods():
    s = [torch.tensor([1.0, 2.0, 3.0]), _f64([4.0, 4.0])]
    none = normalise(s, "none")
    _close(none[0], [1, 2, 3])
    _close(none[1], [4, 4])
    mean = normalise(s, "mean")
    _close(mean[0], [0.5, 1, 1.5])
    _close(mean[1], [1, 1])
    _close(normalise(s, "max")[0], [1 / 3, 2 / 3, 1])
    std = math.sqrt(2 / 3)  # population std of [1, 2, 3]
    gauss = normalise(s, "gaussian")
    _close(gauss[0], [-1 / std, 0, 1 / std])
    _close(gauss[1], [0, 0])  # a constant group has zero spread
    assert normalise(s)[0].dtype == torch.float64  # mean is the default
    _close(s[0].double(), [1, 2, 3])  # the inputs are left alone


def test_normalise_lamp():
    _close(normalise([torch.tensor([1.0, 2.0, 3.0])], "lamp")[0], [1 / 6, 2 / 5, 3 / 3])
    _close(normalise([torch.tensor([3.0, 1.0, 2.0])], "lamp")[0], [1, 1 / 6, 2 / 5])
    _close(normalise([torch.tensor([2.0, 2.0])], "lamp")[0], [2 / 4, 2 / 2])  # tie: the lower index ranks first


def test_normalise_all_zero_group_stays_zero():
    for method in NORMALISERS:
        (got,) = normalise([torch.zeros(3)], method)
        torch.testing.assert_close(got, torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)


def test_normalise_groups_separately_and_unknown_method():
    out = normalise([_f64([1.0, 3.0]), _f64([10.0, 30.0, 20.0])], "max")
    assert [tuple(t.shape) for t in out] == [(2,), (3,)]
    _close(out[0], [1 / 3, 1])
    _close(out[1], [1 / 3, 1, 2 / 3])
    with pytest.raises(ValueError, match="unknown normaliser"):
        normalise([_f64([1.0])], "median")
