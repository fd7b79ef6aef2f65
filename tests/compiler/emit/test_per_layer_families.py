"""Per-layer pruned checkpoints of every decoder family: one generic resized form, loaded as the stock class.

Each family's tiny random model (the zoo's causal LMs, plus a few families the zoo does not hold) is
pruned through the coupled-group analysis and the surgery with a different number of channels in each
layer, and a layer-0 `o_proj` / `down_proj` without a bias gets one (FLAP's compensation). `slimc.save`
writes it (its reload check compares logits), then the checkpoint must load through remote code as the
stock class with the same logits, generate the same greedy tokens with and without the KV cache, and
load through `slimc.load` as the same stock class.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from slimc.compiler.analysis.coupling import model_groups
from slimc.compiler.emit.save import save
from slimc.compiler.frontends.loaders import load
from slimc.compiler.groups import Role
from slimc.compiler.model import Model
from slimc.compiler.surgery import apply_plan

import zoo_models as Z  # noqa: E402  (benchmarks/ is on pytest's pythonpath)

ATOL = 1e-4
NEW_TOKENS = 8


EXTRA = {
    "falcon": Z.extra_causal_lm("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                new_decoder_architecture=True, num_kv_heads=2),
    "gptj": Z.extra_causal_lm("GPTJConfig", n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "starcoder2": Z.extra_causal_lm("Starcoder2Config", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64),
    "gemma2": Z.extra_causal_lm("Gemma2Config", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "bloom": Z.extra_causal_lm("BloomConfig", hidden_size=32, n_layer=2, n_head=4),
    "gpt-bigcode": Z.extra_causal_lm("GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=4, n_positions=64),
}

# every causal LM of the zoo (they are the entries its `_causal_lm` builds), then the extra families
ZOO_LMS = [e.name for e in Z.ZOO if e.build.__qualname__.startswith("_causal_lm.")]
FAMILIES = ZOO_LMS + sorted(EXTRA)

# head-count attributes the model's forward reads, which the surgery updates and the record must carry
EXPECT_ATTRIBUTES = {"gpt2": {"num_heads", "split_size"}, "opt": {"num_heads"}, "gptj": {"num_attention_heads"}}
# families the analysis offers no prunable group for: none today (keep the reason here when one appears)
NO_PRUNABLE_GROUP: dict[str, str] = {}


def build(name: str) -> nn.Module:
    return EXTRA[name]() if name in EXTRA else Z.by_name(name).build()[0]


def prune_per_layer(model: Model) -> dict:
    """Layer i loses (i + 1) units of every exactly removable group (kept sizes stay multiples of the
    group's `multiple_of`), so layers end up with different widths. Returns the plan."""
    plan = {}
    for g in model_groups(model):
        if not (g.prunable and g.exact and g.layer is not None and g.size > g.multiple_of):
            continue
        n = min((g.layer + 1) * g.multiple_of, g.size - g.multiple_of)
        step = max(1, g.size // n)
        plan[g] = list(range(0, g.size, step))[:n]
    apply_plan(model, plan)
    return plan


def add_compensation_biases(module: nn.Module) -> list[str]:
    """FLAP-style: a bias on layer 0's o_proj / down_proj where the architecture has none."""
    added = []
    for path, mod in module.named_modules():
        if path.rsplit(".", 1)[-1] in ("o_proj", "down_proj") and ".0." in path and isinstance(mod, nn.Linear) and mod.bias is None:
            mod.bias = nn.Parameter(torch.randn(mod.out_features, generator=torch.Generator().manual_seed(len(added))) * 0.1)
            added.append(f"{path}.bias")
    return added


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, Z.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


@torch.no_grad()
def logits(module: nn.Module) -> torch.Tensor:
    ids, mask = probe()
    return module(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def greedy(module: nn.Module, use_cache: bool) -> list[int]:
    ids, mask = probe()
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=use_cache)
    with torch.no_grad():
        out = module.generate(input_ids=ids[:1], attention_mask=mask[:1], generation_config=cfg)
    return out[0, ids.shape[1]:].tolist()


def save_pruned(name: str, out, extra_plan=None) -> tuple[nn.Module, dict, dict]:
    if name in NO_PRUNABLE_GROUP:
        pytest.skip(NO_PRUNABLE_GROUP[name])
    m = build(name)
    model = Model(module=m, config=m.config)
    plan = prune_per_layer(model)
    assert plan, f"{name}: the analysis offers no exactly removable group (add it to NO_PRUNABLE_GROUP with the reason)"
    if extra_plan is not None:
        extra_plan(model)
    added = add_compensation_biases(m)
    report = save(model, out)  # format hf: written, re-loaded with slimc.load and compared
    assert report["verification"]["hf"]["max_abs_diff"] < ATOL
    cfg = json.loads((out / "config.json").read_text())
    return m, cfg, {"added": added, "report": report}


@pytest.mark.parametrize("name", FAMILIES)
def test_per_layer_pruned_family_round_trips_as_its_stock_class(name, tmp_path):
    out = tmp_path / "ckpt"
    m, cfg, info = save_pruned(name, out)
    assert info["report"]["output"]["written"]["hf"]["per_layer"] is True
    assert cfg["model_type"] == "slimc_resized" and (out / "modeling_slimc_resized.py").is_file()
    base, record = cfg["base_config"], cfg["slimc_resize"]
    assert (base["model_type"], base["architectures"]) == (m.config.model_type, [type(m).__name__])
    # the widths differ between layers 0 and 1
    shapes = record["shapes"]
    assert any(shapes.get(k.replace(".0.", ".1.", 1)) != v for k, v in shapes.items() if ".0." in k), shapes
    assert sorted(record["new_parameters"]) == sorted(info["added"])
    attrs = {a for per_module in record["attributes"].values() for a in per_module}
    assert EXPECT_ATTRIBUTES.get(name, set()) <= attrs

    ref = logits(m)
    want = greedy(m, use_cache=True)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote) is type(m) and not remote.training
    assert float((logits(remote) - ref).abs().max()) < ATOL
    assert greedy(remote, use_cache=True) == greedy(remote, use_cache=False) == want
    assert len(want) == NEW_TOKENS

    ours = load(out)
    assert type(ours.module) is type(m)
    assert float((logits(ours.module) - ref).abs().max()) < ATOL
    assert ours.num_parameters() == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_moe_with_an_expert_removed_and_per_layer_expert_widths(name, tmp_path):
    """Removing an expert is not exact (the router's softmax changes), but the checkpoint must still
    reproduce the pruned model: the expert count attributes are part of the record."""

    def drop_expert(model: Model) -> None:
        experts = [g for g in model_groups(model) if g.role == Role.EXPERT and g.prunable and g.layer == 0]
        assert experts, f"{name}: no prunable expert group"
        apply_plan(model, {experts[0]: [1]})

    out = tmp_path / "ckpt"
    m, cfg, _ = save_pruned(name, out, extra_plan=drop_expert)
    attributes = cfg["slimc_resize"]["attributes"]
    assert attributes["model.layers.0.mlp.experts"]["num_experts"] == 3
    assert "model.layers.1.mlp.experts" not in attributes or "num_experts" not in attributes["model.layers.1.mlp.experts"]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote) is type(m)
    assert float((logits(remote) - logits(m)).abs().max()) < ATOL
    assert greedy(remote, use_cache=True) == greedy(remote, use_cache=False) == greedy(m, use_cache=True)


