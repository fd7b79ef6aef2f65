"""FLAP: maths on tiny tensors, GQA unit costs, surgery exactness, compensation, SmolLM2 quality."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext
from slimc.compiler.pipeline.recipes import load_recipe
from slimc.compiler.surgery import apply_plan, mask_plan
from slimc.errors import SlimcError
from slimc.passes.flap import Flap, FlapConfig, compensate, plan_flap
from slimc.passes.structured import allocators as al
from slimc.passes.structured import compensation as comp
from slimc.passes.structured import criteria as cr


def tiny_llama(layers: int = 3, kv: int = 2, heads: int = 4, head_dim: int = 16, hidden: int = 32, inter: int = 48, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)
    return Model(module=LlamaForCausalLM(cfg).eval(), config=cfg)


def calib(n: int = 16, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def kv_group_cost(group_size: int, head_dim: int, hidden: int) -> int:
    """Weights of one KV group by hand: G q heads + 1 k + 1 v head (rows) and G heads of o_proj (columns)."""
    return (2 * group_size + 2) * head_dim * hidden


def neuron_cost(hidden: int) -> int:
    """Weights of one gated-MLP neuron by hand: a gate row, an up row and a down column."""
    return 3 * hidden


def attn_mlp_params(model: Model) -> int:
    return sum(p.numel() for v in decoder_layers(model) for path in (v.attn, v.mlp)
               for n, p in model.module.get_submodule(path).named_parameters() if n.endswith("weight"))


# ---- maths on tiny tensors ---------------------------------------------------------------------


def test_metrics_on_a_hand_example():
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]])
    var = torch.tensor([0.5, 2.0, 4.0])
    ms = torch.tensor([4.0, 9.0, 16.0])
    torch.testing.assert_close(cr.flap_channel_scores("ifv", w, var, ms), var.double())
    torch.testing.assert_close(cr.flap_channel_scores("wifv", w, var, ms), torch.tensor([5.0, 8.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(cr.flap_channel_scores("wifn", w, var, ms), torch.tensor([2.0 * 2, 1.0 * 3, 0.5 * 4], dtype=torch.float64))
    with pytest.raises(ValueError):
        cr.flap_channel_scores("l2", w, var, ms)


def test_standardize_and_unit_scores():
    z = cr.standardize(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    assert abs(float(z.mean())) < 1e-12 and abs(float(z.std()) - 1.0) < 1e-12
    assert torch.equal(cr.standardize(torch.ones(4)), torch.zeros(4))
    # unit score = mean of its channels' scores, not squared (reference issue #6)
    s = torch.tensor([-1.0, -3.0, 2.0, 4.0])
    torch.testing.assert_close(cr.unit_mean(s, torch.tensor([[0, 1], [2, 3]])), torch.tensor([-2.0, 3.0]))


def test_select_global_weighs_units_by_cost_and_keeps_the_floor():
    # one expensive unit (cost 10) with a middling score, cheap units (cost 1) around it
    big = al.UnitSet(0, "attn", torch.tensor([0.5, -5.0]), cost=10, min_keep=1)
    small = al.UnitSet(0, "mlp", torch.tensor([1.0, 0.9, 0.1, -1.0, -2.0]), cost=1, min_keep=1)
    a, m = al.select_global([big, small], keep_cost=13)
    assert a.tolist() == [True, False]
    assert m.tolist() == [True, True, True, False, False]  # 10 + 3 = 13
    # floor: a set whose units all score low still keeps min_keep
    low = al.UnitSet(1, "attn", torch.tensor([-9.0, -8.0]), cost=10, min_keep=1)
    masks = al.select_global([low, small], keep_cost=2)
    assert masks[0].tolist() == [False, True]
    assert int(masks[0].sum()) * 10 + int(masks[1].sum()) >= 10


def test_allocate_structures():
    attn = [al.UnitSet(i, "attn", torch.tensor([float(i), -float(i)]), cost=6) for i in range(2)]
    mlp = [al.UnitSet(i, "mlp", torch.arange(12, dtype=torch.float64) * (1 + i), cost=1) for i in range(2)]
    a, m = al.allocate(attn, mlp, 0.5, "UL-UM")
    assert [int(x.sum()) for x in a] == [1, 1] and [int(x.sum()) for x in m] == [6, 6]
    assert m[0][6:].all() and not m[0][:6].any()  # top-k by score
    a, m = al.allocate(attn, mlp, 0.5, "AL-AM")
    kept = sum(int(x.sum()) * 6 for x in a) + sum(int(x.sum()) for x in m)
    assert abs(kept - 24) <= 6  # within one unit's cost of (1 - p) * 48
    # manual module ratio: attention keeps all, MLP carries the whole cut
    a, m = al.allocate(attn, mlp, 0.25, "AL-MM", attn_sparsity=0.0)
    assert all(x.all() for x in a) and sum(int(x.sum()) for x in m) == 12
    with pytest.raises(SlimcError, match="cannot reach"):
        al.allocate(attn, mlp, 0.9, "UL-MM", attn_sparsity=0.0)


def test_round_keep():
    scores = torch.arange(20, dtype=torch.float64)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[19, 18, 17, 16, 15, 3]] = True  # 6 kept -> rounds to 8, adding the best removed
    (r,) = al.round_keep([mask], [scores], 8)
    assert int(r.sum()) == 8 and r[[14, 13]].all() and r[3]
    mask2 = torch.zeros(20, dtype=torch.bool)
    mask2[[19, 18, 17]] = True  # 3 -> at least one multiple
    assert int(al.round_keep([mask2], [scores], 8)[0].sum()) == 8
    assert torch.equal(al.round_keep([mask], [scores], 1)[0], mask)
    full = torch.ones(20, dtype=torch.bool)  # all kept stays all kept, even off a multiple
    assert int(al.round_keep([full], [scores], 8)[0].sum()) == 20


def test_round_keep_pooled_keeps_total_and_rounds_up_the_best():
    # two layers of 32 neurons keeping 12 each (24 in all): one rounds up to 16, the other down to 8,
    # and the one whose next units score higher is the one rounded up
    a = torch.linspace(0.0, 1.0, 32, dtype=torch.float64)
    b = torch.linspace(0.0, 2.0, 32, dtype=torch.float64)
    masks = [al.top_k_mask(a, 12), al.top_k_mask(b, 12)]
    ra, rb = al.round_keep(masks, [a, b], 8)
    assert (int(ra.sum()), int(rb.sum())) == (8, 16)
    assert torch.equal(ra, al.top_k_mask(a, 8)) and torch.equal(rb, al.top_k_mask(b, 16))


def test_mean_bias_identity_on_random_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 10, generator=g, dtype=torch.float64) * 2 + torch.linspace(-3, 3, 10, dtype=torch.float64)
    w = torch.randn(4, 10, generator=g, dtype=torch.float64)
    removed = torch.tensor([1, 4, 7])
    kept = torch.tensor([0, 2, 3, 5, 6, 8, 9])
    b = comp.mean_bias(w, x.mean(0), removed)
    torch.testing.assert_close((x[:, kept] @ w[:, kept].T + b).mean(0), (x @ w.T).mean(0), rtol=1e-10, atol=1e-10)


def test_lsq_compensation_keeps_the_mean_and_reconstructs_better():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    mix = torch.randn(4, 10, generator=g, dtype=torch.float64)
    x = base @ mix + 0.05 * torch.randn(2000, 10, generator=g, dtype=torch.float64) + 1.5  # correlated channels
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    removed, kept = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 4, 6, 7, 8, 9])
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    w_k, b = comp.lsq_compensation(w, mu, cov, kept, removed, ridge=1e-6)
    y = x @ w.T
    y_lsq = x[:, kept] @ w_k.T + b
    y_mean = x[:, kept] @ w[:, kept].T + comp.mean_bias(w, mu, removed)
    torch.testing.assert_close(y_lsq.mean(0), y.mean(0), rtol=1e-9, atol=1e-9)
    err_lsq = ((y_lsq - y) ** 2).mean()
    err_mean = ((y_mean - y) ** 2).mean()
    assert err_lsq < 0.05 * err_mean, (float(err_lsq), float(err_mean))


def test_lsq_cross_with_dense_inputs_equals_lsq():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(800, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64) + 0.7
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    kept, removed = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4, 5, 7])
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    w1, b1 = comp.lsq_compensation(w, mu, cov, kept, removed, ridge=1e-3)
    w2, b2 = comp.lsq_cross(w, kept, mu, mu[kept], cov[:, kept], cov[kept][:, kept], ridge=1e-3)
    torch.testing.assert_close(w2, w1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b2, b1, rtol=1e-9, atol=1e-9)


# ---- GQA unit costs from real shapes --------------------------------------------------------------


def _meta_llama(**cfg) -> Model:
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        module = LlamaForCausalLM(config)
    return Model(module=module, config=config)


@pytest.mark.parametrize(
    "cfg, kv_cost, mlp_cost",
    [
        # SmolLM2-135M: 9 q heads over 3 KV heads (G=3), head_dim 64, hidden 576 -> (2*3+2)*64*576
        (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=64), 294_912, 1_728),
        # Llama-3-8B-like: 32 q heads over 8 KV heads (G=4), head_dim 128, hidden 4096 -> (2*4+2)*128*4096
        (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8, head_dim=128), 5_242_880, 12_288),
    ],
)
def test_gqa_unit_costs_match_hand_computed_values(cfg, kv_cost, mlp_cost):
    model = _meta_llama(vocab_size=128, **cfg)
    view = decoder_layers(model)[0]
    shapes = model.state_shapes()
    assert view.kv_group.numel_per_channel(shapes) == kv_cost
    assert kv_group_cost(view.group_size, view.head_dim, cfg["hidden_size"]) == kv_cost
    assert view.mlp_neuron.numel_per_channel(shapes) == mlp_cost == neuron_cost(cfg["hidden_size"])


# ---- the pass on tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
@pytest.mark.parametrize("structure", ["AL-AM", "UL-UM", "AL-MM"])
def test_achieved_fraction_hits_target_within_one_unit(sparsity, structure):
    model = tiny_llama(layers=4, kv=4, heads=8, head_dim=8, hidden=32, inter=64)
    before = attn_mlp_params(model)
    res = Flap(sparsity=sparsity, structure=structure)(model, PassContext(calibration=calib()))
    after = attn_mlp_params(model)
    unit = max(kv_group_cost(2, 8, 32), neuron_cost(32))
    assert abs((before - after) - sparsity * before) <= unit, (before, after)
    assert res.stats["sparsity"] == pytest.approx((before - after) / before)
    assert res.modified
    for v in decoder_layers(model):  # GQA stays GQA: G query heads per kept KV head
        assert v.group_size == 2 and v.num_kv_heads >= 1 and v.intermediate_size >= 1


def test_mask_then_remove_is_exact():
    model = tiny_llama()
    cfg = FlapConfig(sparsity=0.4, compensation="lsq")
    fp = plan_flap(model, calib(), cfg)
    masked, removed = model.clone(), model.clone()
    for m in (masked, removed):
        compensate(m.module, fp.compensations)
    mask_plan(masked.module, fp.plan)
    apply_plan(removed.module, fp.plan)
    ids = calib(2, 10, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(removed.module(ids).logits, masked.module(ids).logits, rtol=1e-5, atol=1e-5)
    assert removed.num_parameters() < masked.num_parameters()


@pytest.mark.parametrize("compensation", ["mean", "lsq"])
def test_bias_compensation_keeps_layer_mean_output(compensation):
    """Layer 0 sees the same inputs before and after pruning: its o_proj mean output is unchanged."""
    dense = tiny_llama(seed=2)
    pruned = dense.clone()
    tokens = calib()
    # UL-UM: every layer, layer 0 included, loses a share of its KV groups and neurons
    Flap(sparsity=0.4, structure="UL-UM", compensation=compensation)(pruned, PassContext(calibration=tokens))
    outs = {}
    for name, m in (("dense", dense), ("pruned", pruned)):
        seen = []
        h = m.module.model.layers[0].self_attn.o_proj.register_forward_hook(lambda mod, a, o: seen.append(o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            m.module(input_ids=tokens, use_cache=False)
        h.remove()
        outs[name] = torch.cat(seen).double()
    assert pruned.module.model.layers[0].self_attn.o_proj.bias is not None
    torch.testing.assert_close(outs["pruned"].mean(0), outs["dense"].mean(0), rtol=1e-4, atol=1e-5)


def test_better_compensation_tracks_the_dense_model_closer():
    """On held-out tokens the pruned logits move less from dense with lsq, least with lsq-seq."""
    dense = tiny_llama(layers=4, kv=4, heads=8, head_dim=8, hidden=32, inter=64)
    tokens, held = calib(64, 16, seed=1), calib(64, 16, seed=2)
    with torch.no_grad():
        ref = dense.module(held).logits
    err = {}
    for mode in ("mean", "lsq", "lsq-seq"):
        m = dense.clone()
        res = Flap(sparsity=0.5, compensation=mode, lsq_ridge=1e-3)(m, PassContext(calibration=tokens))
        assert res.stats["params_removed"] == pytest.approx(0.5 * attn_mlp_params(dense), abs=kv_group_cost(2, 8, 32))
        with torch.no_grad():
            err[mode] = float(((m.module(held).logits - ref) ** 2).mean())
    # measured: mean 3.7e-3, lsq 1.2e-3, lsq-seq 1.0e-3
    assert err["lsq-seq"] < err["lsq"] < 0.5 * err["mean"], err


def test_no_bias_compensation_leaves_linears_without_bias():
    model = tiny_llama()
    Flap(sparsity=0.4, bias_compensation=False)(model, PassContext(calibration=calib()))
    assert all(l.self_attn.o_proj.bias is None and l.mlp.down_proj.bias is None for l in model.module.model.layers)


def test_floor_and_rounding():
    model = tiny_llama(layers=2, inter=64)
    res = Flap(sparsity=0.6, round_neurons_to=8)(model, PassContext(calibration=calib()))
    for layer in res.stats["layers"]:
        assert layer["kv_groups"] >= 1 and layer["neurons"] % 8 == 0 and layer["neurons"] >= 8


def test_square_attn_squares_attention_channel_scores_only():
    from slimc.compiler.calibration.stats import collect_input_stats
    from slimc.passes.flap import flap_targets
    from slimc.passes.structured.units import decoder_units

    model = tiny_llama()
    stats = collect_input_stats(model, calib(), flap_targets(model))
    tensors = dict(model.module.named_parameters())
    crit = cr.CRITERIA["flap-wifv"]
    (attn, mlp), *_ = decoder_units(model)
    sq, plain = (cr.ScoreInputs(tensors, stats, options={"square_attn": s}) for s in (True, False))
    assert torch.equal(crit.fn(mlp, sq), crit.fn(mlp, plain))
    path = attn.out_proj
    ch = cr.flap_channel_scores("wifv", model.module.get_submodule(path).weight, stats[path].var, stats[path].sqnorm / stats[path].count)
    assert torch.allclose(crit.fn(attn, sq), cr.unit_mean(cr.standardize(ch * ch), attn.out_index))
    assert torch.allclose(crit.fn(attn, plain), cr.unit_mean(cr.standardize(ch), attn.out_index))
    assert FlapConfig().square_attn  # the reference code's behaviour is the default


def test_zero_sparsity_is_a_no_op():
    model = tiny_llama()
    n = model.num_parameters()
    res = Flap(sparsity=0.0)(model, PassContext(calibration=calib()))
    assert not res.modified and model.num_parameters() == n


def test_config_validation_and_recipes():
    with pytest.raises(ValueError):
        FlapConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="lsq"):
        FlapConfig(compensation="lsq", bias_compensation=False)
    with pytest.raises(ValueError):
        FlapConfig(metric="l1")
    with pytest.raises(ValueError):
        FlapConfig(bogus=1)
    assert FlapConfig.model_validate(FlapConfig(sparsity=0.3).model_dump()) == FlapConfig(sparsity=0.3)
    for name, p in (("flap-20", 0.2), ("flap-30", 0.3), ("flap-50", 0.5)):
        (flap,) = load_recipe(name).build()
        assert flap.config.sparsity == p and flap.config.samples == 128 and flap.config.seq_len == 128 and flap.config.seed == 0
        assert flap.config.compensation == "mean" and flap.config.square_attn
        assert flap.config.round_neurons_to == (1 if p == 0.5 else 8)
    for name, p in (("flap-lsq-20", 0.2), ("flap-lsq-50", 0.5)):
        (flap,) = load_recipe(name).build()
        assert flap.config.sparsity == p and flap.config.compensation == "lsq" and flap.config.seed == 0


def test_model_without_tokenizer_or_calibration_is_a_slimc_error():
    with pytest.raises(SlimcError, match="tokenizer"):
        Flap(sparsity=0.2)(tiny_llama(), PassContext())


# ---- SmolLM2 quality (slow) ------------------------------------------------------------------------


@pytest.mark.slow
def test_flap_20_on_smollm2_keeps_perplexity():
    from slimc.compiler.calibration.evaluation import heldout_tokens, perplexity
    from slimc.compiler.frontends.loaders import load

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dense = load("smollm2")
    ev = heldout_tokens(dense.tokenizer)
    # floors from BENCHMARKS.md (16 x 512 pydoc held-out windows; dense 12.05, reference FLAP 17.08):
    # flap-20 must be at least as good as the reference code (issue 5's bar)
    for recipe, floor in (("flap-20", 17.1), ("flap-lsq-20", 15.0)):  # measured 17.00 and 14.57
        model = dense.clone()
        res = Flap(**load_recipe(recipe).passes[0][1])(model, PassContext())
        assert abs(res.stats["sparsity"] - 0.2) < 0.01
        ppl = perplexity(model, ev, seq_len=512, max_windows=16)
        assert ppl < floor, (recipe, ppl)


# ---- checkpoint round trip (HF emitter and loader) ---------------------------------------------------


def _roundtrip(model: Model, out) -> None:
    from slimc.compiler.emit.save import save
    from slimc.compiler.frontends.loaders import load

    save(model, out, format="hf")
    back = load(out)
    ids = calib(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(back.module(ids).logits, model.module(ids).logits, rtol=0, atol=1e-5)
    return back


def test_per_layer_checkpoint_round_trip(tmp_path):
    model = tiny_llama(layers=3, kv=4, heads=8, head_dim=8, hidden=32, inter=64)
    Flap(sparsity=0.5, structure="AL-AM")(model, PassContext(calibration=calib()))
    widths = {(v.num_kv_heads, v.intermediate_size) for v in decoder_layers(model)}
    assert len(widths) > 1  # adaptive: layers differ, so the per-layer config is exercised
    back = _roundtrip(model, tmp_path / "out")
    assert [l.mlp.down_proj.bias is not None for l in back.module.model.layers] == [True] * 3


@pytest.mark.slow
def test_flap_50_smollm2_round_trip(tmp_path):
    from slimc.compiler.frontends.loaders import load

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load("smollm2")
    Flap(**load_recipe("flap-50").passes[0][1])(model, PassContext())
    _roundtrip(model, tmp_path / "out")
