"""The surgery contract on hand-written groups: zeroed-then-removed equals masked."""

import pytest
import torch
from torch import nn

from slimc.compiler.groups import AttrUpdate, Group, Role, Slice, block_index
from slimc.compiler.surgery.torch_module import apply_plan, mask_plan
from slimc.errors import SlimcError


def _conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.GroupNorm(4, 8),
        nn.Conv2d(8, 5, 1),
    ).eval()


def test_conv_bn_depthwise_groupnorm_exact():
    net = _conv_bn_net()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    pair = block_index(4, 2)  # GroupNorm(4, 8): a unit is one norm group of 2 channels
    slices = []
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias", "4.weight", "4.bias"):
        slices.append(Slice(name, 0, pair))
    slices.append(Slice("5.weight", 1, pair))
    g = Group("ch", 4, slices, Role.CONV_CHANNEL)
    plan = {g: [1, 3]}
    x = torch.randn(2, 3, 6, 6)
    mask_plan(net, plan)
    y0 = net(x)
    stats = apply_plan(net, plan)
    y1 = net(x)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-5)
    assert net[0].out_channels == 4 and net[1].num_features == 4
    assert net[3].groups == 4 and net[3].in_channels == 4 and net[4].num_groups == 2
    # per GroupNorm pair: conv0 2*3*9 + 2, bn 2 + 2, depthwise 2*9 + 2, gn 2 + 2, conv5 5*2 = 94
    assert stats["params_removed"] == 2 * 94


def test_params_removed_matches_numel_per_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    one = block_index(10, 1)
    g = Group("hidden", 10, [Slice("0.weight", 0, one), Slice("0.bias", 0, one), Slice("2.weight", 1, one)], Role.LINEAR_CHANNEL)
    per = g.numel_per_channel({k: v.shape for k, v in net.named_parameters()})
    assert per == 6 + 1 + 3
    stats = apply_plan(net, {g: [0, 4, 9]})
    assert stats["params_removed"] == 3 * per
    assert net[0].out_features == 7 and net[2].in_features == 7


def test_tied_embedding_stays_tied():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    m = Tied()
    g = Group("hidden", 8, [Slice("emb.weight", 1, block_index(8, 1)), Slice("head.weight", 1, block_index(8, 1))], Role.HIDDEN)
    ids = torch.randint(0, 11, (3, 4))
    mask_plan(m, {g: [2, 5]})
    y0 = m(ids)
    apply_plan(m, {g: [2, 5]})
    assert m.head.weight is m.emb.weight and m.emb.embedding_dim == 6
    torch.testing.assert_close(m(ids), y0, rtol=0, atol=1e-6)


def test_attr_update_and_bad_plans():
    net = nn.Sequential(nn.Linear(4, 6))
    net[0].num_heads = 3
    g = Group("heads", 3, [Slice("0.weight", 0, block_index(3, 2))], Role.HEAD, attrs=[AttrUpdate("0", "num_heads", 1)])
    apply_plan(net, {g: [1]})
    assert net[0].num_heads == 2 and net[0].weight.shape == (4, 4)
    with pytest.raises(SlimcError, match="has 3 channels"):
        apply_plan(nn.Sequential(nn.Linear(4, 6)), {g: [3]})
    frozen = Group("x", 3, [], prunable=False, reason="flattened into an opaque op")
    with pytest.raises(SlimcError, match="not prunable"):
        apply_plan(net, {frozen: [0]})
    ghost = Group("ghost", 2, [Slice("nope.weight", 0, block_index(2, 1))])
    with pytest.raises(SlimcError, match="does not have"):
        apply_plan(net, {ghost: [0]})
