"""HESSO: saliency proxies on hand-made tensors, the ramp, held zeros, global deterministic selection,
exact sub-network construction on the zoo, the pass on a digits CNN, and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from slimc.compiler.analysis.costs import CostModel
from slimc.compiler.analysis.coupling import find_groups, model_graph
from slimc.compiler.groups import Group, Slice
from slimc.compiler.model import Model, first_tensor
from slimc.compiler.surgery import apply_plan
from slimc.compiler.training import TrainConfig, Trainer
from slimc.passes._budget_math import select_channels as select
from slimc.passes._hesso_math import channel_sums, hybrid_saliency, period_targets, proxies, ramp
from slimc.passes.hesso import Hesso, candidate_groups

import zoo_models as Z  # noqa: E402  (benchmarks/ is on pytest's pythonpath)
from digits_models import plain_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _group(name: str, param: str, size: int, axis: int = 0) -> Group:
    return Group(name, size, [Slice(param, axis, torch.arange(size)[:, None])])


# ---------------------------------------------------------------- maths


def test_proxies_on_hand_made_tensors():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])  # channel norms 5, 1, 0
    d = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 1.0]])
    g = _group("g", "w", 3)
    sums = channel_sums(g, {"w": w}, {"w": d})
    p = proxies(sums)
    assert torch.allclose(p["magnitude"], torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(p["avg_magnitude"], torch.tensor([2.5, 0.5, 0.0], dtype=torch.float64))
    # cos(x, d) + 1: parallel 2, orthogonal 1, a zero channel 1
    assert torch.allclose(p["cosine_similarity"], torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(p["taylor_first_order"], torch.tensor([25.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(p["taylor_second_order"], torch.tensor([312.5, 0.0, 0.0], dtype=torch.float64))


def test_hybrid_saliency_normalises_each_proxy_over_all_groups():
    a = {"magnitude": torch.tensor([3.0, 0.0], dtype=torch.float64)}
    b = {"magnitude": torch.tensor([4.0], dtype=torch.float64)}
    sa, sb = hybrid_saliency([a, b], {"magnitude": 1.0})
    assert torch.allclose(sa, torch.tensor([0.6, 0.0], dtype=torch.float64)) and torch.allclose(sb, torch.tensor([0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown saliency"):
        hybrid_saliency([a], {"nonsense": 1.0})


def test_ramp_reaches_exactly_zero_and_is_linear():
    T = 7
    x, values = 1.0, []
    for t in range(T):
        x *= ramp(t, T)
        values.append(x)
    assert values[-1] == 0.0
    assert all(math.isclose(v, (T - t - 1) / T, abs_tol=1e-12) for t, v in enumerate(values))
    with pytest.raises(ValueError):
        ramp(T, T)
    assert period_targets(10.0, 4) == [2.5, 5.0, 7.5, 10.0]
    # geometric: each period keeps the same fraction of what is left; 100 -> 1 over two periods keeps 10 after the first
    assert period_targets(99.0, 2, dense=100.0, schedule="geometric") == pytest.approx([90.0, 99.0])


def test_selection_is_global_deterministic_and_keeps_floors_and_multiples():
    scores = [torch.tensor([0.5, 0.1, 0.9, 0.2]), torch.tensor([0.05, 0.3, 0.6, 0.7])]
    cost = lambda removed: float(8 - sum(removed))  # noqa: E731 — channels as the cost
    saving = lambda removed, gi, n=1: float(n)  # noqa: E731
    # remove three channels: the three lowest over both groups, wherever they are
    new = select(scores, [[], []], cost, saving, 5.0, [1, 1], [1, 1])
    assert new == [[1, 3], [0]]
    assert select(scores, [[], []], cost, saving, 5.0, [1, 1], [1, 1]) == new
    # channels pruned before are not candidates again
    assert select(scores, [[1], []], cost, saving, 5.0, [1, 1], [1, 1]) == [[3], [0]]
    # floors: group 0 keeps 3 channels at least
    assert select(scores, [[], []], cost, saving, 5.0, [3, 1], [1, 1]) == [[1], [0, 1]]
    # multiples: group 1 must keep an even count, so it offers blocks of two (its two lowest, mean 0.175)
    assert select(scores, [[], []], cost, saving, 5.0, [1, 2], [1, 2]) == [[1], [0, 1]]
    # a group of 4 with one channel pruned before and multiples of 2 offers a remainder block of one first
    assert select(scores, [[], [0]], cost, saving, 4.0, [1, 2], [1, 2]) == [[1, 3], [1]]


# ---------------------------------------------------------------- the hook


def _linear_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def _trainer(net, hooks, steps=12, lr=0.05):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
    return Trainer(net, data, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                   TrainConfig(steps=steps, lr=lr, batch_size=16, progress=False), hooks=hooks)


def _setup(net, sparsity=0.5, periods=2, period_steps=3, start=2):
    model = Model(module=net, example_inputs={"input": torch.randn(1, 4)})
    graph = model_graph(model)
    groups = candidate_groups(find_groups(graph, net), None)
    costs = CostModel(graph, groups, "macs")
    return model, Hesso(net, groups, costs, costs.total * (1 - sparsity), periods=periods, period_steps=period_steps,
                        start_step=start)


def test_selected_channels_ramp_to_zero_in_their_period_and_stay_zero():
    net = _linear_net()
    model, hesso = _setup(net)
    seen: list[tuple[int, list[list[int]], list[float]]] = []

    def watch(tr):
        norms = []
        for gi, chans in enumerate(hesso.pruned):
            for tensor, axis, index in hesso.slices[gi]:
                if chans:
                    norms.append(float(tensor.detach().index_select(axis, index[chans].reshape(-1)).abs().max()))
        seen.append((tr.step, [list(p) for p in hesso.pruned], norms))

    _trainer(net, [hesso, watch]).fit()
    # periods at steps 3-5 and 6-8 (start_step 2): nothing is pruned before step 5 ends
    assert all(not any(p) for step, p, _ in seen if step < 5)
    after_first = next(p for step, p, _ in seen if step == 5)
    assert any(after_first)
    for step, pruned, norms in seen:
        if step >= 5:
            assert all(n == 0.0 for n in norms), f"a pruned channel is not zero after step {step}"
            for gi, chans in enumerate(after_first):
                assert set(chans) <= set(pruned[gi]), "channels pruned in period 1 must stay pruned"
    # the budget: half the MACs, reached by the end of the last period
    assert hesso.state()["cost_kept"] <= 0.5 + 1e-9
    assert abs(hesso.costs.cost(hesso.removed()) / hesso.costs.total - hesso.state()["cost_kept"]) < 1e-12


def test_hesso_is_deterministic():
    runs = []
    for _ in range(2):
        net = _linear_net()
        _, hesso = _setup(net)
        _trainer(net, [hesso]).fit()
        runs.append(([list(p) for p in hesso.pruned], [p.detach().clone() for p in net.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# ---------------------------------------------------------------- construction on the zoo


def _zoo_loss(inputs):
    def loss(module, batch):
        step = int(batch[0][0])
        g = torch.Generator().manual_seed(step)
        kw = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
        return first_tensor(module(**kw)).float().pow(2).mean()
    return loss


@pytest.mark.parametrize("entry", Z.ZOO, ids=[e.name for e in Z.ZOO])
def test_constructed_network_equals_the_trained_one(entry):
    module, inputs = entry.build()
    model = Model(module=module, example_inputs=inputs)
    graph = model_graph(model)
    groups = candidate_groups(find_groups(graph, module), None)
    assert groups, f"{entry.name}: no candidate group"
    costs = CostModel(graph, groups, "params", shapes={n: tuple(p.shape) for n, p in module.named_parameters()})
    hesso = Hesso(module, groups, costs, costs.fixed + 0.6 * (costs.total - costs.fixed), periods=1, period_steps=2, start_step=0)
    trainer = Trainer(module, TensorDataset(torch.arange(4)), _zoo_loss(inputs),
                      TrainConfig(steps=4, lr=1e-3, batch_size=1, progress=False), hooks=[hesso])
    trainer.fit()
    plan = hesso.plan()
    assert plan, f"{entry.name}: the forced selection selected nothing"
    module.eval()
    with torch.no_grad():
        trained = Z.main_output(module(**inputs)).clone()
    stats = apply_plan(model, plan)
    assert stats["params_removed"] > 0 and not stats.get("groups_refused")
    with torch.no_grad():
        constructed = Z.main_output(model.module(**inputs))
    scale = float(trained.abs().max()) or 1.0
    assert constructed.shape == trained.shape
    assert float((constructed - trained).abs().max()) <= 1e-5 * scale, entry.name


# ---------------------------------------------------------------- the pass and the CLI


def test_hesso_pass_on_the_digits_cnn_hits_its_mac_budget():
    from slimc import api

    net = plain_cnn(0)
    model = Model(module=net, example_inputs={"x": torch.zeros(1, 1, 8, 8)})
    out = api.compress(model, "hesso-70", data="digits", epochs=4, overrides=["hesso.periods=4"])
    st = out.history[-1].stats
    assert st["macs_kept"] <= 0.30 + 1e-9 and st["macs_kept"] == pytest.approx(st["cost_kept"])
    assert st["accuracy_after"] == pytest.approx(st["accuracy_trained"], abs=1e-9)
    assert st["accuracy_after"] > 0.5, st  # four epochs from scratch: well above chance (0.1)
    assert st["accuracy_before"] < 0.3
    assert len(st["training_curve"]) >= 10 and st["training_curve"][-1]["cost_kept"] == pytest.approx(st["cost_kept"])
    assert out.num_parameters() < sum(p.numel() for p in plain_cnn(0).parameters())


def test_hesso_needs_a_training_length():
    from slimc import api

    model = Model(module=plain_cnn(0), example_inputs={"x": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(Exception, match="--epochs N or --steps N"):
        api.compress(model, "hesso-50", data="digits")
    with pytest.raises(Exception, match="unknown training data"):
        api.compress(copy.deepcopy(model), "hesso-50", data="imagenet", epochs=1)


def test_cli_trains_a_pickled_cnn_and_writes_a_pt2(tmp_path):
    from typer.testing import CliRunner

    from slimc.cli.app import app

    src = tmp_path / "net.pt"
    torch.save(plain_cnn(0), src)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(src), "--trust-pickle", "--recipe", "hesso-50", "--data", "digits",
                                   "--epochs", "3", "--set", "hesso.periods=3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    st = report["passes"][0]["stats"]
    assert st["macs_kept"] <= 0.5 + 1e-9 and "accuracy_after" in st
    assert (out / "model.pt2").is_file() and (out / report["training_plot"]).is_file()
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.rand(2, 1, 8, 8)
    assert program(x).shape == (2, 10)


def test_cli_refuses_hesso_without_epochs(tmp_path):
    from typer.testing import CliRunner

    from slimc.cli.app import app

    src = tmp_path / "net.pt"
    torch.save(plain_cnn(0), src)
    res = CliRunner().invoke(app, ["run", str(src), "--trust-pickle", "--recipe", "hesso-50", "--data", "digits",
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--epochs" in res.output and not (tmp_path / "out").exists()




def test_hesso_on_a_causal_lm_trains_on_pydoc_and_reports_perplexity(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimc import api

    from tiny_tokenizer import save_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp_path / "tok", 128)))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    net = LlamaForCausalLM(cfg).eval()
    model = Model(module=net, config=net.config, tokenizer=tok, source_format="hf")
    params = model.num_parameters()
    out = api.compress(model, "hesso-50", data="pydoc", steps=8,
                       overrides=["hesso.budget=params", "hesso.scope=groups", "hesso.sparsity=0.3", "hesso.periods=2",
                                  "hesso.start=0.0", "hesso.span=0.5", "hesso.roles=[attention.kv_group, mlp.neuron]",
                                  "hesso.samples=16", "hesso.seq_len=32", "hesso.batch_size=4", "hesso.lr=1e-3",
                                  "hesso.eval_points=2"])
    st = out.history[-1].stats
    assert st["data"] == "pydoc" and st["steps"] == 8
    assert st["perplexity_after"] == pytest.approx(st["perplexity_trained"], rel=1e-6)
    assert math.isfinite(st["perplexity_before"]) and st["cost_kept"] < 1.0
    assert out.num_parameters() < params
    ids = torch.randint(0, 128, (1, 9))
    assert out.module(input_ids=ids).logits.shape == (1, 9, 128)
    with pytest.raises(Exception, match="language model"):
        api.compress(Model(module=LlamaForCausalLM(cfg).eval(), config=cfg, tokenizer=tok, source_format="hf"), "hesso-50",
                     data="digits", steps=2)
