"""CFSP: coarse-to-fine structured pruning of LLM MLPs by activation information (COLING 2025).

Coarse: every decoder layer's block importance is the mean, over calibration tokens, of the angular
distance between the hidden states entering and leaving it, I_l = mean_t arccos(cos(h_in, h_out)) / pi
(the cosine clamped to [-1, 1]). Keep ratios r_l = keep * s_l / mean(s) with
s_l = sigmoid(slope * (I_l - mean(I)) / temperature), capped at `max_keep` with the excess spread
over the other layers, so layers that change the residual stream more keep more neurons. The
reference divides a token *sum* of angles by 1e4, which makes its temperature depend on the
number of calibration tokens; here I_l is a per-token mean and the temperature explicit (0.61 is
the reference's 1e4 at 128 x 128 calibration tokens).

Fine: inside each layer the neurons with the highest CFSP score are kept (criterion `cfsp`):
|W| of every tensor slice a neuron owns (gate row, up row, down column) normalised over the
layer's neurons, the down column weighted by a_j^b, summed, averaged over the hidden axis and
times a_j^c, a_j the RMS of the neuron's down_proj input. The released code normalises over the
hidden axis instead, which collapses the score to (3/d) a_j^c: `code_faithful: true` keeps that.

Only MLP neurons are removed, as in the paper; the sparsity is still the fraction of the decoder
layers' attention + MLP parameters, all of it taken from the MLPs. No compensation by default
(`compensation: mean | lsq | lsq-seq` work as for FLAP).

    name: cfsp-20
    passes:
      - cfsp: {sparsity: 0.2, temperature: 0.61, samples: 128, seq_len: 128}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimc.compiler.pipeline.passes import register_pass
from slimc.errors import SlimcError
from slimc.passes.structured import allocators as al
from slimc.passes.structured.pruner import StructuredConfig, StructuredPrune


class CfspConfig(StructuredConfig):
    compensation: Literal["none", "mean", "lsq", "lsq-seq"] = "none"
    temperature: float = Field(0.61, gt=0.0, description="block-importance temperature (per-token mean angles)")
    slope: float = Field(1.0, gt=0.0, description="sigmoid slope a of the coarse allocation")
    max_keep: float = Field(0.95, gt=0.0, le=1.0, description="cap on any layer's kept MLP fraction")
    b: float = Field(1.0, description="exponent of the activation weighting the down_proj term")
    c: float = Field(1.0, description="exponent of the activation scaling the whole score")
    code_faithful: bool = Field(False, description="the released code's fine score (normalised over the mean's axis)")


@register_pass
class Cfsp(StructuredPrune):
    name = "cfsp"
    description = "CFSP: angular block importance allocates MLP widths, an activation-weighted fine score picks neurons"
    Config = CfspConfig
    criterion_name = "cfsp"
    prunes_attention = False

    def wants_block_angles(self) -> bool:
        return True

    def score_options(self) -> dict:
        cfg = self.config
        return {"cfsp_b": cfg.b, "cfsp_c": cfg.c, "cfsp_faithful": cfg.code_faithful}

    def allocate(self, attn, mlp, sparsity, collected):
        cfg = self.config
        if collected is None or collected.block_angle is None:
            raise SlimcError("cfsp needs block angles from the calibration pass")
        importance = torch.tensor([collected.block_angle[s.layer] for s in mlp], dtype=torch.float64)
        return [], al.block_sigmoid(mlp, importance, sparsity, cfg.temperature, cfg.slope, cfg.max_keep)
