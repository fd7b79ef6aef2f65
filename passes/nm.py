"""`nm`: N:M semi-structured sparsity — keep N of every M consecutive inputs of each output row.

Every nn.Linear not matched by `skip` (fnmatch patterns on module paths; default: embeddings and
lm_head) gets an N:M mask along its input axis, chosen by

    magnitude:  keep the N largest |W_ij| of each group
    wanda:      keep the N largest |W_ij| * ||X_j||_2 of each group (X: calibration inputs of the layer)
    sparsegpt:  OBS column by column: prune by w^2 / [H^-1]_jj^2 per group of M columns and spread the
                error over the remaining columns (H = X X^T + 1% mean-diagonal damping, blocks of 128);
                see `_sparsegpt_math.py`.

Calibration statistics (`sqnorm` for Wanda, `gram` for SparseGPT) come from one layer-by-layer
pass of the dense model (`compiler.calibration.collect_input_stats`) over `samples` windows of
`seq_len` tokens of the context's calibration source (else `calibration`: the built-in pydoc split).
With `format: packed` the masked layers become `SparseLinear` (values + 2-bit positions, see
`compiler/sparse_format.py`), which checkpoints store compressed; `format: dense` keeps nn.Linear
with zeros. Layers already N:M sparse are left alone, so a second run changes nothing.

Recipe:

    name: nm-2of4-wanda
    passes:
      - nm: {n: 2, m: 4, method: wanda, samples: 128, seq_len: 256, format: packed}
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..compiler.errors import SlimcError
from ..compiler.model import Model
from ..compiler.pipeline import Pass, PassConfig, PassContext, PassResult, register_pass
from ..compiler.sparse_format import check_nm, is_nm_sparse
from ..compiler.sparse_linear import SparseLinear, shares_weight, to_sparse
from ._nm_math import magnitude_scores, nm_mask_from_scores, wanda_scores
from ._sparsegpt_math import sparsegpt_nm


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

    def requires(self, model: Model, ctx: PassContext) -> None:
        if model.module is None:
            raise SlimcError("the nm pass works on PyTorch models; this one was loaded from ONNX")
        if self.config.method != "magnitude" and not model.is_causal_lm:
            raise SlimcError(f"method '{self.config.method}' needs calibration text, which only causal LMs take; use method: magnitude")

    def _stats(self, model: Model, ctx: PassContext, paths: list[str]) -> tuple[dict, str, int]:
        from ..compiler.calibration import collect_input_stats, open_source

        cfg: NMConfig = self.config
        cal = ctx.calibration
        if isinstance(cal, torch.Tensor):  # ready [n, seq_len] token ids
            tokens, name = cal, "tokens"
        else:
            source = cal if cal is not None else open_source(cfg.calibration)
            tokens = source.windows(model.tokenizer, cfg.samples, cfg.seq_len, ctx.seed if cfg.seed is None else cfg.seed)
            name = source.name
        stats = collect_input_stats(model, tokens, paths, gram=cfg.method == "sparsegpt", batch_size=cfg.batch_size)
        return stats, name, int(tokens.numel())

    @torch.no_grad()
    def call(self, model: Model, ctx: PassContext) -> PassResult:
        cfg: NMConfig = self.config
        module = model.module
        candidates, skipped = self.targets(module)
        todo = [p for p in candidates if not is_nm_sparse(module.get_submodule(p).weight, cfg.n, cfg.m)]
        stats_in, calib, n_tokens = ({}, None, 0)
        if todo and cfg.method != "magnitude":
            stats_in, calib, n_tokens = self._stats(model, ctx, todo)
        zeroed = total = 0
        for path in todo:
            lin: nn.Linear = module.get_submodule(path)
            w = lin.weight
            if cfg.method == "sparsegpt":
                new_w, _ = sparsegpt_nm(w, stats_in[path].gram, cfg.n, cfg.m, block_size=cfg.block_size, damp=cfg.damp)
            else:
                scores = magnitude_scores(w) if cfg.method == "magnitude" else wanda_scores(w, stats_in[path].sqnorm)
                mask = nm_mask_from_scores(scores, cfg.n, cfg.m).to(w.device)
                new_w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
            zeroed += int(((w != 0) & (new_w == 0)).sum())
            w.copy_(new_w.to(w.device))
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
        if calib is not None:
            stats.update(calibration=calib, calibration_tokens=n_tokens)
        return PassResult(model, modified=bool(todo or packed), stats=stats)

    def ensures(self, model: Model, ctx: PassContext) -> None:
        cfg: NMConfig = self.config
        for path in getattr(self, "_done", []):
            w = model.module.get_submodule(path).weight
            if not is_nm_sparse(w, cfg.n, cfg.m):
                raise AssertionError(f"{path} is not {cfg.n}:{cfg.m} sparse after the nm pass")
