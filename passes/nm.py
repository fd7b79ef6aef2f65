"""`nm`: N:M semi-structured sparsity — keep N of every M consecutive inputs of each output row.

Every nn.Linear not matched by `skip` (fnmatch patterns on module paths; default: embeddings and
lm_head) gets an N:M mask along its input axis, chosen by

    magnitude:  keep the N largest |W_ij| of each group
    wanda:      keep the N largest |W_ij| * ||X_j||_2 of each group (X: calibration inputs of the layer)
    sparsegpt:  OBS column by column: prune by w^2 / [H^-1]_jj^2 per group of M columns and spread the
                error over the remaining columns (H = X X^T + 1% mean-diagonal damping, blocks of 128);
                see `_sparsegpt_math.py`.

Calibration statistics (`sqnorm` for Wanda, `gram` for SparseGPT) come from one layer-by-layer
pass of the dense model (`compiler.calibration.stats.collect_input_stats`) over `samples` windows of
`seq_len` tokens of the context's calibration source (else `calibration`: the built-in pydoc split).
With `sequential: true` each decoder layer is instead calibrated on the outputs of the layers before
it *after* they were pruned (as in the SparseGPT paper), so later layers compensate earlier errors.
With `format: packed` the masked layers become `SparseLinear` (values + 2-bit positions, see
`runtime/sparse_format.py`), which checkpoints store compressed; `format: dense` keeps nn.Linear
with zeros. Layers already N:M sparse are left alone, so a second run changes nothing.

Recipe:

    name: nm-2of4-wanda
    passes:
      - nm: {n: 2, m: 4, method: wanda, samples: 128, seq_len: 256, format: packed}
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimc.compiler.calibration.layerwise import DecoderStream, decoder_layer_index, input_hooks
from slimc.compiler.calibration.stats import accumulators, collect_input_stats, feed
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import (
    NEEDS_CALIBRATION,
    NEEDS_DECODER_LM,
    NEEDS_TORCH,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
    register_pass,
)
from slimc.errors import PostconditionError, SlimcError
from slimc.passes._nm_math import magnitude_scores, nm_mask_from_scores, wanda_scores
from slimc.passes._sparsegpt_math import sparsegpt_nm
from slimc.runtime.sparse_format import check_nm, is_nm_sparse
from slimc.runtime.sparse_linear import SparseLinear, shares_weight, to_sparse


class NMConfig(PassConfig):
    n: int = Field(2, ge=1, le=255, description="weights kept per group")
    m: int = Field(4, ge=2, le=256, description="group size (consecutive inputs of one output row)")
    method: Literal["magnitude", "wanda", "sparsegpt"] = Field("wanda", description="how the kept weights are chosen")
    skip: tuple[str, ...] = Field(
        ("*embed*", "lm_head", "*.lm_head"), description="fnmatch patterns of module paths left dense"
    )
    calibration: str = Field("pydoc", description="calibration text when the context gives none: pydoc, .txt, .jsonl")
    samples: int = Field(128, ge=1, description="calibration windows (wanda, sparsegpt)")
    seq_len: int = Field(256, ge=2, description="tokens per calibration window")
    seed: int | None = Field(None, description="calibration window seed; default: the context's seed")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="SparseGPT damping, fraction of mean diag(H)")
    block_size: int = Field(128, ge=1, description="SparseGPT column block (a multiple of m)")
    format: Literal["packed", "dense"] = Field("packed", description="packed: SparseLinear; dense: nn.Linear with zeros")
    sequential: bool = Field(
        False, description="calibrate each decoder layer on the outputs of the already-pruned layers (LLMs; ~2x calibration time)"
    )

    @model_validator(mode="after")
    def _check(self) -> "NMConfig":
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m (got {self.n}:{self.m})")
        if self.block_size % self.m:
            raise ValueError(f"block_size {self.block_size} must be a multiple of m={self.m}")
        return self


def _packable(in_features: int, n: int, m: int) -> bool:
    try:
        check_nm(n, m, in_features)
    except SlimcError:
        return False
    return True


@register_pass
class NM(Pass):
    name = "nm"
    description = "N:M semi-structured sparsity (2:4, 4:8, ...) by magnitude, Wanda or SparseGPT"
    Config = NMConfig

    def targets(self, module: nn.Module) -> tuple[list[str], dict[str, str]]:
        """Linear layers to sparsify, and the skipped ones with the reason."""
        cfg: NMConfig = self.config
        out, skipped = [], {}
        for path, mod in module.named_modules():
            if isinstance(mod, SparseLinear) or not isinstance(mod, nn.Linear):
                continue
            if any(fnmatchcase(path, pat) for pat in cfg.skip):
                skipped[path] = "skip pattern"
            elif mod.in_features % cfg.m or (cfg.format == "packed" and not _packable(mod.in_features, cfg.n, cfg.m)):
                skipped[path] = f"{mod.in_features} inputs do not split into groups of {cfg.m}"
            elif shares_weight(module, path, mod.weight):
                skipped[path] = "weight tied to another module"
            else:
                out.append(path)
        return out, skipped

    stage = "sparsity"

    def needs(self) -> frozenset[str]:
        if self.config.method == "magnitude":
            return frozenset({NEEDS_TORCH})
        return frozenset({NEEDS_DECODER_LM, NEEDS_CALIBRATION})

    def _prune(self, lin: nn.Linear, stats: Any) -> int:
        """Apply the N:M choice to one layer in place; `stats` has `sqnorm` / `gram`. Returns weights zeroed."""
        cfg: NMConfig = self.config
        w = lin.weight
        if cfg.method == "sparsegpt":
            new_w, _ = sparsegpt_nm(w, stats.gram, cfg.n, cfg.m, block_size=cfg.block_size, damp=cfg.damp)
        else:
            scores = magnitude_scores(w) if cfg.method == "magnitude" else wanda_scores(w, stats.sqnorm)
            mask = nm_mask_from_scores(scores, cfg.n, cfg.m).to(w.device)
            new_w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
        new_w = new_w.to(w.device)
        zeroed = int(((w != 0) & (new_w == 0)).sum())
        w.copy_(new_w)
        return zeroed

    def _one_shot(self, model: Model, tokens: torch.Tensor, paths: list[str]) -> int:
        cfg: NMConfig = self.config
        stats = collect_input_stats(model, tokens, paths, gram=cfg.method == "sparsegpt", batch_size=cfg.batch_size)
        return sum(self._prune(model.module.get_submodule(p), stats[p]) for p in paths)

    def _sequential(self, model: Model, tokens: torch.Tensor, paths: list[str]) -> int:
        """Decoder layer by layer: calibrate layer i on the outputs of the already-pruned layers before it."""
        cfg: NMConfig = self.config
        module = model.module
        by_layer: dict[int, list[str]] = {}
        outside = []
        for p in paths:
            i = decoder_layer_index(module, p)
            (outside if i is None else by_layer.setdefault(i, [])).append(p)
        zeroed = 0
        if outside:  # e.g. an lm_head not skipped: statistics of the dense model
            zeroed += self._one_shot(model, tokens, outside)
        if not by_layer:
            return zeroed
        last = max(by_layer)
        stream = DecoderStream.capture(module, tokens, cfg.batch_size)
        for i in range(last + 1):
            names = by_layer.get(i, [])
            if names:
                accs = accumulators(names, gram=cfg.method == "sparsegpt")
                with input_hooks(module, names, feed(accs)):
                    stream.run(i)
                for p in names:
                    zeroed += self._prune(module.get_submodule(p), accs[p].result())
            if i < last:  # this layer's pruned outputs feed the next one
                stream.advance(i)
        return zeroed

    @torch.no_grad()
    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg: NMConfig = self.config
        module = model.module
        candidates, skipped = self.targets(module)
        todo = [p for p in candidates if not is_nm_sparse(module.get_submodule(p).weight, cfg.n, cfg.m)]
        calib, n_tokens, zeroed, total = None, 0, 0, 0
        if todo and cfg.method == "magnitude":
            zeroed = sum(self._prune(module.get_submodule(p), None) for p in todo)
        elif todo:
            tokens, calib = ctx.calibration_tokens(model, cfg.calibration, cfg.samples, cfg.seq_len, cfg.seed)
            n_tokens = int(tokens.numel())
            was_training = module.training
            module.eval()
            try:
                zeroed = (self._sequential if cfg.sequential else self._one_shot)(model, tokens, todo)
            finally:
                module.train(was_training)
        for path in candidates:
            w = module.get_submodule(path).weight
            total += w.numel()
        packed = to_sparse(module, candidates, cfg.n, cfg.m) if cfg.format == "packed" else []
        self._done = candidates
        zeros = sum(int((module.get_submodule(p).weight == 0).sum()) for p in candidates)
        stats = {
            "method": cfg.method,
            "pattern": f"{cfg.n}:{cfg.m}",
            "layers": len(candidates),
            "layers_pruned": len(todo),
            "layers_packed": len(packed),
            "layers_skipped": len(skipped),
            "weights_zeroed": zeroed,
            "sparsity": zeros / total if total else 0.0,
            "format": cfg.format,
        }
        if cfg.method != "magnitude":
            stats["sequential"] = cfg.sequential
        if calib is not None:
            stats.update(calibration=calib, calibration_tokens=n_tokens)
        return PassResult(model, modified=bool(todo or packed), stats=stats)

    def ensures(self, model: Model, ctx: PassContext) -> None:
        cfg: NMConfig = self.config
        for path in getattr(self, "_done", []):
            w = model.module.get_submodule(path).weight
            if not is_nm_sparse(w, cfg.n, cfg.m):
                raise PostconditionError(f"{path} is not {cfg.n}:{cfg.m} sparse after the nm pass")
