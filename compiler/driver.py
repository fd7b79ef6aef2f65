"""`compress`: the Python form of `compress MODEL --recipe R` (load and save are separate calls)."""

from __future__ import annotations

from typing import Sequence

import torch

from .calibration import open_source
from .model import Model
from .pipeline import PassContext, PassManager
from .recipes import Recipe, load_recipe


def compress(
    model: Model,
    recipe: str | Recipe,
    *,
    overrides: Sequence[str] = (),
    calib: str = "pydoc",
    seed: int = 0,
    device: str = "cpu",
    ctx: PassContext | None = None,
) -> Model:
    """Run a recipe (shipped name, .yaml path or `Recipe`) on `model`; returns the compressed model.

    `overrides` are `pass.key=value` strings, as `--set` on the command line.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    torch.manual_seed(seed)
    ctx = ctx or PassContext(calibration=open_source(calib), device=device, seed=seed)
    return PassManager(recipe.build()).run(model, ctx)
