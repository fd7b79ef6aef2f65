"""NIRVANA: saliency-driven structured pruning of KV groups and MLP neurons (arXiv 2509.14230).

Saliency: one backward of the output proxy f = mean over windows and vocabulary of the max over
positions of the logits (no labels), s = |theta * df/dtheta| (`compiler.calibration.gradients`,
objective `max_logit`, micro-batches of 4 windows so memory stays bounded). A unit scores the L1
of s over every weight it owns: a KV group its q, k, v rows and o_proj columns, a neuron its
gate row, up row and down column (criterion `saliency`).

Allocation: attention units and neurons each form one global pool; the MLP removes gamma times
the attention's fraction, f_a A + gamma f_a M = p (A + M) (A, M: the decoder's attention and MLP
parameters), every layer keeps at least one unit of each kind, and kept MLP widths are rounded
up to a multiple of 8. With `kl_draws` > 1, that many calibration draws (seeds seed, seed + 1, ...)
are each scored and pruned, and the draw whose pruned model has the lowest token-mean
KL(dense || pruned) on `kl_samples` x `kl_seq_len` other calibration tokens is kept.

    name: nirvana-20
    passes:
      - nirvana: {sparsity: 0.2, gamma: 3.0, samples: 32, seq_len: 128}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimc.compiler.calibration.evaluation import mean_kl
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext, PassResult, register_pass
from slimc.passes.structured import allocators as al
from slimc.passes.structured.pruner import StructuredConfig, StructuredPrune

KL_SEED_OFFSET = 1000  # the KL windows are drawn apart from every calibration draw's seed


class NirvanaConfig(StructuredConfig):
    compensation: Literal["none", "mean", "lsq", "lsq-seq"] = "none"
    gamma: float = Field(3.0, gt=0.0, description="MLP removal fraction / attention removal fraction")
    samples: int = Field(32, ge=1, description="calibration windows for the saliency backward")
    round_neurons_to: int = Field(8, ge=1, description="round each layer's kept MLP width up to a multiple of this")
    kl_draws: int = Field(1, ge=1, description="calibration draws to choose from by KL(dense || pruned); 1: no choice")
    kl_samples: int = Field(128, ge=1, description="windows of the KL comparison")
    kl_seq_len: int = Field(64, ge=2, description="tokens per KL window")


@register_pass
class Nirvana(StructuredPrune):
    name = "nirvana"
    description = "NIRVANA: |theta * grad| of a max-logit proxy scores KV groups and neurons, two pools with ratio gamma"
    Config = NirvanaConfig
    criterion_name = "saliency"

    def allocate(self, attn, mlp, sparsity, collected):
        return al.two_pools(attn, mlp, sparsity, self.config.gamma)

    def round(self, masks, scores):
        return al.round_up_keep(masks, scores, self.config.round_neurons_to)

    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        if cfg.sparsity == 0.0 or cfg.kl_draws == 1:
            return super().call(model, ctx)
        seed = ctx.seed if cfg.seed is None else cfg.seed
        kl_tokens, _ = ctx.calibration_tokens(model, cfg.calibration, cfg.kl_samples, cfg.kl_seq_len, seed + KL_SEED_OFFSET)
        best = None
        for draw in range(cfg.kl_draws):
            tokens, _ = ctx.calibration_tokens(model, cfg.calibration, cfg.samples, cfg.seq_len, seed + draw)
            plan = self.plan(model, tokens)
            trial = model.clone()
            self.apply(trial, plan, tokens)
            kl = mean_kl(model, trial, kl_tokens, batch_size=cfg.batch_size)
            del trial
            if best is None or kl < best[0]:
                best = (kl, draw, plan, tokens)
        kl, draw, plan, tokens = best
        removed = self.apply(model, plan, tokens)
        plan.stats.update(kl_draw=draw, kl=round(kl, 6), kl_draws=cfg.kl_draws)
        return PassResult(model, removed > 0, {"params_removed": removed, **plan.stats})
