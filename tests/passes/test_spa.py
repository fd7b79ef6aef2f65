"""SPA / OBSPA: allocation on hand-sized groups, the data-free moment walk, greedy OBS scores, and the pass on a
digits CNN trained here (PyTorch module, .pt2 and ONNX inputs, through the API and the CLI)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimc.compiler.groups import Group, Slice
from slimc.compiler.model import Model
from slimc.compiler.training import TrainConfig, Trainer, accuracy_on, classification_loss, digits
from slimc.passes._obspa_datafree import input_moments
from slimc.passes._obspa_math import greedy_remove, greedy_scores, relu_gaussian_moments
from slimc.passes.spa import SpaConfig, allocate

from digits_models import plain_cnn, residual_cnn

EXAMPLE = {"x": torch.zeros(1, 1, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """The plain and residual digits CNNs, trained 8 epochs (about 99% test accuracy)."""
    torch.set_num_threads(1)
    nets = {}
    for name, build in (("plain", plain_cnn), ("residual", residual_cnn)):
        net = build(0)
        Trainer(net, digits("train"), classification_loss, TrainConfig(epochs=8, lr=3e-3, weight_decay=5e-4, progress=False)).fit()
        nets[name] = (net.eval(), accuracy_on(digits("test"))(net)["accuracy"])
    return nets


def _groups(*sizes: int) -> list[Group]:
    return [Group(f"g{i}", n, [Slice(f"w{i}", 0, torch.arange(n)[:, None])], role="conv.channel") for i, n in enumerate(sizes)]


# ---------------------------------------------------------------- allocation


def test_local_allocation_takes_the_same_fraction_of_every_group():
    groups = _groups(10, 20)
    scores = [torch.arange(10, dtype=torch.float64), torch.arange(20, dtype=torch.float64).flip(0)]
    plan = allocate(groups, scores, None, SpaConfig(allocation="local", sparsity=0.5, round_to=1, min_keep=0.0))
    assert [len(plan[g]) for g in groups] == [5, 10]
    assert plan[groups[0]] == [0, 1, 2, 3, 4] and plan[groups[1]] == list(range(10, 20))  # the lowest scores


def test_global_allocation_ranks_all_channels_together():
    groups = _groups(4, 4)
    scores = [torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.tensor([5.0, 6.0, 7.0, 8.0], dtype=torch.float64)]
    plan = allocate(groups, scores, None, SpaConfig(allocation="global", sparsity=0.25, round_to=1, min_keep=0.0))
    assert plan == {groups[0]: [0, 1]}
    # floors: every group keeps at least min_keep of its channels
    plan = allocate(groups, scores, None, SpaConfig(allocation="global", sparsity=0.5, round_to=1, min_keep=0.5))
    assert sorted(len(v) for v in plan.values()) == [2, 2]


def test_isomorphic_allocation_cuts_each_structure_by_the_same_fraction():
    groups = _groups(4, 4) + [Group("big", 8, [Slice("w9", 0, torch.arange(8)[:, None]), Slice("w8", 1, torch.arange(8)[:, None])],
                                    role="conv.channel")]
    scores = [torch.full((4,), 0.1, dtype=torch.float64), torch.full((4,), 0.2, dtype=torch.float64),
              torch.full((8,), 9.0, dtype=torch.float64)]
    plan = allocate(groups, scores, None, SpaConfig(allocation="isomorphic", sparsity=0.5, round_to=1, min_keep=0.0))
    # the two 4-channel groups compete with each other only; the big group loses its share although it scores high
    assert len(plan.get(groups[2], [])) >= 3
    assert len(plan.get(groups[0], [])) >= len(plan.get(groups[1], []))


def test_kept_widths_round_to_the_multiple():
    groups = _groups(32)
    plan = allocate(groups, [torch.arange(32, dtype=torch.float64)], None, SpaConfig(sparsity=0.3, round_to=8, min_keep=0.0))
    assert (32 - len(plan[groups[0]])) % 8 == 0


# ---------------------------------------------------------------- data-free moments and OBS scores


def test_moment_walk_through_bn_and_relu_matches_the_rectified_gaussian(trained):
    from slimc.compiler.analysis.coupling import model_graph
    from slimc.passes.group_magnitude import model_tensors

    net, _ = trained["plain"]
    model = Model(module=net, example_inputs=EXAMPLE)
    graph = model_graph(model)
    conv2 = [n for n in graph.nodes if n.op == "conv"][1]  # reads relu(bn1(conv1(x)))
    mean, second = input_moments(conv2, model_tensors(model), samples=200_000)
    bn = net.features[0][1]
    std = bn.weight.detach().double().abs() * (bn.running_var.double() / (bn.running_var.double() + bn.eps)).sqrt()
    em, es = relu_gaussian_moments(bn.bias.detach().double(), std)
    assert torch.allclose(mean, em, rtol=0.05, atol=0.01) and torch.allclose(second, es, rtol=0.05, atol=0.01)
    # behind the max-pool the walk still has an answer, and it is larger than before pooling
    conv3 = [n for n in graph.nodes if n.op == "conv"][2]
    pooled = input_moments(conv3, model_tensors(model))
    assert pooled is not None and bool((pooled[0] >= 0).all())


def test_greedy_scores_follow_the_greedy_removal_order():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = X.T @ X / 300
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    sets = torch.arange(6)[:, None]
    scores = greedy_scores([(W, H, sets)], percdamp=0.0)
    order, _, costs = greedy_remove(W, H, sets, 5, percdamp=0.0)
    assert torch.argsort(scores).tolist()[:5] == order
    assert scores[order].tolist() == pytest.approx(torch.tensor(costs).cumsum(0).tolist())


# ---------------------------------------------------------------- the pass


def _run(net, recipe, *overrides, data="digits"):
    from slimc import api

    model = Model(module=copy.deepcopy(net), example_inputs=EXAMPLE)
    out = api.compress(model, recipe, data=data, overrides=["spa.round_to=1", *overrides])
    return out, out.history[-1].stats


@pytest.mark.parametrize("name", ["plain", "residual"])
def test_obspa_with_calibration_data_keeps_accuracy_at_half_the_macs(trained, name):
    net, dense = trained[name]
    out, st = _run(net, "obspa-calib-50", "spa.samples=256")
    assert st["macs_kept"] <= 0.5 + 1e-9
    assert st["accuracy_after"] >= dense - 0.02, (st["accuracy_after"], dense)
    assert st["layers_refit"] >= 2 and st["hessian_sources"] == {"calib": st["hessian_sources"]["calib"]}
    assert out.num_parameters() < sum(p.numel() for p in net.parameters())


def test_data_free_obspa_beats_plain_magnitude(trained):
    net, dense = trained["plain"]
    _, free = _run(net, "obspa-50", "spa.samples=128", "spa.distill_steps=60", "spa.batch_size=64")
    _, l2 = _run(net, "spa-l2-50")
    assert free["macs_kept"] <= 0.5 + 1e-9 and l2["macs_kept"] <= 0.5 + 1e-9
    assert free["accuracy_after"] > l2["accuracy_after"] + 0.1, (free["accuracy_after"], l2["accuracy_after"])
    assert free["accuracy_after"] >= 0.9 * dense


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "lamp", "bn_scale", "random", "taylor", "obd"])
def test_every_criterion_prunes_to_the_budget_and_the_cut_is_exact(trained, criterion):
    net, _ = trained["plain"]
    out, st = _run(net, "spa-l2-50", f"spa.criterion={criterion}", "spa.sparsity=0.3", "spa.samples=128")
    assert st["macs_kept"] <= 0.7 + 1e-9 and st["channels_removed"] > 0
    assert not st.get("groups_refused")  # apply_plan verified the cut against the masked model


@pytest.mark.parametrize("allocation", ["local", "global", "isomorphic"])
@pytest.mark.parametrize("budget", ["macs", "params", "channels"])
def test_allocations_meet_every_budget_kind(trained, allocation, budget):
    net, _ = trained["residual"]
    out, st = _run(net, "spa-l2-50", f"spa.allocation={allocation}", f"spa.budget={budget}", "spa.sparsity=0.4")
    if budget == "macs":
        assert st["macs_kept"] <= 0.6 + 1e-9
    elif budget == "params":
        assert out.num_parameters() <= 0.6 * sum(p.numel() for p in net.parameters()) + 1
    else:
        assert st["channels_removed"] >= 0.4 * st["channels_eligible"] - 1


def test_spa_on_onnx_and_pt2_inputs_through_the_cli(trained, tmp_path):
    from typer.testing import CliRunner

    from slimc.cli.app import app

    net, _ = trained["plain"]
    x = torch.zeros(2, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), str(tmp_path / "net.pt2"))
    torch.onnx.export(net, (x,), str(tmp_path / "net.onnx"), dynamo=True, dynamic_shapes=({0: batch},))
    for src, fmt in (("net.pt2", "model.pt2"), ("net.onnx", "model.onnx")):
        for recipe in ("spa-l2-50", "obspa-50"):
            out = tmp_path / f"{src}-{recipe}"
            res = CliRunner().invoke(app, ["run", str(tmp_path / src), "--recipe", recipe, "--data", "digits", "-o", str(out)])
            assert res.exit_code == 0, res.output
            st = json.loads((out / "report.json").read_text())["passes"][0]["stats"]
            assert st["macs_kept"] <= 0.5 + 1e-9 and (out / fmt).is_file()
            if recipe == "obspa-50":
                assert "fallback" in st  # graphs that cannot be run by hooks use the BN-statistics H, no refit


def test_spa_refuses_what_it_cannot_do(trained, tmp_path):
    from slimc import api
    from slimc.compiler.frontends.loaders import load

    net, _ = trained["plain"]
    torch.onnx.export(net, (torch.zeros(2, 1, 8, 8),), str(tmp_path / "net.onnx"), dynamo=True)
    onnx_model = load(str(tmp_path / "net.onnx"))
    with pytest.raises(Exception, match="cannot calibrate an ONNX model"):
        api.compress(onnx_model, "obspa-calib-50", data="digits")
    with pytest.raises(Exception, match="needs gradients"):
        api.compress(load(str(tmp_path / "net.onnx")), "spa-taylor-50", data="digits")


def test_obspa_calibrates_an_encoder_on_text(tmp_path):
    """A BERT encoder with a tokenizer: --data pydoc gives calibration windows (no loss), the layers are refit on them."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from slimc import api

    from tiny_tokenizer import save_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp_path / "tok", 128)))
    torch.manual_seed(0)
    net = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64), add_pooling_layer=False).eval()
    ids = torch.randint(0, 128, (2, 12))
    model = Model(module=net, config=net.config, tokenizer=tok, source_format="hf",
                  example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    dense = net(input_ids=ids).last_hidden_state.detach().clone()
    out = api.compress(model, "obspa-calib-50", data="pydoc", overrides=["spa.sparsity=0.3", "spa.samples=32", "spa.seq_len=16",
                                                                          "spa.batch_size=8", "spa.roles=[attention.head, mlp.neuron]"])
    st = out.history[-1].stats
    assert st["macs_kept"] <= 0.7 + 1e-9 and st["layers_refit"] >= 4
    got = out.module(input_ids=ids).last_hidden_state
    assert got.shape == dense.shape and torch.isfinite(got).all()
    with pytest.raises(Exception, match="needs data with a loss"):
        api.compress(copy.deepcopy(model), "spa-taylor-50", data="pydoc", overrides=["spa.samples=8", "spa.seq_len=16"])
