"""FLAP: fluctuation-based adaptive structured pruning of decoder LLMs (An et al., AAAI 2024).

One calibration pass of the dense model collects, at the input of every o_proj and down_proj, the
mean and variance of each channel. Each input channel j gets a score (default WIFV:
var_j * ||W[:, j]||^2; attention channel scores are squared, as in the reference code, unless
`square_attn: false`); scores are z-scored per (layer, module); a KV group (one KV head and its G
query heads) scores the mean of its G*head_dim o_proj channels, a neuron its down_proj channel.
With the default structure (AL-AM) all units of all layers compete in one pool and the
highest-scoring are kept until the kept parameters are nearest (1 - sparsity) of the decoder's
attention+MLP parameters; a KV group costs (2G+2)*head_dim*hidden parameters, a neuron 3*hidden.
Removed channels are compensated by a bias on o_proj / down_proj, b = W[:, R] mean(x_R), so the
layer's mean output on calibration data is unchanged; `compensation: lsq` also refits the kept
columns by least squares on the dense statistics (see `_flap_math`), and `compensation: lsq-seq`
refits layer by layer against the dense model's outputs on the already-pruned prefix (see
`_compensation`).

    name: flap-20
    passes:
      - flap: {sparsity: 0.2, metric: wifv, structure: AL-AM, samples: 128, seq_len: 128, seed: 0}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimc.compiler.analysis.llm import DecoderLayerView, decoder_layers
from slimc.compiler.calibration.stats import InputStats, collect_input_stats
from slimc.compiler.groups import Group
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import (
    NEEDS_CALIBRATION,
    NEEDS_DECODER_LM,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
    register_pass,
)
from slimc.compiler.surgery import apply_plan
from slimc.errors import PostconditionError
from slimc.passes import _flap_math as fm
from slimc.passes._compensation import sequential_lsq


class FlapConfig(PassConfig):
    sparsity: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of decoder attention+MLP parameters to remove")
    metric: Literal["ifv", "wifv", "wifn"] = "wifv"
    structure: Literal["UL-UM", "UL-MM", "AL-MM", "AL-AM"] = "AL-AM"
    attn_sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="UL-MM/AL-MM: attention's own removal fraction")
    bias_compensation: bool = True
    compensation: Literal["mean", "lsq", "lsq-seq"] = "mean"
    square_attn: bool = Field(True, description="square the attention channel scores before z-scoring, as the reference code does (false: the paper's formula)")
    lsq_ridge: float = Field(0.01, gt=0.0, description="lsq: ridge, relative to the mean kept-channel variance")
    calibration: str = Field("pydoc", description="calibration text when the context gives none: pydoc, .txt, .jsonl")
    samples: int = Field(128, ge=1)
    seq_len: int = Field(128, ge=2)
    seed: int | None = Field(None, description="window seed; default: the context's seed")
    batch_size: int = Field(8, ge=1)
    round_neurons_to: int = Field(1, ge=1, description="round each layer's kept MLP width to a multiple of this (the total kept stays nearest the target)")
    min_kv_groups: int = Field(1, ge=1, description="KV groups every layer keeps (removing all attention is not supported)")
    min_neurons: int = Field(1, ge=0, description="neurons every layer keeps; 0 allows dropping a whole MLP")

    @model_validator(mode="after")
    def _check(self) -> "FlapConfig":
        if self.compensation != "mean" and not self.bias_compensation:
            raise ValueError(f"compensation '{self.compensation}' includes the mean bias; set bias_compensation: true or use compensation: mean")
        if self.attn_sparsity is not None and self.structure not in ("UL-MM", "AL-MM"):
            raise ValueError("attn_sparsity only applies to structures UL-MM and AL-MM")
        return self


def add_output_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    """Add `bias` to a Linear's output, creating its bias parameter when it has none."""
    b = bias.to(dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        if linear.bias is None:
            linear.bias = nn.Parameter(b.clone(), requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.add_(b)


def _input_slice(group: Group, param: str) -> torch.Tensor:
    """index [units, k] of the input columns of `param` owned by each unit of `group`."""
    for s in group.slices:
        if s.param == param and s.axis == 1:
            return s.index
    raise RuntimeError(f"group {group.name} has no input slice of {param}")


@dataclass
class Compensation:
    """Edits to one o_proj/down_proj before its inputs are removed: new kept columns, added bias."""

    linear: str  # module path
    bias: torch.Tensor  # [d_out] float64, added to the output
    kept: torch.Tensor | None = None  # kept input columns whose weights change (lsq)
    weight: torch.Tensor | None = None  # [d_out, len(kept)] their new weights (lsq)


@dataclass
class FlapPlan:
    plan: dict  # {Group: unit indices to remove}, for surgery.apply_plan / mask_plan
    compensations: list[Compensation]
    stats: dict[str, Any] = field(default_factory=dict)


def compensate(module: nn.Module, compensations: list[Compensation]) -> None:
    """Apply a plan's weight refits and output biases (before the channels are removed)."""
    for c in compensations:
        linear = module.get_submodule(c.linear)
        if c.weight is not None:
            with torch.no_grad():
                linear.weight[:, c.kept] = c.weight.to(linear.weight.dtype)
        add_output_bias(linear, c.bias)


def flap_targets(model: Model) -> list[str]:
    """The modules whose input statistics FLAP needs: every o_proj and down_proj."""
    return [p for v in decoder_layers(model) for p in (f"{v.attn}.o_proj", f"{v.mlp}.down_proj")]


def plan_flap(model: Model, tokens: torch.LongTensor, cfg: "FlapConfig", stats: dict[str, InputStats] | None = None) -> FlapPlan:
    """Score units on calibration `tokens` and choose what to remove; the model is not changed.

    `stats` (from `collect_input_stats` on `flap_targets`) skips the calibration run.
    """
    module = model.module
    views = decoder_layers(model)
    t0 = time.perf_counter()
    if stats is None:
        stats = collect_input_stats(model, tokens, flap_targets(model), gram=cfg.compensation == "lsq", batch_size=cfg.batch_size)
    t_cal = time.perf_counter() - t0
    attn_sets, mlp_sets = unit_sets(module, views, stats, cfg)
    attn_keep, mlp_keep = fm.allocate(attn_sets, mlp_sets, cfg.sparsity, cfg.structure, cfg.attn_sparsity)
    mlp_keep = fm.round_keep(mlp_keep, [s.scores for s in mlp_sets], cfg.round_neurons_to)
    total = sum(s.total for s in attn_sets + mlp_sets)
    plan: dict = {}
    comps: list[Compensation] = []
    removed_cost = 0
    layers = []
    for v, a_set, a_keep, m_set, m_keep in zip(views, attn_sets, attn_keep, mlp_sets, mlp_keep):
        a_rm = (~a_keep).nonzero().squeeze(1)
        m_rm = (~m_keep).nonzero().squeeze(1)
        removed_cost += a_rm.numel() * a_set.cost + m_rm.numel() * m_set.cost
        plan[v.kv_group] = a_rm
        plan[v.mlp_neuron] = m_rm
        if cfg.bias_compensation and cfg.compensation != "lsq-seq":  # lsq-seq refits while it prunes
            for path, group, rm in ((f"{v.attn}.o_proj", v.kv_group, a_rm), (f"{v.mlp}.down_proj", v.mlp_neuron, m_rm)):
                if rm.numel():
                    index = _input_slice(group, f"{path}.weight")
                    comps.append(_compensation(module, path, stats[path], index[rm].reshape(-1), cfg))
        layers.append({"kv_groups": int(a_keep.sum()), "neurons": int(m_keep.sum())})
    summary = {
        "sparsity": removed_cost / total,
        "target_sparsity": cfg.sparsity,
        "kv_groups_pruned": sum(v.num_kv_heads - l["kv_groups"] for v, l in zip(views, layers)),
        "neurons_pruned": sum(v.intermediate_size - l["neurons"] for v, l in zip(views, layers)),
        "layers": layers,
        "metric": cfg.metric,
        "structure": cfg.structure,
        "compensation": cfg.compensation if cfg.bias_compensation else "none",
        "calibration_tokens": int(tokens.numel()),
        "calibration_seconds": round(t_cal, 3),
    }
    return FlapPlan(plan, comps, summary)


def unit_sets(
    module: nn.Module, views: list[DecoderLayerView], stats: dict[str, InputStats], cfg: "FlapConfig"
) -> tuple[list[fm.UnitSet], list[fm.UnitSet]]:
    """Per-layer KV-group and neuron scores (z-scored per layer and module) with their costs."""
    shapes = {n: p.shape for n, p in module.named_parameters(remove_duplicate=False)}
    attn_sets, mlp_sets = [], []
    for v in views:
        for path, group, kind in ((f"{v.attn}.o_proj", v.kv_group, "attn"), (f"{v.mlp}.down_proj", v.mlp_neuron, "mlp")):
            st = stats[path]
            w = module.get_submodule(path).weight
            ch = fm.channel_scores(cfg.metric, w, st.var, st.sqnorm / st.count)
            if kind == "attn" and cfg.square_attn:
                ch = ch * ch
            # z-score per (layer, module) so layers and modules compete on one scale
            scores = fm.unit_scores(fm.standardize(ch), _input_slice(group, f"{path}.weight"))
            cost = group.numel_per_channel(shapes)
            min_keep = cfg.min_kv_groups if kind == "attn" else cfg.min_neurons
            (attn_sets if kind == "attn" else mlp_sets).append(fm.UnitSet(v.index, kind, scores, cost, min_keep))
    return attn_sets, mlp_sets


def _compensation(module: nn.Module, path: str, st: InputStats, removed: torch.Tensor, cfg: "FlapConfig") -> Compensation:
    weight = module.get_submodule(path).weight
    if cfg.compensation == "lsq":
        keep = torch.ones(weight.shape[1], dtype=torch.bool)
        keep[removed] = False
        kept = keep.nonzero().squeeze(1)
        w_new, b = fm.lsq_compensation(weight, st.mean, st.covariance(), kept, removed, cfg.lsq_ridge)
        return Compensation(path, b, kept, w_new)
    return Compensation(path, fm.mean_bias(weight, st.mean, removed))


@register_pass
class Flap(Pass):
    name = "flap"
    description = "FLAP structured pruning of KV groups and MLP neurons with bias compensation"
    Config = FlapConfig

    stage = "structure"

    def needs(self) -> frozenset[str]:
        return frozenset({NEEDS_DECODER_LM, NEEDS_CALIBRATION})

    def requires(self, model: Model, ctx: PassContext) -> None:
        decoder_layers(model)  # raises SlimcError when the layers are not Llama-style

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg: FlapConfig = self.config
        if cfg.sparsity == 0.0:
            return PassResult(model, False, {"params_removed": 0, "sparsity": 0.0})
        tokens, _ = ctx.calibration_tokens(model, cfg.calibration, cfg.samples, cfg.seq_len, cfg.seed)
        fp = plan_flap(model, tokens, cfg)
        if cfg.compensation == "lsq-seq":
            before = _params_without_output_bias(model.module)
            t0 = time.perf_counter()
            sequential_lsq(model.module, decoder_layers(model), fp.plan, tokens, ridge=cfg.lsq_ridge, batch_size=cfg.batch_size)
            fp.stats["refit_seconds"] = round(time.perf_counter() - t0, 3)
            removed = before - _params_without_output_bias(model.module)
        else:
            compensate(model.module, fp.compensations)
            removed = apply_plan(model.module, fp.plan)["params_removed"]
        return PassResult(model, removed > 0, {"params_removed": removed, **fp.stats})

    def ensures(self, model: Model, ctx: PassContext) -> None:
        for v in decoder_layers(model):
            attn = model.module.get_submodule(v.attn)
            mlp = model.module.get_submodule(v.mlp)
            if attn.o_proj.weight.shape[1] != attn.q_proj.weight.shape[0]:
                raise PostconditionError(f"layer {v.index}: o_proj input {attn.o_proj.weight.shape[1]} != q_proj output {attn.q_proj.weight.shape[0]}")
            if mlp.down_proj.weight.shape[1] != mlp.up_proj.weight.shape[0]:
                raise PostconditionError(f"layer {v.index}: down_proj input != up_proj output")


def _params_without_output_bias(module: nn.Module) -> int:
    """Parameter count leaving out o_proj/down_proj biases, which compensation adds (not removals)."""
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith(("o_proj.bias", "down_proj.bias")))
