"""`hesso`: train a network once with HESSO (OTO's hybrid structured-sparsity optimizer), then cut the zeroed channels.

HESSO (Chen et al., ICLR 2025; only_train_once's `HESSO`) over slimc's groups: every channel of a
prunable, exact group is one zero-invariant group (OTO's term) — it owns the producer's rows, the
norm's scale and shift and the consumers' columns, so once all of them are zero, removing the
channel changes nothing. The training runs the base optimizer (SGD / Adam / AdamW) through
`compiler.training.Trainer`; after every step the `Hesso` hook

1. at the start of each of K periods of T steps (the first at step t0): scores the channels not yet
   pruned by the hybrid saliency (`_hesso_math`: five proxies, each normalised over the model) and
   selects, globally and lowest first, as many as bring the model's cost to this period's share of
   the target (`period_schedule`: HESSO's equal shares, or by default the same fraction of the cost
   left each period, which measured better at extreme budgets) — the cost being MACs, parameters or
   channels (`budget`), counted exactly by `compiler.analysis.costs.CostModel` (a layer cut on both
   sides keeps the product of its kept fractions), every group keeping at least `min_channels` and a
   multiple of its `multiple_of`;
2. multiplies the channels selected this period by (T - t - 1) / (T - t) at step t of the period,
   so they reach exactly zero at its last step;
3. holds every channel of an earlier period at exactly zero.

OTO's own target counts channels equally (`budget: channels`), which at high sparsity leaves the
expensive early layers wide and cuts cheap late layers to one channel; a MAC or parameter budget
hits the stated cost instead. After training, `compiler.surgery.apply_plan` removes the zero
channels (exact: the constructed network computes what the trained one does, checked by surgery).

Recipe (CLI: `compress net.pt --trust-pickle --recipe hesso-70 --data digits --epochs 60`):

    name: hesso-70
    passes:
      - hesso: {sparsity: 0.7, budget: macs}

Python API: `Hesso(module, groups, cost_model, ...)` is a `Trainer` hook for a training loop of
one's own; `Hesso.plan()` is the plan of the zeroed channels for `apply_plan`.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from slimc.compiler.analysis.costs import CostModel, graph_macs
from slimc.compiler.analysis.coupling import find_groups, model_graph, why_nothing_prunable
from slimc.compiler.groups import Group
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import NEEDS_TORCH, NEEDS_TRAINING, Pass, PassConfig, PassContext, PassResult, register_pass
from slimc.compiler.surgery import apply_plan
from slimc.compiler.training import TrainConfig, Trainer
from slimc.compiler.training.sources import TrainingData, open_training_data
from slimc.errors import SlimcError
from slimc.passes._budget_math import select_channels
from slimc.passes._hesso_math import DEFAULT_WEIGHTS, PROXIES, channel_sums, hybrid_saliency, period_targets, proxies, ramp


class HessoConfig(PassConfig):
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the budget removed (0.7: keep 30% of the MACs)")
    budget: Literal["macs", "params", "channels"] = Field("macs", description="what `sparsity` counts: MACs of one forward "
                                                          "pass, parameters, or channels (OTO's group sparsity)")
    scope: Literal["model", "groups"] = Field("model", description="what `sparsity` is a fraction of: the whole model's "
                                              "cost, or only the part the candidate groups can cut (an LLM's "
                                              "attention and MLP weights, without embeddings)")
    periods: int = Field(10, ge=1, description="K: pruning periods")
    period_schedule: Literal["linear", "geometric"] = Field(
        "geometric", description="what each period removes: an equal share of the target (HESSO), or the same fraction of "
        "the cost left (geometric: smaller steps late, when the network is already small)")
    start: float = Field(0.05, ge=0.0, lt=1.0, description="t0 as a fraction of the training steps")
    span: float = Field(0.3, gt=0.0, le=1.0, description="K x T as a fraction of the training steps")
    rank: Literal["saliency", "saliency_per_cost"] = Field(
        "saliency", description="rank channels by saliency (HESSO), or by saliency per unit of the budget they cost")
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS),
                                      description=f"saliency proxy weights ({', '.join(PROXIES)})")
    roles: list[str] | None = Field(None, description="only groups of these roles (conv.channel, mlp.neuron, attention.kv_group, ...)")
    min_channels: int = Field(1, ge=1, description="every group keeps at least this many channels")
    # the training (the CLI's --data / --epochs / --steps override data, epochs and steps)
    data: str = Field("digits", description="training data: digits, pydoc, a .npz of inputs/labels, a .txt/.jsonl text")
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-2, gt=0.0, description="the defaults (lr, start, span, periods) were chosen on the digits CNNs "
                      "trained from scratch (BENCHMARKS.md); a pretrained start wants a much lower lr")
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    weight_decay: float = Field(5e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    grad_clip: float | None = Field(None, gt=0.0)
    seq_len: int = Field(128, ge=8, description="language models: tokens per training window")
    samples: int = Field(256, ge=1, description="language models: training windows of the calibration text")
    eval_points: int = Field(20, ge=1, description="evaluations during training, for the curve")


class Hesso:
    """HESSO as a `Trainer` hook over slimc groups (see the module docstring).

    `groups`: the candidate groups (prunable, exact); `costs`: a `CostModel` over exactly these
    groups, or None for the channel count; `target`: the cost to reach; the schedule: `periods` K
    of `period_steps` T from step `start_step` t0 (steps counted from 1 as `Trainer.step`).
    """

    def __init__(self, module: torch.nn.Module, groups: Sequence[Group], costs: CostModel | None, target: float, *,
                 periods: int, period_steps: int, start_step: int = 0, weights: dict[str, float] | None = None,
                 min_channels: int = 1, rank: str = "saliency", period_schedule: str = "linear"):
        if period_steps < 1:
            raise SlimcError("HESSO needs at least one step per pruning period: train longer or use fewer periods")
        self.module, self.groups, self.costs, self.target = module, list(groups), costs, float(target)
        self.periods, self.period_steps, self.start_step = periods, period_steps, start_step
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.rank = rank
        tensors = dict(module.named_parameters(remove_duplicate=False))
        tensors.update(dict(module.named_buffers(remove_duplicate=False)))
        self.params = {n: p for n, p in module.named_parameters(remove_duplicate=False)}
        self.tensors = tensors
        self.floors = [max(min_channels, g.multiple_of) for g in self.groups]
        self.multiples = [g.multiple_of for g in self.groups]
        self.pruned: list[list[int]] = [[] for _ in self.groups]
        self.active: list[list[int]] = [[] for _ in self.groups]
        self.dense = self.cost([0] * len(self.groups))
        self.targets = period_targets(self.dense - self.target, periods, self.dense, period_schedule)
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0
        # per group: (tensor, axis, index [size, k]) of every slice whose tensor the module holds
        self.slices = [[(tensors[s.param], s.axis % tensors[s.param].dim(), s.index.to(tensors[s.param].device))
                        for s in g.slices if s.param in tensors] for g in self.groups]
        self._masks: list[tuple] = []  # (tensor, keep multiplier, selected flags or None), shaped to broadcast: see _refresh

    # ---------------------------------------------------------------- costs

    def cost(self, removed: Sequence[int]) -> float:
        if self.costs is None:
            return float(sum(g.size - r for g, r in zip(self.groups, removed)))
        return self.costs.cost(removed)

    def _saving(self, removed: list[int], gi: int, n: int = 1) -> float:
        return float(n) if self.costs is None else self.costs.saving(removed, gi, n)

    def _dense_costs(self) -> list[torch.Tensor]:
        zero = [0] * len(self.groups)
        return [torch.full((g.size,), self._saving(zero, gi), dtype=torch.float64) for gi, g in enumerate(self.groups)]

    # ---------------------------------------------------------------- the hook

    def __call__(self, trainer: Any) -> None:
        self.after_step(trainer.step)

    def position(self, step: int) -> tuple[int, int] | None:
        """(period, step within it) of base-optimizer step `step` (1-based), None outside the periods."""
        s = step - self.start_step - 1
        if s < 0 or s >= self.periods * self.period_steps:
            return None
        return divmod(s, self.period_steps)

    def after_step(self, step: int) -> None:
        t0 = time.perf_counter()
        pos = self.position(step)
        factor = None
        with torch.no_grad():
            if pos is not None:
                k, t = pos
                if t == 0:
                    self._select(k)
                    self._refresh()
                factor = ramp(t, self.period_steps)
            for tensor, keep, active in self._masks:
                tensor.mul_(keep if factor is None or active is None else torch.where(active, factor, keep))
            if pos is not None and pos[1] == self.period_steps - 1:
                for gi, chans in enumerate(self.active):
                    self.pruned[gi] = sorted(self.pruned[gi] + chans)
                    self.active[gi] = []
                self._refresh()
        self.seconds += time.perf_counter() - t0

    def _refresh(self) -> None:
        """One multiplier per (tensor, axis) that some pruned or selected channel touches: 0 at the pruned
        indices, 1 elsewhere, and where this period's selected channels lie, a flag (they get the ramp)."""
        masks: dict[tuple[int, int], list] = {}
        for gi in range(len(self.groups)):
            for chans, flag in ((self.pruned[gi], False), (self.active[gi], True)):
                if not chans:
                    continue
                ch = torch.as_tensor(chans, dtype=torch.long)
                for tensor, axis, index in self.slices[gi]:
                    entry = masks.get((id(tensor), axis))
                    if entry is None:
                        n = tensor.shape[axis]
                        entry = masks[(id(tensor), axis)] = [tensor, axis, torch.ones(n, dtype=tensor.dtype, device=tensor.device), None]
                    rows = index[ch.to(index.device)].reshape(-1)
                    if flag:
                        if entry[3] is None:
                            entry[3] = torch.zeros(tensor.shape[axis], dtype=torch.bool, device=tensor.device)
                        entry[3][rows] = True
                    else:
                        entry[2][rows] = 0.0
        self._masks = []
        for tensor, axis, keep, active in masks.values():
            shape = [1] * tensor.dim()
            shape[axis] = -1  # multipliers broadcast along the channel axis
            self._masks.append((tensor, keep.view(shape), None if active is None else active.view(shape)))

    def _select(self, k: int) -> None:
        grads = {n: p.grad for n, p in self.params.items()}
        sums = [channel_sums(g, self.params, grads) for g in self.groups]
        scores = hybrid_saliency([proxies(s) for s in sums], self.weights)
        target = self.dense - self.targets[k]
        rank_cost = self._dense_costs() if self.rank == "saliency_per_cost" else None
        self.active = select_channels(scores, self.pruned, self.cost, self._saving, target, self.floors, self.multiples, rank_cost)

    # ---------------------------------------------------------------- results

    def removed(self) -> list[int]:
        return [len(p) + len(a) for p, a in zip(self.pruned, self.active)]

    def plan(self) -> dict[Group, list[int]]:
        """The channels held at zero, per group (for `apply_plan`)."""
        return {g: list(p) for g, p in zip(self.groups, self.pruned) if p}

    def state(self) -> dict[str, float]:
        removed = self.removed()
        channels = sum(g.size for g in self.groups)
        return {"group_sparsity": sum(removed) / max(1, channels),
                "cost_kept": self.cost(removed) / self.dense if self.dense else 1.0}


