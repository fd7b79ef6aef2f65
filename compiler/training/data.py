"""Datasets the trainer reads: built-in `digits` and pydoc token windows, and user `.npz` files.

- `digits(split)`: scikit-learn's `load_digits` (1797 8x8 grey images of 10 digits), split 70/30
  stratified by label with `random_state=0` — the fixed split every digits measurement in slimc
  uses; images as float32 `[N, 1, 8, 8]` scaled to [0, 1], labels int64.
- `lm_windows(tokenizer, n, seq_len, seed)`: `n` windows of the pydoc *calibration* half (never the
  held-out half perplexity is measured on), or of a user's text / token file.
- `npz_dataset(path)`: a `.npz` with arrays `inputs` and `labels` (or `x` and `y`), read without
  pickles; every problem is one `SlimcError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from slimc.errors import SlimcError

DIGITS_SPLITS = ("train", "test")


def digits(split: str = "train") -> TensorDataset:
    """The digits `train` (1257 images) or `test` (540) split."""
    if split not in DIGITS_SPLITS:
        raise SlimcError(f"digits has the splits {', '.join(DIGITS_SPLITS)}, not '{split}'")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SlimcError("the digits data source needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.3, stratify=data.target, random_state=0)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))


def lm_windows(tokenizer: Any, n: int, seq_len: int, seed: int = 0, source: str = "pydoc") -> TensorDataset:
    """`n` token windows of `seq_len` from a calibration source ('pydoc' = its calibration half, or a file)."""
    from slimc.compiler.calibration.sources import open_source

    return TensorDataset(open_source(source).windows(tokenizer, n, seq_len, seed))


def npz_dataset(path: str | Path) -> TensorDataset:
    """Inputs and labels from a `.npz` (no pickles): arrays `inputs`/`labels` or `x`/`y`, as many rows each."""
    path = Path(path)
    if not path.is_file():
        raise SlimcError(f"training data '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError) as e:
        raise SlimcError(f"{path}: not a readable .npz of arrays ({' '.join(str(e).split())[:160]}); save it with numpy.savez") from None
    for x_key, y_key in (("inputs", "labels"), ("x", "y")):
        if x_key in arrays and y_key in arrays:
            x, y = arrays[x_key], arrays[y_key]
            break
    else:
        raise SlimcError(f"{path}: expected arrays 'inputs' and 'labels' (or 'x' and 'y'), found {sorted(arrays) or 'none'}")
    if len(x) != len(y) or len(x) == 0:
        raise SlimcError(f"{path}: {len(x)} inputs but {len(y)} labels; they must be as many, and more than none")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise SlimcError(f"{path}: inputs and labels must be numeric arrays (found {x.dtype} and {y.dtype})")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    xt = xt.float() if xt.is_floating_point() else xt  # float64 inputs train in float32; integer ids stay
    yt = torch.from_numpy(np.ascontiguousarray(y))
    yt = yt.long() if not yt.is_floating_point() else yt.float()
    return TensorDataset(xt, yt)
