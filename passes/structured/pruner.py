"""`StructuredPrune`: the pass every LLM structured-pruning method of the family configures.

    1. units        `units.decoder_units`: KV groups / heads and neurons per layer, with their costs,
                    for every decoder family the IR maps; units this method cannot score or
                    compensate (MoE expert neurons under input statistics) are left whole
    2. collect      what the criterion and the compensation need, in one layer-by-layer pass
                    (output-projection input moments, the Gram matrix for lsq, block angles) and, for
                    saliency criteria, one backward over micro-batches
    3. score        `criteria.CRITERIA[name]` per unit set; optional z-score per (layer, module)
    4. allocate     the method's allocator (`allocators`), with per-layer floors
    5. round        kept MLP widths to a multiple (pooled, or up per layer), then to each group's
                    own `multiple_of` (expert neurons: grouped_mm's 16-byte strides)
    6. compensate   mean bias / lsq on the dense statistics, or sequential lsq while cutting
    7. cut          `compiler.surgery.apply_plan`

A method subclasses `StructuredPrune` with its config (a `StructuredConfig`), names its criterion
(`criterion_name`) and implements `allocate`. The sparsity p is always the fraction of the decoder
layers' attention + MLP unit parameters removed (embeddings and the LM head excluded), whatever the
method prunes (CFSP prunes MLP neurons only, and removes p of attention + MLP all from the MLPs).
A part the analysis or the method leaves whole (Phi-3's fused QKV, MQA attention, MoE experts
under FLAP) is not counted in that total; `stats["left_whole"]` lists each with the reason, and
`stats["prunable_params"]` is the total p is a fraction of.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from slimc.compiler.calibration.gradients import parameter_saliency
from slimc.compiler.calibration.stats import LayerStats, collect_layer_stats
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import (
    NEEDS_CALIBRATION,
    NEEDS_DECODER_LM,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)
from slimc.compiler.surgery import apply_plan
from slimc.errors import PostconditionError, SlimcError
from slimc.passes.structured import allocators as al
from slimc.passes.structured import compensation as comp
from slimc.passes.structured.criteria import CRITERIA, Criterion, ScoreInputs, standardize
from slimc.passes.structured.sequential import sequential_lsq
from slimc.passes.structured.units import ATTN, MLP, Units, decoder_units, out_weight

COMPENSATIONS = ("none", "mean", "lsq", "lsq-seq")


class StructuredConfig(PassConfig):
    """Options every structured-pruning method of the family shares."""

    sparsity: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of decoder attention+MLP parameters to remove")
    compensation: Literal["none", "mean", "lsq", "lsq-seq"] = Field("mean", description="what the kept weights absorb of the removed ones")
    lsq_ridge: float = Field(0.01, gt=0.0, description="lsq: ridge, relative to the mean kept-channel variance")
    calibration: str = Field("pydoc", description="calibration source when the context gives none: pydoc, text or token ids")
    samples: int = Field(128, ge=1, description="calibration windows")
    seq_len: int = Field(128, ge=2, description="tokens per calibration window")
    seed: int | None = Field(None, description="window seed; default: the context's seed")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward")
    round_neurons_to: int = Field(1, ge=1, description="round each layer's kept MLP width to a multiple of this")
    min_kv_groups: int = Field(1, ge=1, description="KV groups every layer keeps (removing all attention is not supported)")
    min_neurons: int = Field(1, ge=0, description="neurons every layer keeps; 0 allows dropping a whole MLP")


@dataclass
class StructuredPlan:
    """What to remove and how to compensate; the model is not changed until `apply`."""

    layers: list[tuple[Units, ...]]  # per decoder layer, the units the method used (attention first)
    removed: dict[str, torch.Tensor]  # group name -> unit indices to remove
    compensations: list[comp.Compensation]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def plan(self) -> dict:
        """{Group: unit indices} for `compiler.surgery.apply_plan` / `mask_plan`."""
        return {u.group: self.removed[u.group.name] for units in self.layers for u in units}


class StructuredPrune(Pass):
    """Base of the family's passes; see the module docstring. Subclasses set `criterion_name`."""

    stage = "structure"
    Config = StructuredConfig
    criterion_name: str = "flap-wifv"
    prunes_attention: bool = True  # False: only MLP units are removed (CFSP)
    saliency_batch: int = 2  # windows per backward micro-batch (bounds activation memory: SmolLM2 nirvana-20 peaks at 2.4 GB RSS)

    # ---- what a method customises --------------------------------------------------------------

    def criterion(self) -> Criterion:
        return CRITERIA[self.criterion_name]

    def score_options(self) -> dict[str, Any]:
        return {}

    def normalize(self) -> bool:
        """z-score each (layer, module) set's unit scores before allocation."""
        return False

    def wants_block_angles(self) -> bool:
        return False

    def compensation_mode(self) -> str:
        return self.config.compensation

    def allocate(self, attn: list[al.UnitSet], mlp: list[al.UnitSet], sparsity: float,
                 collected: LayerStats | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        raise NotImplementedError

    def round(self, masks: list[torch.Tensor], scores: list[torch.Tensor]) -> list[torch.Tensor]:
        return al.round_keep(masks, scores, self.config.round_neurons_to)

    # ---- the shared flow ------------------------------------------------------------------------

    def needs(self) -> frozenset[str]:
        return frozenset({NEEDS_DECODER_LM, NEEDS_CALIBRATION})

    def collect(self, model: Model, layers: list[tuple[Units, ...]], tokens: torch.Tensor) -> tuple[LayerStats | None, dict]:
        """Input statistics (and block angles) in one layer-by-layer pass; saliency by a backward."""
        cfg = self.config
        needs = self.criterion().needs
        stats = None
        mode = self.compensation_mode()
        if "inputs" in needs or mode in ("mean", "lsq") or self.wants_block_angles():
            projs = list(dict.fromkeys(u.out_proj for units in layers for u in units if u.observable))
            stats = collect_layer_stats(model, tokens, projs, gram=mode == "lsq" or "gram" in needs,
                                        block_angles=self.wants_block_angles(), batch_size=cfg.batch_size)
        saliency: dict = {}
        for need in needs:
            if need.startswith("saliency:"):
                params = sorted({s.param for units in layers for u in units for s in u.group.slices})
                saliency = parameter_saliency(model, tokens, params, objective=need.split(":", 1)[1], batch_size=self.saliency_batch)
        return stats, saliency

    def usable_units(self, model: Model) -> tuple[list[tuple[Units, ...]], list[dict[str, Any]]]:
        """The units this method can score and compensate, per layer, and what it leaves whole (with why).

        Criteria that read input statistics and every compensation need an observable output
        projection (a linear whose forward input is the units' channels); MoE expert neurons have
        none, so under such a criterion or compensation the experts are left whole. A method that
        never removes attention units (CFSP) keeps them, unscored, only to count their parameters.
        """
        found = decoder_units(model)
        whole = list(found.whole)
        needs_inputs = "inputs" in self.criterion().needs or self.compensation_mode() != "none"
        layers: list[tuple[Units, ...]] = []
        for units in found:
            kept = []
            for u in units:
                removable = u.kind != ATTN or self.prunes_attention
                if removable and needs_inputs and not u.observable:
                    what = f"criterion {self.criterion_name}" if "inputs" in self.criterion().needs else f"compensation {self.compensation_mode()}"
                    whole.append({"layer": u.layer, "part": u.kind, "name": u.group.name,
                                  "reason": f"{what} needs the inputs of the units' output projection, and {u.out_proj} "
                                            "is not a linear whose input carries them (experts run inside one module)"})
                    continue
                kept.append(u)
            layers.append(tuple(kept))
        if not any(u.kind != ATTN or self.prunes_attention for units in layers for u in units):
            reasons = "; ".join(f"layer {w['layer']} {w['part']}: {w['reason']}" for w in whole[:4])
            raise SlimcError(f"{self.name}: no decoder layer has units this method can remove ({reasons})")
        return layers, whole

    def plan(self, model: Model, tokens: torch.Tensor, collected: tuple[LayerStats | None, dict] | None = None) -> StructuredPlan:
        """Score units on calibration `tokens` and choose what to remove; the model is not changed.

        `collected` (from `collect`) skips the calibration run.
        """
        cfg = self.config
        layers, whole = self.usable_units(model)
        t0 = time.perf_counter()
        stats, saliency = collected if collected is not None else self.collect(model, layers, tokens)
        t_cal = time.perf_counter() - t0
        data = ScoreInputs(
            tensors=dict(model.module.named_parameters(remove_duplicate=False)),
            inputs=stats.inputs if stats is not None else {},
            saliency=saliency,
            options=self.score_options(),
        )
        crit = self.criterion()
        flat = [u for units in layers for u in units]
        attn_units = [u for u in flat if u.kind == ATTN]
        mlp_units = [u for u in flat if u.kind == MLP]
        attn_sets, mlp_sets = [], []
        for group, floor, sets in ((attn_units, cfg.min_kv_groups, attn_sets), (mlp_units, cfg.min_neurons, mlp_sets)):
            for u in group:
                if u.kind == ATTN and not self.prunes_attention:  # kept whole: no score needed
                    sets.append(al.UnitSet(u.layer, u.kind, torch.zeros(u.size, dtype=torch.float64), u.cost, u.size))
                    continue
                scores = crit.fn(u, data).double()
                if self.normalize():
                    scores = standardize(scores)
                sets.append(al.UnitSet(u.layer, u.kind, scores, u.cost, floor))
        if self.prunes_attention:
            attn_keep, mlp_keep = self.allocate(attn_sets, mlp_sets, cfg.sparsity, stats)
        else:
            a_tot, m_tot = sum(s.total for s in attn_sets), sum(s.total for s in mlp_sets)
            p_mlp = cfg.sparsity * (a_tot + m_tot) / max(m_tot, 1)
            if p_mlp >= 1.0:
                raise SlimcError(f"{self.name}: sparsity {cfg.sparsity} would remove every MLP neuron ({p_mlp:.2f} of the MLP weights)")
            attn_keep = [torch.ones(s.size, dtype=torch.bool) for s in attn_sets]
            _, mlp_keep = self.allocate([], mlp_sets, p_mlp, stats)
        mlp_keep = self.round(mlp_keep, [s.scores for s in mlp_sets])
        mlp_keep = _round_to_group_multiples(mlp_units, mlp_keep, [s.scores for s in mlp_sets])
        keep = {u.group.name: k for u, k in zip(attn_units + mlp_units, list(attn_keep) + list(mlp_keep))}
        sets = {u.group.name: s for u, s in zip(attn_units + mlp_units, attn_sets + mlp_sets)}
        return self._plan(model, layers, sets, keep, stats, tokens, t_cal, whole)

    def _plan(self, model, layers, sets, keep, stats, tokens, t_cal, whole) -> StructuredPlan:
        cfg = self.config
        total = sum(s.total for s in sets.values())
        removed: dict[str, torch.Tensor] = {}
        comps: list[comp.Compensation] = []
        removed_cost = 0
        per_layer = []
        kv_pruned = neurons_pruned = 0
        for units in layers:
            if not units:
                continue
            kept: dict[str, int | None] = {ATTN: None, MLP: None}  # None: the layer has no units of that kind
            for u in units:
                k = keep[u.group.name]
                rm = (~k).nonzero().squeeze(1)
                removed[u.group.name] = rm
                removed_cost += rm.numel() * sets[u.group.name].cost
                if rm.numel() and self.compensation_mode() in ("mean", "lsq"):
                    comps.append(self._compensation(model, u, stats.inputs[u.out_proj], u.out_index[rm].reshape(-1)))
                kept[u.kind] = (kept[u.kind] or 0) + int(k.sum())
                if u.kind == ATTN:
                    kv_pruned += rm.numel()
                else:
                    neurons_pruned += rm.numel()
            per_layer.append({"layer": units[0].layer, "kv_groups": kept[ATTN], "neurons": kept[MLP]})
        summary = {
            "sparsity": removed_cost / total if total else 0.0,
            "target_sparsity": cfg.sparsity,
            "prunable_params": total,
            "kv_groups_pruned": kv_pruned,
            "neurons_pruned": neurons_pruned,
            "layers": per_layer,
            "criterion": self.criterion_name,
            "compensation": self.compensation_mode(),
            "calibration_tokens": int(tokens.numel()),
            "calibration_seconds": round(t_cal, 3),
        }
        if whole:
            summary["left_whole"] = whole
        if stats is not None and stats.block_angle is not None:
            summary["block_importance"] = [round(a, 6) for a in stats.block_angle]
        return StructuredPlan(layers, removed, comps, summary)

    def _compensation(self, model: Model, u: Units, st, removed: torch.Tensor) -> comp.Compensation:
        weight = out_weight(u, dict(model.module.named_parameters(remove_duplicate=False)))  # [d_out, d_in]
        if self.compensation_mode() == "lsq":
            keep = torch.ones(weight.shape[1], dtype=torch.bool)
            keep[removed] = False
            kept = keep.nonzero().squeeze(1)
            w_new, b = comp.lsq_compensation(weight, st.mean, st.covariance(), kept, removed, self.config.lsq_ridge)
            return comp.Compensation(u.out_proj, b, kept, w_new, u.in_axis)
        return comp.Compensation(u.out_proj, comp.mean_bias(weight, st.mean, removed), in_axis=u.in_axis)

    def apply(self, model: Model, plan: StructuredPlan, tokens: torch.Tensor) -> int:
        """Compensate and cut; returns the parameters removed (biases compensation adds not counted)."""
        cfg = self.config
        projs = {u.out_proj for units in plan.layers for u in units}
        before = _params_without_output_bias(model, projs)
        if self.compensation_mode() == "lsq-seq":
            t0 = time.perf_counter()
            sequential_lsq(model.module, plan.layers, plan.removed, tokens, ridge=cfg.lsq_ridge, batch_size=cfg.batch_size)
            plan.stats["refit_seconds"] = round(time.perf_counter() - t0, 3)
        else:
            comp.compensate(model.module, plan.compensations)
            apply_plan(model, plan.plan, verify=False)  # units from the decoder recogniser are exact
        return before - _params_without_output_bias(model, projs)

    def calibration(self, model: Model, ctx: PassContext) -> torch.Tensor:
        cfg = self.config
        return ctx.calibration_tokens(model, cfg.calibration, cfg.samples, cfg.seq_len, cfg.seed)[0]

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        if cfg.sparsity == 0.0:
            return PassResult(model, False, {"params_removed": 0, "sparsity": 0.0})
        tokens = self.calibration(model, ctx)
        plan = self.plan(model, tokens)
        removed = self.apply(model, plan, tokens)
        return PassResult(model, removed > 0, {"params_removed": removed, **plan.stats})

    def ensures(self, model: Model, ctx: PassContext) -> None:
        """Every tensor a layer's units own is still covered exactly: the widths of each layer agree."""
        shapes = {n: p.shape for n, p in model.module.named_parameters(remove_duplicate=False)}
        for units in decoder_units(model, strict=False):
            for u in units:
                for s in u.group.slices:
                    if s.index.numel() != shapes[s.param][s.axis]:
                        raise PostconditionError(
                            f"layer {u.layer}: {s.param} has {shapes[s.param][s.axis]} entries along axis {s.axis} "
                            f"but the layer's {u.kind} units own {s.index.numel()}"
                        )


def _round_to_group_multiples(units: list[Units], masks: list[torch.Tensor], scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Kept counts rounded to each group's `multiple_of` (MoE expert neurons: grouped_mm's 16-byte
    strides), sets of the same multiple pooled so their total stays nearest its value."""
    out = list(masks)
    buckets: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        m = u.group.multiple_of
        if m > 1 and int(masks[i].sum()) % m:
            buckets.setdefault(m, []).append(i)
    for m, idx in buckets.items():
        rounded = al.round_keep([masks[i] for i in idx], [scores[i] for i in idx], m)
        for i, r in zip(idx, rounded):
            out[i] = r
    return out


def _params_without_output_bias(model: Model, projs: set[str] | None = None) -> int:
    """Parameters, leaving out the output-projection biases compensation adds (they are not removals)."""
    if projs is None:
        projs = {u.out_proj for units in decoder_units(model, strict=False) for u in units}
    return sum(p.numel() for n, p in model.module.named_parameters() if not (n.endswith(".bias") and n[: -len(".bias")] in projs))
