"""The public Python API: `load`, `compress`, `save` — the one code path the `compress` command runs too.

    model = slimc.load("smollm2")                                   # or a HF dir, .gguf, .pt2, .onnx, .pt
    model = slimc.compress(model, "flap-20", device="cpu", dtype=torch.bfloat16)
    report = slimc.save(model, "out/", format="all")                # verified, atomic

Importing this module registers the shipped passes (`slimc.passes`), so recipes can name them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from slimc import passes as _shipped_passes  # noqa: F401 — registers the shipped passes
from slimc.compiler.calibration.sources import open_source
from slimc.compiler.emit.save import save
from slimc.compiler.frontends.loaders import load
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import Instrument, PassContext, PassManager, resolve_device, resolve_dtype
from slimc.compiler.pipeline.recipes import Recipe, apply_overrides, load_recipe

__all__ = ["load", "compress", "check", "save"]


def compress(
    model: Model,
    recipe: str | Recipe,
    *,
    overrides: Sequence[str] = (),
    calib: str | torch.Tensor = "pydoc",
    seed: int = 0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    check_passes: bool = False,
    instruments: Sequence[Instrument] = (),
    data: Any = None,
    epochs: int | None = None,
    steps: int | None = None,
) -> Model:
    """Run a recipe (shipped name, .yaml path or `Recipe`) on `model`; returns the compressed model.

    `overrides` are `pass.key=value` strings, as `--set` on the command line. `calib` is a
    calibration source ('pydoc', a .txt / .jsonl text file, token ids in .pt / .npy / .jsonl) or
    ready `[n, seq_len]` token ids. `device` and `dtype` (float32 | bfloat16 | float16) are where
    and how the passes compute; the model is moved there first and keeps that dtype when saved
    (None: as loaded). `check_passes` runs the model on a probe input after every pass and records
    the output drift (`compiler.pipeline.instruments.OutputProbe`). Passes that train (`hesso`)
    take `data` ('digits', 'pydoc', a .npz of inputs/labels, a text file, or a
    `compiler.training.sources.TrainingData`) and `epochs` / `steps` over their recipe's own.
    """
    manager, ctx = _pipeline(recipe, overrides, calib, seed, device, dtype, check_passes, instruments)
    ctx.training = {"data": data, "epochs": epochs, "steps": steps}
    torch.manual_seed(seed)
    return manager.run(model, ctx)


def check(model: Model, recipe: str | Recipe, *, overrides: Sequence[str] = (), calib: str | torch.Tensor = "pydoc",
          device: str | None = None, dtype: str | torch.dtype | None = None, data: Any = None, epochs: int | None = None,
          steps: int | None = None) -> None:
    """Raise the SlimcError `compress` would raise before running any pass (order, what each pass needs)."""
    manager, ctx = _pipeline(recipe, overrides, calib, 0, device, dtype, False, ())
    ctx.training = {"data": data, "epochs": epochs, "steps": steps}
    manager.check(model, ctx)


def _pipeline(recipe, overrides, calib, seed, device, dtype, check_passes, instruments) -> tuple[PassManager, PassContext]:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        recipe = apply_overrides(recipe, list(overrides))
    ctx = PassContext(
        calibration=calib if isinstance(calib, torch.Tensor) else open_source(calib),
        device=resolve_device(device),
        dtype=resolve_dtype(dtype),
        seed=seed,
        check_passes=check_passes,
        instruments=list(instruments),
    )
    return PassManager(recipe.build()), ctx