def test_bfloat16_per_layer_checkpoint_reloads_in_bfloat16(tmp_path):
    m = build("qwen2-gqa")
    model = Model(module=m, config=m.config)
    prune_per_layer(model)
    add_compensation_biases(m)
    model.place(dtype=torch.bfloat16)
    save(model, tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == cfg["base_config"]["dtype"] == "bfloat16"
    ours = load(tmp_path / "bf16")
    assert {p.dtype for p in ours.module.parameters()} == {torch.bfloat16}
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", trust_remote_code=True)
    assert next(remote.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(remote), logits(m))


NO_ONNX = {"mixtral": "grouped_mm has no ONNX translation", "qwen2-moe": "grouped_mm has no ONNX translation"}


@pytest.mark.parametrize("name", FAMILIES)
def test_per_layer_pruned_family_exports_to_onnx_with_ort_parity(name, tmp_path):
    if name in NO_ONNX:
        pytest.skip(NO_ONNX[name])
    if name in NO_PRUNABLE_GROUP:
        pytest.skip(NO_PRUNABLE_GROUP[name])
    m = build(name)
    model = Model(module=m, config=m.config)
    assert prune_per_layer(model)
    add_compensation_biases(m)
    report = save(model, tmp_path / "onnx", format="onnx")  # verification: ONNX Runtime against PyTorch
    assert report["verification"]["onnx"]["ok"]


# families whose uniformly pruned heads no stock config can state (each MLP-only result still is stock)
HEADS_NEED_RESIZED = {
    "llama-mha": "hidden_size must be divisible by the head count (transformers validates it)",
    "qwen2-mha": "hidden_size must be divisible by the head count (transformers validates it)",
    "gpt2": "head_dim is hidden / n_head", "gpt-neox": "head_dim is hidden / heads",
    "opt": "head_dim is hidden / heads", "gptj": "head_dim is hidden / n_head",
}
# families whose MLP width is not a config key at all
MLP_NEEDS_RESIZED = {"bloom": "the MLP width is fixed at 4 x hidden_size"}


def prune_uniformly(model: Model, roles: set[str] | None) -> dict:
    """Every decoder layer loses the same units (`multiple_of` channels of each exactly removable group,
    restricted to `roles` when given)."""
    plan = {g: list(range(g.multiple_of)) for g in model_groups(model)
            if g.prunable and g.exact and g.layer is not None and g.size > 2 * g.multiple_of
            and (roles is None or g.role in roles)}
    apply_plan(model, plan)
    return plan


@pytest.mark.parametrize("name", FAMILIES)
def test_uniformly_pruned_family_writes_its_stock_config(name, tmp_path):
    """Same widths in every layer: config.json is the family's own, loadable without remote code."""
    for what, roles, resized_why in (("mlp", {Role.MLP_NEURON, Role.EXPERT_NEURON}, MLP_NEEDS_RESIZED.get(name)),
                                     ("all", None, MLP_NEEDS_RESIZED.get(name) or HEADS_NEED_RESIZED.get(name))):
        m = build(name)
        model = Model(module=m, config=m.config)
        if not prune_uniformly(model, roles):
            assert what == "mlp", f"{name}: nothing uniformly removable"
            continue  # no group labelled an MLP neuron (Falcon): the "all" round prunes what is there
        out = tmp_path / what
        report = save(model, out)
        cfg = json.loads((out / "config.json").read_text())
        if resized_why:
            assert cfg["model_type"] == "slimc_resized", resized_why
            continue
        assert report["output"]["written"]["hf"]["per_layer"] is False
        assert cfg["model_type"] == m.config.model_type and not (out / "modeling_slimc_resized.py").exists()
        stock = AutoModelForCausalLM.from_pretrained(out)
        assert type(stock) is type(m)
        assert float((logits(stock) - logits(m)).abs().max()) < ATOL
