"""`spa`: structured pruning of any architecture with group importance (SPA) and OBSPA, PyTorch or ONNX.

SPA ("Structurally Prune Anything") scores every weight with an unstructured criterion, transfers the
scores to the coupled channel groups of the graph IR and prunes under a budget. Here:

1. **Groups**: the prunable, exact groups of `compiler.analysis.coupling` (any architecture, ONNX or
   PyTorch), optionally filtered by role.
2. **Importance** (`_spa_importance_math`): `l1`, `l2`, `taylor` |w g| and `obd` 0.5 F w^2 (these two
   need data and a loss: gradients over calibration batches), `fpgm`, `lamp`, `bn_scale`, `random`,
   aggregated over each channel's weights (sum / mean / max) and normalised per group (none / mean /
   max / gaussian / lamp) so groups can compete; or `obs`: the OBS cost of removing the channel's
   input columns from every consumer layer (conv / linear), measured in the units of the consumer's
   normalised output (rows scaled by the following BatchNorm's gamma / sqrt(var + eps) where one follows).
3. **Allocation** under a budget of channels, parameters or MACs (`budget`; costs counted exactly by
   `compiler.analysis.costs.CostModel`): `local` (the same fraction of every group, the fraction
   searched so the budget is met), `global` (every channel of every group in one ranking,
   `_budget_math.select_channels`), `isomorphic` (one ranking per set of groups of the same structure,
   each set cut by the same fraction of its own cost, as Torch-Pruning's `isomorphic=True`). Kept
   widths are rounded to a multiple of `round_to` (when the group is wide enough), and every group keeps
   at least `min_keep` of its channels and one.
4. **OBSPA compensation** (`compensate`, on by default with `obs`): the consumers' remaining weights take
   the optimal update dW = -W[:,Q] ((H^-1)_QQ)^-1 (H^-1)_Q,: for the removed columns Q (`_obspa_math`),
   with H = E[x x^T] of the consumer's input from `hessian`: `calib` (calibration data through the
   model, `compiler.calibration.hessians`), `bn` (data-free: from the BatchNorm statistics upstream,
   `_obspa_datafree`; layers it cannot reach use `synthetic`), or `synthetic` (random inputs shaped
   like the example inputs, through the model).
5. `compiler.surgery.apply_plan` removes the channels; `finetune_epochs` > 0 then trains the pruned
   model with the shared `Trainer` on the training data.

Recipes: `spa-l2-50` (global L2, half the MACs), `spa-taylor-50`, `obspa-30` / `obspa-50` (data-free),
`obspa-calib-50`. Data (`--data`, as for training passes) is needed by taylor / obd, by `hessian:
calib` and by fine-tuning, and gives the accuracy before and after in the report.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from slimc.compiler.analysis.costs import CostModel, graph_macs
from slimc.compiler.analysis.coupling import find_groups, model_graph, why_nothing_prunable
from slimc.compiler.groups import Group
from slimc.compiler.ir.graph import Graph, Node
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import Pass, PassConfig, PassContext, PassResult, register_pass
from slimc.compiler.surgery import apply_plan
from slimc.compiler.training import TrainConfig, Trainer
from slimc.compiler.training.sources import TrainingData, open_training_data
from slimc.compiler.training.trainer import collate
from slimc.errors import SlimcError
from slimc.passes._budget_math import select_channels
from slimc.passes._obspa_datafree import input_moments
from slimc.passes._obspa_math import channel_costs, dampen, greedy_scores, hessian_from_moments, removal_update
from slimc.passes._spa_importance_math import channel_scores, normalise
from slimc.passes.group_magnitude import model_tensors

NEEDS_GRADIENTS = ("taylor", "obd")


class SpaConfig(PassConfig):
    criterion: Literal["l1", "l2", "taylor", "obd", "fpgm", "lamp", "bn_scale", "random", "obs"] = "l2"
    aggregation: Literal["sum", "mean", "max"] = "sum"
    normalise: Literal["none", "mean", "max", "gaussian", "lamp"] = Field(
        "mean", description="per-group normalisation before groups compete (obs costs are comparable as they are: none)")
    allocation: Literal["local", "global", "isomorphic"] = "global"
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the budget removed")
    budget: Literal["macs", "params", "channels"] = "macs"
    round_to: int = Field(8, ge=1, description="kept widths rounded to a multiple of this (groups narrower than 2x it: 1)")
    min_keep: float = Field(0.05, ge=0.0, lt=1.0, description="every group keeps at least this fraction of its channels (and one)")
    roles: list[str] | None = Field(None, description="only groups of these roles (conv.channel, mlp.neuron, attention.kv_group, ...)")
    compensate: bool | None = Field(None, description="OBS update of the consumers' remaining weights (default: on for obs)")
    hessian: Literal["calib", "bn", "synthetic", "distilled"] = Field(
        "calib", description="where H = E[x x^T] of a consumer's input comes from (distilled: inputs synthesised to match "
        "the BatchNorm statistics, no data)")
    reconstruct: Literal["none", "data", "distilled"] = Field(
        "none", description="after the cut, refit every conv / linear layer in graph order, by least squares on calibration "
        "inputs through the pruned model, to reproduce the dense layer's output (data: the --data examples; distilled: "
        "inputs synthesised from the BatchNorm statistics)")
    distill_steps: int = Field(300, ge=1, description="optimisation steps of the BN-statistics input synthesis")
    percdamp: float = Field(0.01, ge=0.0, description="H + percdamp * mean(diag H) * I")
    obs_ranking: Literal["greedy", "oneshot"] = Field(
        "greedy", description="obs: score channels by the cumulative cost of greedy sequential removal (OBC), or each alone")
    data: str = Field("digits", description="calibration / fine-tuning data: digits, pydoc, a .npz, a text file")
    samples: int = Field(512, ge=1, description="calibration examples (gradients, H)")
    batch_size: int = Field(64, ge=1)
    gradient_batch: int = Field(8, ge=1, description="taylor / obd: examples per backward pass (per-batch |g| is summed)")
    seq_len: int = Field(128, ge=8, description="language models: tokens per calibration window")
    seed: int = 0
    finetune_epochs: int = Field(0, ge=0)
    finetune_steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    weight_decay: float = Field(5e-4, ge=0.0)


def _needs_data(cfg: SpaConfig) -> bool:
    compensate = cfg.compensate if cfg.compensate is not None else cfg.criterion == "obs"
    uses_h = cfg.criterion == "obs" or compensate
    return (cfg.criterion in NEEDS_GRADIENTS or (uses_h and cfg.hessian == "calib") or cfg.reconstruct == "data"
            or bool(cfg.finetune_epochs or cfg.finetune_steps))


# ---------------------------------------------------------------- consumers and their Hessians


class Consumer:
    """A conv / linear layer whose input channels a group's slice removes: its weight as a matrix
    W [out, cols] (a conv's [out, cin, k...] reshaped channel-major) and how to write it back."""

    def __init__(self, node: Node, param: str, tensor: torch.Tensor, in_axis: int):
        self.node, self.param, self.in_axis = node, param, in_axis
        self.shape = tuple(tensor.shape)
        self.per_channel = int(np.prod(self.shape[2:])) if node.op == "conv" else 1
        self.module = node.module

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach().to(torch.float64).cpu()
        if self.node.op == "conv":
            return t.reshape(self.shape[0], -1)
        return t if self.in_axis == 1 else t.T

    def unmatrix(self, w: torch.Tensor) -> torch.Tensor:
        if self.node.op == "conv":
            return w.reshape(self.shape)
        return w if self.in_axis == 1 else w.T

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """[n, k * per_channel] columns owned by channels whose input indices are the rows of `index` [n, k]."""
        base = index.reshape(index.shape[0], -1, 1) * self.per_channel + torch.arange(self.per_channel)
        return base.reshape(index.shape[0], -1)


def consumers_of(graph: Graph, tensors: dict[str, torch.Tensor]) -> dict[str, Consumer]:
    """{weight name: Consumer} for every conv (groups 1, not transposed) and linear layer with a parameter weight."""
    out: dict[str, Consumer] = {}
    for n in graph.nodes:
        w = n.inputs[1] if len(n.inputs) > 1 else None
        if w is None or w.param is None or w.param not in tensors:
            continue
        if n.op == "conv" and n.attrs.get("groups", 1) == 1 and not n.attrs.get("transposed"):
            out.setdefault(w.param, Consumer(n, w.param, tensors[w.param], 1))
        elif n.op == "linear" and tensors[w.param].dim() == 2:
            out.setdefault(w.param, Consumer(n, w.param, tensors[w.param], int(n.attrs.get("w_in_axis", 1))))
    return out


def _output_scale(graph: Graph, c: Consumer, tensors: dict[str, torch.Tensor], eps_of) -> torch.Tensor | None:
    """gamma / sqrt(var + eps) of a BatchNorm that directly normalises the consumer's output, per output row."""
    users = c.node.outputs[0].users
    if len(users) != 1 or users[0].op != "norm" or users[0].attrs.get("kind") != "batch" or len(users[0].inputs) < 5:
        return None
    bn = users[0]
    gamma, var = bn.inputs[1], bn.inputs[4]
    if gamma is None or var is None or gamma.param not in tensors or var.param not in tensors:
        return None
    g = tensors[gamma.param].detach().to(torch.float64).cpu()
    v = tensors[var.param].detach().to(torch.float64).cpu()
    return g / (v + eps_of(gamma.param)).sqrt()


def _eps_lookup(model: Model):
    mods = dict(model.module.named_modules()) if model.module is not None else {}

    def eps_of(param: str) -> float:
        m = mods.get(param.rsplit(".", 1)[0])
        return float(getattr(m, "eps", 1e-5) or 1e-5)

    return eps_of


# ---------------------------------------------------------------- the pass


@register_pass
class Spa(Pass):
    name = "spa"
    description = "SPA / OBSPA: group-importance structured pruning of any architecture (PyTorch or ONNX) under a channel, parameter or MAC budget"
    Config = SpaConfig
    stage = "structure"

    def requires(self, model: Model, ctx: PassContext) -> None:
        cfg: SpaConfig = self.config
        if model.onnx is None and model.module is None:
            raise SlimcError("spa needs a model (ONNX or PyTorch); this one is empty")
        if model.is_onnx and cfg.criterion in NEEDS_GRADIENTS:
            raise SlimcError(f"spa criterion '{cfg.criterion}' needs gradients, which an ONNX model cannot give: use l1, l2, fpgm, "
                             "lamp, bn_scale or obs with spa.hessian=bn, or prune the PyTorch model")
        if model.is_onnx and (cfg.reconstruct == "data" or (cfg.hessian == "calib" and (cfg.criterion == "obs" or cfg.compensate))):
            raise SlimcError("spa cannot calibrate an ONNX model yet (calibration through ONNX Runtime is not supported): use the "
                             "data-free obspa-30 / obspa-50 or spa-l2-50 on ONNX, or prune the PyTorch model")
        if model.is_onnx and (cfg.finetune_epochs or cfg.finetune_steps):
            raise SlimcError("spa cannot fine-tune an ONNX model; prune the PyTorch model to fine-tune it")

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg: SpaConfig = self.config
        onnx_fallback = None
        if model.is_onnx and (cfg.hessian in ("distilled", "synthetic") or cfg.reconstruct == "distilled"):
            # an ONNX graph cannot be run backwards to synthesise inputs: H from the BN statistics, no refit
            onnx_fallback = f"ONNX graph: hessian {cfg.hessian} -> bn, reconstruct {cfg.reconstruct} -> none"
            cfg = cfg.model_copy(update={"hessian": "bn", "reconstruct": "none",
                                         "compensate": cfg.compensate if cfg.compensate is not None else True})
        t_start = time.perf_counter()
        compensate = cfg.compensate if cfg.compensate is not None else cfg.criterion == "obs"
        training = getattr(ctx, "training", None) or {}
        data: TrainingData | None = None
        wanted = _needs_data(cfg) or bool(training.get("data"))
        if wanted or (not model.is_onnx and model.example_inputs is None and not model.is_causal_lm):  # data, or example inputs
            data = open_training_data(training.get("data") or cfg.data, model, samples=cfg.samples, seq_len=cfg.seq_len, seed=ctx.seed)
            if model.example_inputs is None and not model.is_causal_lm and not model.is_onnx:
                model.example_inputs = data.example_inputs(model.module)
        graph = model_graph(model)
        groups = find_groups(graph, None if model.is_onnx else model.module)
        cands = [g for g in groups if g.prunable and g.exact and g.size >= 2 and (cfg.roles is None or g.role in cfg.roles)]
        if not cands:
            why = why_nothing_prunable(groups) or "no prunable, exact group of the requested roles"
            return PassResult(model, modified=False, stats={"groups_found": len(groups), "nothing_removed": why})
        tensors = model_tensors(model)
        eps_of = _eps_lookup(model)
        before = data.evaluate(model.module) if data is not None and data.evaluate is not None and not model.is_onnx else {}

        consumers = consumers_of(graph, tensors)
        subs = {} if model.is_onnx else dict(model.module.named_modules())
        if not model.is_onnx and consumers and not any(isinstance(subs.get(c.module), (torch.nn.Conv2d, torch.nn.Linear))
                                                       for c in consumers.values()):
            # a flat graph (a loaded .pt2) has no layer modules to hook: what needs running the layers falls back
            if cfg.reconstruct == "data" or cfg.hessian == "calib" and (cfg.criterion == "obs" or compensate):
                raise SlimcError("spa needs to hook the model's conv / linear layers to calibrate them, and this model "
                                 "(a flat torch.export graph) has none; prune the original nn.Module (a trusted .pt) or "
                                 "use the data-free obspa-30 / obspa-50")
            if cfg.hessian in ("distilled", "synthetic") or cfg.reconstruct == "distilled":
                onnx_fallback = f"flat graph: hessian {cfg.hessian} -> bn, reconstruct {cfg.reconstruct} -> none"
                cfg = cfg.model_copy(update={"hessian": "bn", "reconstruct": "none"})
                compensate = cfg.compensate if cfg.compensate is not None else True
        hessians: dict[str, torch.Tensor] = {}
        h_sources: dict[str, int] = {}
        if cfg.criterion == "obs" or compensate:
            hessians, h_sources = self._hessians(model, graph, consumers, tensors, eps_of, cfg, data)
        t_scores = time.perf_counter()
        scores = self._scores(model, cands, tensors, consumers, hessians, graph, eps_of, cfg, data)
        score_seconds = time.perf_counter() - t_scores

        costs = None if cfg.budget == "channels" else CostModel(graph, cands, cfg.budget, shapes=_shapes(model) if cfg.budget == "params" else None)
        plan = allocate(cands, scores, costs, cfg)
        stats: dict[str, Any] = {}
        if cfg.reconstruct != "none" and plan:  # the sequential refit is the OBS update of every layer, in graph order
            if cfg.reconstruct == "data":
                batches, call = _batches(data, cfg), _caller(model, data)
            else:
                batches, call = self._distilled(model, cfg), _caller(model)
            stats["layers_refit"] = reconstruct(model, plan, consumers, graph, batches, cfg.percdamp, call)
        elif compensate and plan:
            stats["layers_compensated"] = self._compensate(model, plan, consumers, hessians, tensors, cfg)
        macs_before = graph_macs(graph)
        stats.update(apply_plan(model, plan))
        macs_after = graph_macs(model_graph(model)) if plan else macs_before
        after = data.evaluate(model.module) if data is not None and data.evaluate is not None and not model.is_onnx else {}
        tuned: dict[str, float] = {}
        if (cfg.finetune_epochs or cfg.finetune_steps) and (data is None or data.loss is None):
            raise SlimcError(f"spa fine-tuning needs data with a loss; --data {data.name if data else ''} has none "
                             "(an encoder's text calibrates only)")
        if plan and (cfg.finetune_epochs or cfg.finetune_steps) and data is not None:
            Trainer(model.module, data.train, data.loss,
                    TrainConfig(epochs=cfg.finetune_epochs or None, steps=cfg.finetune_steps, lr=cfg.lr, optimizer=cfg.optimizer,
                                weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, seed=ctx.seed)).fit()
            tuned = data.evaluate(model.module) if data.evaluate is not None else {}
        stats.update(
            criterion=cfg.criterion, allocation=cfg.allocation, budget=cfg.budget, sparsity=cfg.sparsity,
            groups_found=len(groups), groups_pruned=len(plan), channels_removed=sum(len(v) for v in plan.values()),
            channels_eligible=sum(g.size for g in cands), macs_before=macs_before, macs_after=macs_after,
            macs_kept=macs_after / macs_before if macs_before else 1.0,
            score_seconds=round(score_seconds, 3), spa_seconds=round(time.perf_counter() - t_start, 3),
        )
        if h_sources:
            stats["hessian_sources"] = h_sources
        if onnx_fallback:
            stats["fallback"] = onnx_fallback
        if data is not None:
            metric = data.metric
            for label, values in (("before", before), ("after", after), ("finetuned", tuned)):
                if metric in values:
                    stats[f"{metric}_{label}"] = values[metric]
        if not plan:
            stats["nothing_removed"] = "the budget rounds to no channel in the eligible groups"
        return PassResult(model, modified=bool(plan), stats=stats)

    # ------------------------------------------------------------ importance

    def _scores(self, model, cands, tensors, consumers, hessians, graph, eps_of, cfg, data) -> list[torch.Tensor]:
        if cfg.criterion == "obs":
            return self._obs_scores(cands, tensors, consumers, hessians, graph, eps_of, cfg)
        grads = fishers = None
        if cfg.criterion in NEEDS_GRADIENTS:
            grads, fishers = _gradients(model, data, cfg)
        raw = [channel_scores(g, tensors, cfg.criterion, cfg.aggregation, grads=grads, fishers=fishers, seed=cfg.seed) for g in cands]
        return normalise(raw, cfg.normalise)

    def _obs_scores(self, cands, tensors, consumers, hessians, graph, eps_of, cfg) -> list[torch.Tensor]:
        """Per channel: the summed one-shot OBS cost over the group's consumer slices, each relative to the consumer's
        output energy E||W x||^2 (after the following BatchNorm's scaling), so layers of any scale compare."""
        out = []
        for g in cands:
            systems, weights = [], []
            for s in g.slices:
                c = consumers.get(s.param)
                if c is None or s.axis % len(c.shape) != c.in_axis or s.param not in hessians:
                    continue
                W = c.matrix(tensors[s.param])
                scale = _output_scale(graph, c, tensors, eps_of)
                if scale is not None and scale.numel() == W.shape[0]:
                    W = W * scale[:, None]
                energy = float((W @ hessians[s.param] * W).sum())  # E||W x||^2: costs become relative output errors
                systems.append((W, hessians[s.param], c.columns(s.index)))
                weights.append(1.0 / max(energy, 1e-30))
            if not systems:  # no consumer with an H (e.g. the group feeds only the output): fall back to L2
                out.append(channel_scores(g, tensors, "l2", "sum"))
            elif cfg.obs_ranking == "greedy":
                out.append(greedy_scores(systems, cfg.percdamp, weights))
            else:
                out.append(sum(wt * channel_costs(W, H, cols, cfg.percdamp) for (W, H, cols), wt in zip(systems, weights)))
        return normalise(out, cfg.normalise)

    # ------------------------------------------------------------ Hessians

    def _hessians(self, model, graph, consumers, tensors, eps_of, cfg, data) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        hs: dict[str, torch.Tensor] = {}
        sources = {"calib": 0, "bn": 0, "synthetic": 0, "distilled": 0}
        if cfg.hessian == "bn":
            for name, c in consumers.items():
                moments = input_moments(c.node, tensors, eps_of, seed=cfg.seed)
                if moments is not None and moments[0].numel() * c.per_channel == c.matrix(tensors[name]).shape[1]:
                    hs[name] = hessian_from_moments(moments[0], moments[1], c.per_channel)
                    sources["bn"] += 1
        missing = [n for n in consumers if n not in hs]
        if missing and not model.is_onnx:
            layers = {consumers[n].module: n for n in missing}
            if cfg.hessian == "calib" and data is not None:
                batches, kind = _batches(data, cfg), "calib"
            elif cfg.hessian == "distilled":
                batches, kind = self._distilled(model, cfg), "distilled"
            else:
                batches, kind = _synthetic_batches(model, cfg), "synthetic"
            from slimc.compiler.calibration.hessians import input_hessians

            got = input_hessians(model.module, list(layers), batches, call=_caller(model, data if kind == "calib" else None))
            for path, H in got.items():
                name = layers[path]
                if H.shape[0] == consumers[name].matrix(tensors[name]).shape[1]:
                    hs[name] = H
                    sources[kind] += 1
        return hs, {k: v for k, v in sources.items() if v}

    def _distilled(self, model: Model, cfg: SpaConfig) -> list[dict]:
        if getattr(self, "_distilled_cache", None) is None:
            self._distilled_cache = distill_inputs(model, cfg)
        return self._distilled_cache

    # ------------------------------------------------------------ OBS update

    def _compensate(self, model, plan, consumers, hessians, tensors, cfg) -> int:
        removed_cols: dict[str, list[torch.Tensor]] = {}
        for g, chans in plan.items():
            ch = torch.as_tensor(chans, dtype=torch.long)
            for s in g.slices:
                c = consumers.get(s.param)
                if c is None or s.axis % len(c.shape) != c.in_axis or s.param not in hessians:
                    continue
                removed_cols.setdefault(s.param, []).append(c.columns(s.index[ch]).reshape(-1))
        done = 0
        for name, cols in removed_cols.items():
            c = consumers[name]
            Q = torch.unique(torch.cat(cols))
            W = c.matrix(tensors[name])
            H = dampen(hessians[name], cfg.percdamp)
            try:
                Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
            except RuntimeError:
                continue
            new = W + removal_update(W, Hinv, Q)
            new[:, Q] = 0.0
            _write(model, name, c.unmatrix(new), tensors)
            done += 1
        return done


def _write(model: Model, name: str, value: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    if model.is_onnx:
        import onnx_ir as ir

        v = model.onnx.graph.initializers[name]
        dtype = v.const_value.numpy().dtype
        v.const_value = ir.tensor(np.ascontiguousarray(value.numpy().astype(dtype)), name=name)
    else:
        t = tensors[name]
        with torch.no_grad():
            t.copy_(value.to(t.dtype))


def _shapes(model: Model) -> dict[str, tuple[int, ...]]:
    if model.is_onnx:
        return {n: tuple(v.shape) for n, v in model.onnx.graph.initializers.items() if v.shape is not None}
    return {n: tuple(p.shape) for n, p in model.module.named_parameters()}


def _caller(model: Model, data: TrainingData | None = None):
    if data is not None:
        return data.call
    if model.is_causal_lm:
        return lambda m, b: m(**b, use_cache=False) if isinstance(b, dict) else m(input_ids=b[0], use_cache=False)
    return None


def _batches(data: TrainingData, cfg: SpaConfig) -> list[tuple]:
    ds = data.train
    n = min(cfg.samples, len(ds))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(ds), generator=g)[:n]
    out = []
    for idx in order.split(cfg.batch_size):
        out.append(collate([ds[int(i)] for i in idx]))
    return out


def _synthetic_batches(model: Model, cfg: SpaConfig) -> list[tuple]:
    """Random inputs shaped like the example inputs: uniform [0, 1) for inputs that lie in [0, 1], N(0, 1)
    for other float inputs, random ids below the vocabulary for integer inputs."""
    example = model.example_inputs or {}
    if not example and model.is_causal_lm:
        example = {"input_ids": torch.zeros(1, cfg.seq_len, dtype=torch.long)}
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for _ in range(max(1, math.ceil(cfg.samples / cfg.batch_size))):
        kw = {}
        for k, v in example.items():
            if not isinstance(v, torch.Tensor):
                kw[k] = v
                continue
            shape = (cfg.batch_size, *v.shape[1:])
            if v.is_floating_point():
                unit = v.numel() == 0 or (float(v.min()) >= 0.0 and float(v.max()) <= 1.0)
                kw[k] = torch.rand(shape, generator=g) if unit else torch.randn(shape, generator=g)
            else:
                high = int(getattr(model.config, "vocab_size", 0) or int(v.max()) + 1)
                kw[k] = torch.randint(0, max(1, high), shape, generator=g)
        batches.append(kw)
    return batches


def _gradients(model: Model, data: TrainingData | None, cfg: SpaConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per weight, the sum over small batches of |gradient| (for Taylor: sum_b |w g_b|, not |w sum_b g_b|: on a
    converged model the summed gradient is close to zero and its sign noise, while the per-batch terms say how much
    each weight moves the loss), and the mean squared per-batch gradient (diagonal empirical Fisher, for OBD)."""
    if data is None or data.loss is None:
        raise SlimcError(f"spa criterion '{cfg.criterion}' needs data with a loss (labelled examples or a causal LM's "
                         "text): give --data, or use a criterion without gradients (l2, obs)")
    module = model.module
    params = dict(module.named_parameters(remove_duplicate=False))
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    fishers = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    was = module.training
    module.eval()  # BN with its running statistics, no dropout: the model that will be pruned
    batches = _batches(data, cfg.model_copy(update={"batch_size": cfg.gradient_batch}))
    try:
        for batch in batches:
            module.zero_grad(set_to_none=True)
            data.loss(module, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    g = p.grad.detach().to(torch.float64)
                    grads[n] += g.abs()
                    fishers[n] += g * g
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was)
    return grads, {n: f / len(batches) for n, f in fishers.items()}


# ---------------------------------------------------------------- allocation


def _floors_and_multiples(groups: list[Group], cfg: SpaConfig) -> tuple[list[int], list[int]]:
    floors, multiples = [], []
    for g in groups:
        m = g.multiple_of
        if cfg.round_to > 1 and g.size >= 2 * cfg.round_to:
            m = math.lcm(m, cfg.round_to)
        multiples.append(m)
        floors.append(max(1, m, math.ceil(cfg.min_keep * g.size)))
    return floors, multiples


def _cost_fns(costs: CostModel | None, groups: list[Group]):
    if costs is None:
        return (lambda removed: float(sum(g.size - r for g, r in zip(groups, removed))), lambda removed, gi, n=1: float(n),
                float(sum(g.size for g in groups)), 0.0)
    return costs.cost, costs.saving, float(costs.total), float(costs.fixed)


def allocate(groups: list[Group], scores: list[torch.Tensor], costs: CostModel | None, cfg: SpaConfig) -> dict[Group, list[int]]:
    """{group: channels to remove} meeting `cfg.sparsity` of the budget by `cfg.allocation`."""
    cost, saving, total, _ = _cost_fns(costs, groups)
    target = total * (1.0 - cfg.sparsity)
    floors, multiples = _floors_and_multiples(groups, cfg)
    none: list[list[int]] = [[] for _ in groups]
    if cfg.allocation == "global":
        chosen = select_channels(scores, none, cost, saving, target, floors, multiples)
    elif cfg.allocation == "local":
        chosen = _local(groups, scores, cost, target, floors, multiples)
    else:
        chosen = [[] for _ in groups]
        buckets: dict[tuple, list[int]] = {}
        for gi, g in enumerate(groups):
            buckets.setdefault(_signature(g, costs), []).append(gi)
        for members in buckets.values():
            # the bucket's own share: what removing all of its channels would save
            full = [0] * len(groups)
            for gi in members:
                full[gi] = groups[gi].size
            share = total - cost(full)
            sub_scores = [scores[gi] for gi in members]

            def sub_cost(removed, members=members):
                r = [0] * len(groups)
                for gi, n in zip(members, removed):
                    r[gi] = n
                return cost(r)

            def sub_saving(removed, i, n=1, members=members):
                r = [0] * len(groups)
                for gi, k in zip(members, removed):
                    r[gi] = k
                return saving(r, members[i], n)

            picked = select_channels(sub_scores, [[] for _ in members], sub_cost, sub_saving, total - cfg.sparsity * share,
                                     [floors[gi] for gi in members], [multiples[gi] for gi in members])
            for gi, p in zip(members, picked):
                chosen[gi] = p
    return {g: c for g, c in zip(groups, chosen) if c}


def _signature(g: Group, costs: CostModel | None) -> tuple:
    """Groups of the same structure: role, size, and the shapes (and cut axes) of the tensors they cut."""
    return (g.role, g.size, tuple(sorted((s.axis, int(s.index.shape[1])) for s in g.slices)), len(g.slices))


def _local(groups, scores, cost, target, floors, multiples) -> list[list[int]]:
    """The same fraction r of every group (its lowest-scored channels), r the smallest that meets the target."""

    def pick(r: float) -> list[list[int]]:
        out = []
        for g, s, floor, m in zip(groups, scores, floors, multiples):
            keep = max(floor, g.size - math.floor(r * g.size + 1e-9))
            if m > 1:
                keep = min(g.size, math.ceil(keep / m) * m)
            n = g.size - keep
            out.append(torch.sort(torch.argsort(s, stable=True)[:n]).values.tolist() if n > 0 else [])
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost([len(p) for p in pick(mid)]) <= target:
            hi = mid
        else:
            lo = mid
    return pick(hi)


# ---------------------------------------------------------------- reconstruction and data-free inputs


def reconstruct(model: Model, plan: dict[Group, list[int]], consumers: dict[str, Consumer], graph: Graph,
                batches: list, percdamp: float, call=None) -> int:
    """Zero the plan's channels, then refit every conv / linear layer in graph order so that, on `batches`
    through the pruned model, it reproduces the dense model's layer output (least squares, ridge
    percdamp * mean diag): W' = W C^T (H + lambda I)^-1 over the kept input columns (and the bias, where the
    layer has one). Layers before any cut see the dense inputs and are left alone. Returns the layers refit."""
    import copy

    from slimc.compiler.calibration.hessians import paired_input_moments
    from slimc.compiler.surgery import mask_plan

    dense = copy.deepcopy(model.module)
    mask_plan(model, plan)
    work = model.module
    removed: dict[str, torch.Tensor] = {}
    for g, chans in plan.items():
        ch = torch.as_tensor(chans, dtype=torch.long)
        for s in g.slices:
            c = consumers.get(s.param)
            if c is not None and s.axis % len(c.shape) == c.in_axis:
                cols = c.columns(s.index[ch]).reshape(-1)
                removed[s.param] = torch.unique(torch.cat([removed.get(s.param, cols), cols]))
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    params = dict(work.named_parameters())
    dense_params = dict(dense.named_parameters())
    call = call if call is not None else _caller(model)
    done = 0
    for name, c in sorted(consumers.items(), key=lambda kv: position[id(kv[1].node)]):
        bias_name = f"{c.module}.bias"
        has_bias = bias_name in params and c.node.op == "linear"
        got = paired_input_moments(dense, work, c.module, batches, call=call, bias=has_bias)
        if got is None or name not in params:
            continue
        H, C = got
        W = c.matrix(dense_params[name])
        if has_bias:
            W = torch.cat([W, dense_params[bias_name].detach().to(torch.float64).reshape(-1, 1)], 1)
        if name not in removed and torch.allclose(H, C, rtol=1e-9, atol=1e-12):
            continue  # this layer still sees the dense inputs
        keep = torch.ones(W.shape[1], dtype=torch.bool)
        if name in removed:
            keep[removed[name]] = False
        K = keep.nonzero().reshape(-1)
        Hk = dampen(H[K][:, K], percdamp)
        try:
            sol = torch.linalg.solve(Hk, C[K] @ W.T)  # [k, out]: argmin E|| W x - W'_K x'_K ||^2
        except RuntimeError:
            continue
        new = torch.zeros_like(W)
        new[:, K] = sol.T
        with torch.no_grad():
            if has_bias:
                params[bias_name].copy_(new[:, -1].to(params[bias_name].dtype))
                new = new[:, :-1]
            params[name].copy_(c.unmatrix(new).to(params[name].dtype))
        done += 1
    return done


def distill_inputs(model: Model, cfg: SpaConfig) -> list[dict]:
    """Inputs synthesised without data so that every BatchNorm layer sees its running statistics (the batch
    mean and standard deviation of each BN input channel matched to running_mean / sqrt(running_var) by Adam
    on the inputs; the model is not changed). Batches of `batch_size`, `samples` in all; the inputs start
    as `_synthetic_batches` draws."""
    module = model.module
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    start = _synthetic_batches(model, cfg)
    if not bns:
        return start
    feats: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: feats.append(args[0])) for m in bns]
    was = module.training
    module.eval()
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    out = []
    try:
        for kw in start:
            keys = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
            xs = {k: kw[k].clone().requires_grad_(True) for k in keys}
            opt = torch.optim.Adam(list(xs.values()), lr=0.1)
            for _ in range(cfg.distill_steps):
                feats.clear()
                opt.zero_grad()
                module(**{**kw, **xs})
                loss = 0.0
                for bn, f in zip(bns, feats):
                    dims = [d for d in range(f.dim()) if d != 1]
                    mean, std = f.mean(dims), f.var(dims, unbiased=False).add(bn.eps).sqrt()
                    loss = loss + (mean - bn.running_mean).pow(2).mean() + (std - (bn.running_var + bn.eps).sqrt()).pow(2).mean()
                loss.backward()
                opt.step()
            out.append({**kw, **{k: v.detach() for k, v in xs.items()}})
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        module.train(was)
    return out
