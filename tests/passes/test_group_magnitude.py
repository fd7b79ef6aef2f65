"""group-magnitude: group norms, and zero-norm channels removed exactly on ONNX and PyTorch models."""

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from slimc.compiler.frontends.import_onnx import load_onnx
from slimc.compiler.groups import Group, Slice, block_index
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext, get_pass
from slimc.passes._group_magnitude_math import group_channel_norms
from slimc.passes.group_magnitude import GroupMagnitude

from onnx_roundtrip import export_onnx, feeds_for, perturb_parameters_, run_ort

torch.set_num_threads(1)


def test_group_channel_norms_sum_over_slices():
    w1 = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])  # rows are channels
    w2 = torch.tensor([[0.0, 2.0, 0.0]])  # columns are channels
    g = Group("g", 3, [Slice("w1", 0, block_index(3, 1)), Slice("w2", 1, block_index(3, 1))])
    got = group_channel_norms(g, {"w1": w1, "w2": w2})
    torch.testing.assert_close(got, torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_blocks_of_channels_count_every_index():
    w = torch.arange(8.0).reshape(8, 1)
    g = Group("heads", 2, [Slice("w", 0, block_index(2, 4))])  # head h owns rows 4h .. 4h+3
    got = group_channel_norms(g, {"w": w})
    expect = torch.tensor([(0 + 1 + 4 + 9) ** 0.5, (16 + 25 + 36 + 49) ** 0.5], dtype=torch.float64)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(h + self.c2(h))  # residual: c1 and c2 outputs are one group
        return self.fc(h.mean((2, 3)))


def _zero_channels(net: _Net, dead: list[int]) -> None:
    """Channels whose every weight is 0 (c1 rows and bias, BN affine, c2 rows/cols/bias, fc columns)."""
    with torch.no_grad():
        for t in (net.c1.weight, net.c1.bias, net.bn.weight, net.bn.bias, net.c2.weight, net.c2.bias):
            t[dead] = 0
        net.c2.weight[:, dead] = 0
        net.fc.weight[:, dead] = 0


def test_onnx_model_loses_exactly_the_dead_channels(tmp_path):
    net = perturb_parameters_(_Net())
    _zero_channels(net, [2, 5])
    x = torch.randn(1, 3, 6, 6)
    model = Model(onnx=load_onnx(export_onnx(net, (x,), tmp_path / "net.onnx")), source_format="onnx")
    feeds = feeds_for(model.onnx, (x,))
    y0 = run_ort(model.onnx, feeds, tmp_path / "before.onnx")[0]
    before = model.num_parameters()
    result = get_pass("group-magnitude")(sparsity=0.25)(model, PassContext())
    assert result.modified and result.stats["channels_removed"] == 2
    y1 = run_ort(result.model.onnx, feeds, tmp_path / "after.onnx")[0]
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-5)
    assert before - result.model.num_parameters() == result.stats["params_removed"] > 0


def test_torch_model_loses_exactly_the_dead_channels():
    net = perturb_parameters_(_Net()).eval()
    _zero_channels(net, [0, 7])
    x = torch.randn(1, 3, 6, 6)
    y0 = net(x)
    model = Model(module=net, example_inputs={"x": x})
    result = GroupMagnitude(sparsity=0.25)(model, PassContext())
    assert result.stats["channels_removed"] == 2 and net.c1.out_channels == 6 and net.c2.in_channels == 6
    torch.testing.assert_close(net(x), y0, rtol=0, atol=1e-5)


def test_roles_filter_and_config_validation():
    with pytest.raises(pydantic.ValidationError):
        GroupMagnitude(sparsity=1.0)
    with pytest.raises(pydantic.ValidationError):
        GroupMagnitude(sparsity=0.2, unknown=1)
    net = perturb_parameters_(_Net()).eval()
    result = GroupMagnitude(sparsity=0.5, roles=["attention.kv_group"])(Model(module=net, example_inputs={"x": torch.randn(1, 3, 6, 6)}))
    assert not result.modified and result.stats["groups_pruned"] == 0 and net.c1.out_channels == 8


def test_cli_compresses_an_onnx_file(tmp_path):
    """`compress run net.onnx --recipe group-magnitude-25 -f onnx`: the shipped recipe on an ONNX input."""
    from typer.testing import CliRunner

    from slimc.cli.app import app, dispatch

    net = perturb_parameters_(_Net())
    x = torch.randn(1, 3, 6, 6)
    export_onnx(net, (x,), tmp_path / "net.onnx")
    out = tmp_path / "out"
    args = ["run", str(tmp_path / "net.onnx"), "--recipe", "group-magnitude-25", "-o", str(out), "-f", "onnx"]
    r = CliRunner().invoke(app, dispatch(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    pruned = load_onnx(out / "model.onnx")
    # 8 residual channels -> 6 (25%), so c1 keeps 6 output channels
    assert [tuple(v.shape) for n, v in pruned.graph.initializers.items() if n.endswith("c1.weight")] == [(6, 3, 3, 3)]
    y = run_ort(out / "model.onnx", feeds_for(pruned, (x,)))[0]
    assert y.shape == (1, 4) and np.isfinite(y).all()


def test_mlp_neurons_match_the_magnitude_pass():
    """On MLP neurons the group norm is the magnitude pass's neuron norm: both remove the same neurons."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from slimc.passes.magnitude import Magnitude

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    lm = perturb_parameters_(LlamaForCausalLM(cfg)).eval()
    a = Model(module=lm, config=lm.config)
    b = Model(module=copy.deepcopy(lm), config=copy.deepcopy(lm.config))
    ra = GroupMagnitude(sparsity=0.25, roles=["mlp.neuron"])(a)
    rb = Magnitude(sparsity=0.25)(b)
    assert ra.stats["channels_removed"] == rb.stats["neurons_removed"] == 2 * 12
    for (na, ta), (nb, tb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert na == nb and ta.shape == tb.shape and torch.equal(ta, tb), na
