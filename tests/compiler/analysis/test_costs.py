"""The IR's MAC and parameter counts, and CostModel: exact costs after removing channels, checked against
a recount of the pruned model."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from slimc.compiler.analysis.costs import CostModel, graph_macs, node_macs
from slimc.compiler.analysis.coupling import find_groups, model_graph
from slimc.compiler.model import Model
from slimc.compiler.surgery import apply_plan

from digits_models import plain_cnn, residual_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(net: nn.Module, x: torch.Tensor) -> Model:
    return Model(module=net.eval(), example_inputs={"x": x})


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(x)))).mean(dim=(2, 3)))


def test_macs_of_conv_depthwise_and_linear_by_hand():
    graph = model_graph(_model(Tiny(), torch.zeros(2, 3, 6, 6)))
    by_op = {n.op: node_macs(n) for n in graph.nodes if node_macs(n)}
    assert by_op["linear"] == 2 * 5 * 8
    convs = [node_macs(n) for n in graph.nodes if n.op == "conv"]
    assert convs == [2 * 8 * 36 * 3 * 9, 2 * 8 * 36 * 1 * 9]  # full conv, then depthwise (in/groups = 1)
    assert graph_macs(graph) == sum(convs) + 2 * 5 * 8


def test_cutting_both_sides_of_a_layer_keeps_the_product():
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))
    model = Model(module=net, example_inputs={"input": torch.zeros(1, 4)})
    graph = model_graph(model)
    groups = [g for g in find_groups(graph, net) if g.prunable]
    assert len(groups) == 2
    costs = CostModel(graph, groups, "macs")
    assert costs.total == 4 * 10 + 10 * 10 + 10 * 3
    # 9 of 10 out of both hidden layers: the middle layer keeps 1 x 1
    assert costs.cost([9, 9]) == 4 * 1 + 1 * 1 + 1 * 3
    assert costs.saving([0, 0], 0) == 4 * 1 + 10 * 1  # one channel of the first hidden layer
    assert costs.saving([0, 9], 0) == 4 * 1 + 1 * 1


@pytest.mark.parametrize("build", [plain_cnn, residual_cnn])
@pytest.mark.parametrize("kind", ["macs", "params"])
def test_cost_model_predicts_the_pruned_model_exactly(build, kind):
    net = build(0)
    model = _model(net, torch.zeros(1, 1, 8, 8))
    graph = model_graph(model)
    groups = [g for g in find_groups(graph, net) if g.prunable and g.exact]
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    costs = CostModel(graph, groups, kind, shapes=shapes if kind == "params" else None)
    rng = random.Random(0)
    plan = {g: sorted(rng.sample(range(g.size), rng.randint(1, g.size - 1))) for g in groups}
    predicted = costs.cost([len(plan[g]) for g in groups])
    apply_plan(model, plan)
    if kind == "macs":
        assert graph_macs(model_graph(model)) == pytest.approx(predicted, rel=1e-12)
        assert costs.total == graph_macs(graph)
    else:
        assert sum(p.numel() for p in model.module.parameters()) == pytest.approx(predicted, rel=1e-12)


def test_unknown_cost_kind():
    graph = model_graph(_model(Tiny(), torch.zeros(1, 3, 4, 4)))
    with pytest.raises(ValueError, match="cost kind"):
        CostModel(graph, [], "joules")
