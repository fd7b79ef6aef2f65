"""`llm-prune`: LLM structured pruning with the criterion, allocator and compensation chosen freely.

The family's pieces (`passes.structured`) composed by name, for the combinations no single paper
ships: e.g. NIRVANA's saliency with FLAP's global cost-weighted pool and least-squares
compensation. The shipped `llm-prune-20` / `llm-prune-50` recipes hold the combination that
measured best on the calibration split (BENCHMARKS.md).

    criterion   flap-ifv | flap-wifv | flap-wifn | wanda-sp | cfsp | obs | saliency | taylor | magnitude
    allocator   global (one cost-weighted pool, FLAP AL-AM) | per-module (AL-MM) | uniform (UL-UM)
                | two-pools (NIRVANA, `gamma`) | block-sigmoid (CFSP, MLP only, `temperature`)
    normalize   z-score each (layer, module) set's unit scores (the flap-* criteria already are)
    compensation none | mean | lsq | lsq-seq

    name: llm-prune-20
    passes:
      - llm-prune: {sparsity: 0.2, criterion: flap-wifv, allocator: global, compensation: lsq}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from slimc.compiler.pipeline.passes import register_pass
from slimc.errors import SlimcError
from slimc.passes.structured import allocators as al
from slimc.passes.structured.criteria import CRITERIA
from slimc.passes.structured.pruner import StructuredConfig, StructuredPrune

CriterionName = Literal["flap-ifv", "flap-wifv", "flap-wifn", "wanda-sp", "cfsp", "obs", "saliency", "taylor", "magnitude"]


class LlmPruneConfig(StructuredConfig):
    criterion: CriterionName = "flap-wifv"
    allocator: Literal["global", "per-module", "uniform", "two-pools", "block-sigmoid"] = "global"
    normalize: bool = Field(False, description="z-score each (layer, module) set's unit scores before allocating")
    square_attn: bool = Field(True, description="flap-* criteria: square the attention channel scores")
    gamma: float = Field(3.0, gt=0.0, description="two-pools: MLP removal fraction / attention removal fraction")
    temperature: float = Field(0.61, gt=0.0, description="block-sigmoid: block-importance temperature")
    max_keep: float = Field(0.95, gt=0.0, le=1.0, description="block-sigmoid: cap on a layer's kept MLP fraction")
    round_up: bool = Field(False, description="round each layer's kept MLP width up (else pooled to keep the total)")
    attn_sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="per-module / block-sigmoid: the attention's own "
                                        "removal fraction (one global pool of KV groups), the MLPs remove the rest")

    @model_validator(mode="after")
    def _check(self) -> "LlmPruneConfig":
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}")
        if self.attn_sparsity is not None and self.allocator not in ("per-module", "block-sigmoid"):
            raise ValueError("attn_sparsity only applies to the per-module and block-sigmoid allocators")
        return self


@register_pass
class LlmPrune(StructuredPrune):
    name = "llm-prune"
    description = "LLM structured pruning composed from a criterion, an allocator and a compensation"
    Config = LlmPruneConfig

    @property
    def criterion_name(self) -> str:  # type: ignore[override]
        return self.config.criterion

    @property
    def prunes_attention(self) -> bool:  # type: ignore[override]
        return self.config.allocator != "block-sigmoid" or bool(self.config.attn_sparsity)

    def normalize(self) -> bool:
        return self.config.normalize

    def wants_block_angles(self) -> bool:
        return self.config.allocator == "block-sigmoid"

    def score_options(self) -> dict:
        return {"square_attn": self.config.square_attn}

    def allocate(self, attn, mlp, sparsity, collected):
        cfg = self.config
        if cfg.allocator == "two-pools":
            return al.two_pools(attn, mlp, sparsity, cfg.gamma)
        if cfg.allocator == "block-sigmoid":
            if collected is None or collected.block_angle is None:
                raise SlimcError("llm-prune: allocator block-sigmoid needs block angles from the calibration pass")
            importance = torch.tensor([collected.block_angle[s.layer] for s in mlp], dtype=torch.float64)
            attn_keep: list[torch.Tensor] = []
            if attn:  # attention in one global pool at its own fraction; the MLPs take the rest of the budget
                a_frac, sparsity = al.module_ratios(attn, mlp, sparsity, cfg.attn_sparsity)
                attn_keep = al.select_global(attn, (1.0 - a_frac) * sum(s.total for s in attn))
            return attn_keep, al.block_sigmoid(mlp, importance, sparsity, cfg.temperature, 1.0, cfg.max_keep)
        structure = {"global": "AL-AM", "per-module": "AL-MM", "uniform": "UL-UM"}[cfg.allocator]
        return al.allocate(attn, mlp, sparsity, structure, cfg.attn_sparsity if cfg.allocator == "per-module" else None)

    def round(self, masks, scores):
        if self.config.round_up:
            return al.round_up_keep(masks, scores, self.config.round_neurons_to)
        return super().round(masks, scores)
