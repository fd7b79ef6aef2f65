"""What a training pass trains on, from one name: `--data digits`, `--data pydoc`, `--data my.npz`, a text file.

`open_training_data(spec, model)` gives a `TrainingData`: the training set, the loss, an
`evaluate(module) -> {metric: value}` on held-out data, and the metric's name:

- `digits`: the digits train split; cross-entropy; accuracy on the digits test split;
- `pydoc` (or a `.txt` / `.jsonl` file, or token ids): `samples` windows of `seq_len` tokens of the
  calibration half (for a causal LM with a tokenizer); next-token loss; perplexity on `eval_windows`
  windows of the held-out half of pydoc (for a file too: the user's file is training data only); for an
  encoder, the same windows with an all-ones attention mask, as calibration data only (no loss);
- `x.npz` (arrays `inputs` and `labels`): cross-entropy on the labels; accuracy on the same rows, as
  the file holds no held-out split (say so by the metric name `train_accuracy`);
- a ready `TrainingData` from the Python API is taken as it is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from slimc.compiler.model import Model
from slimc.compiler.training.data import digits, lm_windows, npz_dataset
from slimc.compiler.training.trainer import accuracy_on, classification_loss, lm_loss
from slimc.errors import SlimcError

BUILTIN = ("digits", "pydoc")
LM_FILES = (".txt", ".jsonl", ".json", ".npy", ".pt")


@dataclass
class TrainingData:
    train: Dataset | DataLoader  # a DataLoader keeps its own batching and order
    loss: Callable[[nn.Module, Any], torch.Tensor] | None  # None: calibration data only (an encoder's text)
    evaluate: Callable[[nn.Module], dict[str, float]] | None
    metric: str  # the key `evaluate` returns: accuracy | train_accuracy | perplexity | none
    name: str
    higher_is_better: bool = True
    encoder: bool = False  # rows are (input_ids, attention_mask) for an encoder

    def call(self, module: nn.Module, batch: Any) -> Any:
        """Run `module` on one batch of this data (calibration passes)."""
        if isinstance(batch, dict):
            return module(**batch)
        if self.encoder:
            return module(input_ids=batch[0], attention_mask=batch[1])
        if self.metric == "perplexity":
            return module(input_ids=batch[0], use_cache=False)
        return module(batch[0])

    def example_inputs(self, module: nn.Module) -> dict[str, Any] | None:
        """One training example as forward keyword arguments (for tracing a module without example inputs)."""
        if isinstance(self.train, DataLoader):
            first = next(iter(self.train))[0][:1]
        else:
            first = self.train[0][0][None]
        if self.metric == "perplexity":
            return {"input_ids": first}
        if self.encoder:
            return {"input_ids": first, "attention_mask": torch.ones_like(first)}
        try:
            name = next(iter(inspect.signature(module.forward).parameters))
        except (StopIteration, TypeError, ValueError):
            return None
        return {name: first}


def perplexity_on(model: Model, windows: int, seq_len: int) -> Callable[[nn.Module], dict[str, float]]:
    from slimc.compiler.calibration.evaluation import heldout_tokens, perplexity

    tokens = heldout_tokens(model.tokenizer)

    def evaluate(module: nn.Module) -> dict[str, float]:
        view = Model(module=module, config=model.config, tokenizer=model.tokenizer, source_format=model.source_format)
        return {"perplexity": perplexity(view, tokens, seq_len=seq_len, max_windows=windows)}

    return evaluate


def open_training_data(spec: str | TrainingData, model: Model, *, samples: int = 256, seq_len: int = 128, seed: int = 0,
                       eval_windows: int = 16, eval_seq_len: int = 512) -> TrainingData:
    if isinstance(spec, TrainingData):
        return spec
    if spec == "digits" or Path(spec).suffix == ".npz":
        if model.is_causal_lm:
            raise SlimcError(f"--data {spec} holds images / inputs with class labels, and this model is a language model: "
                             "train it on text (--data pydoc, a .txt or .jsonl file)")
    if spec == "digits":
        return TrainingData(digits("train"), classification_loss, accuracy_on(digits("test")), "accuracy", "digits")
    path = Path(spec)
    if path.suffix == ".npz":
        data = npz_dataset(path)
        return TrainingData(data, classification_loss, _train_accuracy(data), "train_accuracy", str(path))
    if spec == "pydoc" or path.suffix in LM_FILES:
        if spec != "pydoc" and not path.is_file():
            raise SlimcError(f"training data '{spec}' does not exist: give an existing text file, or --data pydoc")
        if model.tokenizer is None or model.config is None:
            raise SlimcError(f"--data {spec} is text: it needs a Hugging Face model with a tokenizer "
                             "(give --tokenizer DIR), or use --data digits / a .npz of inputs and labels")
        if not model.is_causal_lm:  # an encoder: token windows to calibrate on (no loss to train with)
            ids = lm_windows(model.tokenizer, samples, seq_len, seed, source=spec).tensors[0]
            return TrainingData(TensorDataset(ids, torch.ones_like(ids)), None, None, "none", spec, encoder=True)
        data = lm_windows(model.tokenizer, samples, seq_len, seed, source=spec)
        return TrainingData(data, lm_loss, perplexity_on(model, eval_windows, eval_seq_len), "perplexity", spec,
                            higher_is_better=False)
    raise SlimcError(f"unknown training data '{spec}': give {' or '.join(BUILTIN)}, a .npz of inputs and labels, "
                     "or a .txt / .jsonl text file for a language model")


def _train_accuracy(data: Dataset) -> Callable[[nn.Module], dict[str, float]]:
    measure = accuracy_on(data)
    return lambda module: {"train_accuracy": measure(module)["accuracy"]}
