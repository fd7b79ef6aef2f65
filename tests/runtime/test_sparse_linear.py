"""SparseLinear: same outputs as the masked dense layer; swap, config and checkpoint helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimc.errors import SlimcError
from slimc.runtime.sparse24_ops import sparse24_linear, sparse24_linear_reference
from slimc.runtime.sparse_linear import SparseLinear, densify, prepare_sparse, sparse_config, sparse_layers, to_sparse


def masked_linear(inp: int, out: int, n: int, m: int, bias: bool = True, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias).to(dtype)
    with torch.no_grad():
        w = lin.weight
        idx = w.abs().reshape(out, inp // m, m).argsort(-1, descending=True)[..., :n]
        mask = torch.zeros(out, inp // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(out, inp)
        w.mul_(mask)
    return lin


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_masked_dense_bitwise(n, m, bias):
    lin = masked_linear(64, 24, n, m, bias)
    sp = SparseLinear.from_linear(lin, n, m)
    x = torch.randn(3, 5, 64)
    assert torch.equal(sp(x), lin(x))
    assert sp.values.numel() == 24 * 64 * n // m


def test_forward_equals_masked_dense_in_bf16():
    lin = masked_linear(64, 16, 2, 4, dtype=torch.bfloat16)
    sp = SparseLinear.from_linear(lin, 2, 4)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(sp(x), lin(x))


def test_dense_cache_follows_in_place_changes_and_dtype_moves():
    lin = masked_linear(32, 8, 2, 4)
    sp = SparseLinear.from_linear(lin, 2, 4)
    x = torch.randn(2, 32)
    before = sp(x)
    with torch.no_grad():
        sp.values.mul_(2.0)
    torch.testing.assert_close(sp(x), 2 * before - sp.bias, rtol=1e-6, atol=1e-6)
    sp.to(torch.float64)
    assert sp(x.double()).dtype == torch.float64 and sp.metadata.dtype == torch.uint8


def test_to_linear_and_state_dict_round_trip():
    lin = masked_linear(32, 8, 2, 4)
    sp = SparseLinear.from_linear(lin, 2, 4)
    assert torch.equal(sp.to_linear().weight, lin.weight)
    fresh = SparseLinear(32, 8, 2, 4, bias=True)
    fresh.load_state_dict(sp.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), lin(x))
    assert set(sp.state_dict()) == {"values", "metadata", "bias"}


def test_reference_op_equals_masked_linear():
    lin = masked_linear(64, 16, 2, 4)
    sp = SparseLinear.from_linear(lin, 2, 4)
    x = torch.randn(5, 64)
    ref = sparse24_linear_reference(x, sp.values, sp.metadata, sp.bias)
    torch.testing.assert_close(ref, lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse24_linear(x, sp.values, sp.metadata, sp.bias), ref, rtol=0, atol=0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.head(self.b(torch.relu(self.a(self.emb(ids)))))


def sparsify_(net: Net, names: list[str]) -> None:
    with torch.no_grad():
        for name in names:
            w = net.get_submodule(name).weight
            o, i = w.shape
            idx = w.abs().reshape(o, i // 4, 4).argsort(-1, descending=True)[..., :2]
            w.mul_(torch.zeros(o, i // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).reshape(o, i))


def test_to_sparse_prepare_sparse_and_config_round_trip():
    torch.manual_seed(0)
    net = Net()
    sparsify_(net, ["a", "b"])
    ids = torch.randint(0, 10, (2, 7))
    ref = net(ids)
    assert to_sparse(net, ["a", "b"], 2, 4) == ["a", "b"]
    assert torch.equal(net(ids), ref)
    cfg = sparse_config(net)
    assert cfg == {"format": "slimc-nm", "n": 2, "m": 4, "layers": ["a", "b"]}
    fresh = Net()
    assert prepare_sparse(fresh, cfg) == ["a", "b"]
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh(ids), ref)
    assert sorted(sparse_layers(fresh)) == ["a", "b"]
    assert densify(fresh) == ["a", "b"] and not sparse_layers(fresh)
    assert torch.equal(fresh(ids), ref)
    assert sparse_config(fresh) is None


def test_to_sparse_refusals():
    net = Net()
    with pytest.raises(SlimcError, match="not 2:4 sparse"):
        to_sparse(net, ["a"], 2, 4)
    with pytest.raises(SlimcError, match="tied"):
        to_sparse(net, ["head"], 2, 4)
    with pytest.raises(SlimcError, match="no module"):
        to_sparse(net, ["nope"], 2, 4)
    with pytest.raises(SlimcError, match="not nn.Linear"):
        to_sparse(net, ["emb"], 2, 4)


def test_prepare_sparse_refusals():
    with pytest.raises(SlimcError, match="format"):
        prepare_sparse(Net(), {"format": "other", "n": 2, "m": 4, "layers": []})
    with pytest.raises(SlimcError, match="does not have"):
        prepare_sparse(Net(), {"format": "slimc-nm", "n": 2, "m": 4, "layers": ["zz"]})
    with pytest.raises(SlimcError, match="integer"):
        prepare_sparse(Net(), {"format": "slimc-nm", "n": 2})


def test_mixed_patterns_cannot_share_one_config():
    net = Net()
    net.a = SparseLinear(16, 32, 2, 4)
    net.b = SparseLinear(32, 16, 4, 8, bias=False)
    with pytest.raises(SlimcError, match="mixes"):
        sparse_config(net)


def test_training_the_values_keeps_the_pattern():
    lin = masked_linear(32, 8, 2, 4)
    sp = SparseLinear.from_linear(lin, 2, 4)
    assert sum(p.numel() for p in sp.parameters()) == 8 * 16 + 8  # kept values + bias
    sp.values.requires_grad_(True)
    opt = torch.optim.SGD([sp.values], lr=0.1)
    x = torch.randn(16, 32)
    loss = (sp(x) - torch.randn(16, 8)).pow(2).mean()
    loss.backward()
    assert sp.values.grad is not None and bool(sp.values.grad.abs().sum() > 0)
    opt.step()
    w = sp.dense_weight()
    assert bool(((w != 0) <= (lin.weight != 0)).all())  # only kept positions moved


def test_torch_export_traces_the_packed_layer():
    lin = masked_linear(32, 8, 2, 4)
    sp = SparseLinear.from_linear(lin, 2, 4)
    x = torch.randn(3, 32)
    ep = torch.export.export(sp, (x,))
    assert torch.equal(ep.module()(x), sp(x))
