"""FLAP: fluctuation-based adaptive structured pruning of decoder LLMs (An et al., AAAI 2024).

One calibration pass of the dense model collects, at the input of every o_proj and down_proj, the
mean and variance of each channel. Each input channel j gets a score (default WIFV:
var_j * ||W[:, j]||^2; attention channel scores are squared, as in the reference code, unless
`square_attn: false`); scores are z-scored per (layer, module); a KV group (one KV head and its G
query heads) scores the mean of its G*head_dim o_proj channels, a neuron its down_proj channel
(criteria `flap-ifv` / `flap-wifv` / `flap-wifn`). With the default structure (AL-AM) all units of
all layers compete in one pool and the highest-scoring are kept until the kept parameters are
nearest (1 - sparsity) of the decoder's attention+MLP parameters; a KV group costs
(2G+2)*head_dim*hidden parameters, a neuron 3*hidden. Removed channels are compensated by a bias
on o_proj / down_proj, b = W[:, R] mean(x_R), so the layer's mean output on calibration data is
unchanged; `compensation: lsq` also refits the kept columns by least squares on the dense
statistics, and `compensation: lsq-seq` refits layer by layer against the dense model's outputs on
the already-pruned prefix (see `structured.compensation`, `structured.sequential`).

    name: flap-20
    passes:
      - flap: {sparsity: 0.2, metric: wifv, structure: AL-AM, samples: 128, seq_len: 128, seed: 0}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from slimc.compiler.calibration.stats import InputStats, LayerStats
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import register_pass
from slimc.passes.structured import allocators as al
from slimc.passes.structured.compensation import compensate  # noqa: F401 — part of FLAP's public surface
from slimc.passes.structured.pruner import StructuredConfig, StructuredPlan, StructuredPrune
from slimc.passes.structured.units import decoder_units


class FlapConfig(StructuredConfig):
    metric: Literal["ifv", "wifv", "wifn"] = "wifv"
    structure: Literal["UL-UM", "UL-MM", "AL-MM", "AL-AM"] = "AL-AM"
    attn_sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="UL-MM/AL-MM: attention's own removal fraction")
    bias_compensation: bool = True
    compensation: Literal["mean", "lsq", "lsq-seq"] = "mean"
    square_attn: bool = Field(True, description="square the attention channel scores before z-scoring, as the reference code does (false: the paper's formula)")

    @model_validator(mode="after")
    def _check(self) -> "FlapConfig":
        if self.compensation != "mean" and not self.bias_compensation:
            raise ValueError(f"compensation '{self.compensation}' includes the mean bias; set bias_compensation: true or use compensation: mean")
        if self.attn_sparsity is not None and self.structure not in ("UL-MM", "AL-MM"):
            raise ValueError("attn_sparsity only applies to structures UL-MM and AL-MM")
        return self


@register_pass
class Flap(StructuredPrune):
    name = "flap"
    description = "FLAP structured pruning of KV groups and MLP neurons with bias compensation"
    Config = FlapConfig

    @property
    def criterion_name(self) -> str:  # type: ignore[override]
        return f"flap-{self.config.metric}"

    def score_options(self) -> dict:
        return {"square_attn": self.config.square_attn}

    def compensation_mode(self) -> str:
        return self.config.compensation if self.config.bias_compensation else "none"

    def allocate(self, attn, mlp, sparsity, collected):
        return al.allocate(attn, mlp, sparsity, self.config.structure, self.config.attn_sparsity)

    def plan(self, model, tokens, collected=None) -> StructuredPlan:
        fp = super().plan(model, tokens, collected)
        fp.stats.update(metric=self.config.metric, structure=self.config.structure)
        return fp


def flap_targets(model: Model) -> list[str]:
    """The modules whose input statistics FLAP needs: every o_proj and down_proj."""
    return [u.out_proj for pair in decoder_units(model) for u in pair]


def plan_flap(model: Model, tokens: torch.LongTensor, cfg: FlapConfig, stats: dict[str, InputStats] | None = None) -> StructuredPlan:
    """FLAP's choice on calibration `tokens` (the model is not changed); `stats` (from
    `collect_input_stats` on `flap_targets`) skips the calibration run."""
    return Flap(cfg).plan(model, tokens, None if stats is None else (LayerStats(stats), {}))