def candidate_groups(groups: Sequence[Group], roles: list[str] | None) -> list[Group]:
    return [g for g in groups if g.prunable and g.exact and g.size >= 2 and (roles is None or g.role in roles)]


@register_pass
class HessoPass(Pass):
    name = "hesso"
    description = "Train with HESSO (OTO's structured-sparsity optimizer) over slimc's groups, then remove the zeroed channels"
    Config = HessoConfig
    stage = "structure"

    def needs(self) -> set[str]:
        return {NEEDS_TORCH, NEEDS_TRAINING}

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg: HessoConfig = self.config
        training = getattr(ctx, "training", None) or {}
        data = open_training_data(training.get("data") or cfg.data, model, samples=cfg.samples, seq_len=cfg.seq_len, seed=ctx.seed)
        epochs, steps = training.get("epochs"), training.get("steps")
        if epochs is None and steps is None:
            epochs, steps = cfg.epochs, cfg.steps
        if epochs is None and steps is None:
            raise SlimcError("hesso trains the model: give its length with --epochs N or --steps N "
                             "(or hesso.epochs / hesso.steps in the recipe)")
        module = model.module
        if model.example_inputs is None and not model.is_causal_lm:
            model.example_inputs = data.example_inputs(module)
        graph = model_graph(model)
        groups = find_groups(graph, module)
        cands = candidate_groups(groups, cfg.roles)
        if not cands:
            why = why_nothing_prunable(groups) or f"no prunable, exact group{' of the roles ' + ', '.join(cfg.roles) if cfg.roles else ''}"
            raise SlimcError(f"hesso has nothing to prune in this model: {why}")
        costs = None if cfg.budget == "channels" else CostModel(graph, cands, cfg.budget, shapes=_shapes(module) if cfg.budget == "params" else None)
        dense = sum(g.size for g in cands) if costs is None else costs.total
        cuttable = dense if costs is None or cfg.scope == "model" else costs.total - costs.fixed
        train_cfg = TrainConfig(epochs=epochs, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum, schedule=cfg.schedule,
                                warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, seed=ctx.seed)
        before = data.evaluate(module) if data.evaluate is not None else {}
        trainer = Trainer(module, data.train, data.loss, train_cfg, evaluate=data.evaluate)
        total = trainer.total_steps
        start = int(round(cfg.start * total))
        period_steps = max(1, int(cfg.span * total) // cfg.periods)
        if start + cfg.periods * period_steps > total:
            raise SlimcError(f"hesso's {cfg.periods} pruning periods do not fit in {total} training steps "
                             f"(start {cfg.start:g}, span {cfg.span:g}): train longer or lower hesso.periods")
        hesso = Hesso(module, cands, costs, dense - cfg.sparsity * cuttable, periods=cfg.periods, period_steps=period_steps,
                      start_step=start, weights=cfg.weights, min_channels=cfg.min_channels, rank=cfg.rank,
                      period_schedule=cfg.period_schedule)
        curve: list[dict[str, Any]] = []
        every = max(1, total // cfg.eval_points)

        def record(tr: Trainer) -> None:
            if tr.step % every == 0 or tr.step == total:
                row = {"step": tr.step, **hesso.state()}
                if data.evaluate is not None:
                    row.update(data.evaluate(module))
                curve.append(row)

        trainer.hooks = [hesso, record]
        t0 = time.perf_counter()
        history = trainer.fit()
        train_seconds = time.perf_counter() - t0
        trained = data.evaluate(module) if data.evaluate is not None else {}
        macs_before = graph_macs(graph)
        plan = hesso.plan()
        stats = apply_plan(model, plan)
        after = data.evaluate(model.module) if data.evaluate is not None else {}
        macs_after = graph_macs(model_graph(model)) if plan else macs_before
        metric = data.metric
        stats.update(
            data=data.name, steps=total, budget=cfg.budget, sparsity=cfg.sparsity,
            periods=cfg.periods, period_steps=period_steps, start_step=start,
            groups_found=len(groups), groups_pruned=len(plan), channels_removed=sum(len(v) for v in plan.values()),
            channels_eligible=sum(g.size for g in cands),
            macs_before=macs_before, macs_after=macs_after, macs_kept=macs_after / macs_before if macs_before else 1.0,
            cost_kept=hesso.cost(hesso.removed()) / dense if dense else 1.0,
            final_loss=history[-1]["loss"] if history else None,
            train_seconds=round(train_seconds, 3), hesso_seconds=round(hesso.seconds, 3),
            training_curve=curve,
        )
        for label, values in (("before", before), ("trained", trained), ("after", after)):
            if metric in values:
                stats[f"{metric}_{label}"] = values[metric]
        if not plan:
            stats["nothing_removed"] = "the target rounds to no channel in the eligible groups"
        return PassResult(model, modified=bool(plan), stats=stats)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


__all__ = ["Hesso", "HessoConfig", "HessoPass", "TrainingData", "candidate_groups"]
