"""Calibration: text sources, token windows, and per-layer input statistics.

A `CalibrationSource` turns text into token windows for a given tokenizer. Sources:

- ``pydoc``: CPython's documentation topics (`pydoc_data.topics`), joined in sorted key order with
  blank lines and tokenised as one stream; the first half of the token stream is the calibration
  split, the second half the evaluation split (`compiler.evaluation.heldout_tokens`), so
  calibration never sees evaluation text.
- a ``.txt`` file (all of it), or a ``.jsonl`` file whose lines carry a ``"text"`` field.

`collect_input_stats` runs the model's decoder layer by layer on cached hidden states (peak memory:
one layer's activations plus the weights) and accumulates, for the input of each named
`nn.Linear`, the token count, mean, population variance (shifted float32 batch sums accumulated
in float64), squared norms and, on request, the Gram matrix sum x xᵀ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import SlimcError
from .llm import find_layer_list
from .model import Model

PYDOC = "pydoc"


# ---------------------------------------------------------------------------------------------
# sources


def pydoc_text() -> str:
    """CPython's documentation topics, joined in sorted key order with blank lines."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def tokenize_stream(tokenizer: Any, text: str) -> torch.LongTensor:
    """Token ids of `text` as one stream, without special tokens (a BOS would repeat per window)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


_STREAM_CACHE: dict[tuple[int, str], torch.LongTensor] = {}


def _cached_stream(tokenizer: Any, key: str, text_fn: Callable[[], str]) -> torch.LongTensor:
    # tokenising the 460 kB pydoc text takes a second or two; calibration and evaluation share it
    k = (id(tokenizer), key)
    if k not in _STREAM_CACHE:
        _STREAM_CACHE[k] = tokenize_stream(tokenizer, text_fn())
    return _STREAM_CACHE[k]


def pydoc_split(tokenizer: Any, split: str) -> torch.LongTensor:
    """The `calibration` (first half) or `evaluation` (second half) part of the pydoc token stream."""
    stream = _cached_stream(tokenizer, PYDOC, pydoc_text)
    half = stream.numel() // 2
    if split == "calibration":
        return stream[:half]
    if split == "evaluation":
        return stream[half:]
    raise ValueError(f"unknown pydoc split {split!r}")


def draw_windows(stream: torch.LongTensor, n: int, seq_len: int, seed: int) -> torch.LongTensor:
    """`n` windows of `seq_len` tokens at random offsets of `stream`, reproducible by `seed`."""
    if n < 1 or seq_len < 1:
        raise SlimcError(f"calibration needs n >= 1 windows of seq_len >= 1 tokens (got n={n}, seq_len={seq_len})")
    span = stream.numel() - seq_len
    if span < 0:
        raise SlimcError(
            f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}; use a longer text or a shorter seq_len"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, span + 1, (n,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@dataclass
class CalibrationSource:
    """Text to calibrate on; `windows` turns it into `[n, seq_len]` token ids for a tokenizer."""

    name: str
    text_fn: Callable[[], str]
    builtin_split: bool = False  # pydoc: use only the calibration half of the token stream

    def tokens(self, tokenizer: Any) -> torch.LongTensor:
        if tokenizer is None:
            raise SlimcError(f"calibration source '{self.name}' needs a tokenizer; load the model with its tokenizer")
        if self.builtin_split:
            return pydoc_split(tokenizer, "calibration")
        return _cached_stream(tokenizer, self.name, self.text_fn)

    def windows(self, tokenizer: Any, n: int, seq_len: int, seed: int) -> torch.LongTensor:
        return draw_windows(self.tokens(tokenizer), n, seq_len, seed)


def read_text_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        parts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimcError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object with a 'text' field") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise SlimcError(f"{path}:{lineno}: expected an object with a string 'text' field")
            parts.append(obj["text"])
        if not parts:
            raise SlimcError(f"{path}: no lines with a 'text' field")
        return "\n\n".join(parts)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SlimcError(f"{path}: the text file is empty")
    return text


def open_source(spec: str) -> CalibrationSource:
    """'pydoc' (built in), a .txt file, or a .jsonl file with a 'text' field per line."""
    if spec == PYDOC:
        return CalibrationSource(PYDOC, pydoc_text, builtin_split=True)
    path = Path(spec).expanduser()
    if path.suffix not in (".txt", ".jsonl"):
        raise SlimcError(f"calibration source '{spec}': give 'pydoc', a .txt file or a .jsonl file with a 'text' field")
    if not path.is_file():
        raise SlimcError(f"calibration file '{spec}' does not exist")
    return CalibrationSource(str(path), lambda: read_text_file(path))


# ---------------------------------------------------------------------------------------------
# statistics


@dataclass
class InputStats:
    """Statistics of the input of one nn.Linear over all calibration tokens (float64)."""

    count: int
    mean: torch.Tensor  # [in]
    var: torch.Tensor  # [in], population variance
    sqnorm: torch.Tensor  # [in], sum over tokens of x^2
    gram: torch.Tensor | None = None  # [in, in], sum over tokens of x x^T

    def covariance(self) -> torch.Tensor:
        """Population covariance E[(x - mean)(x - mean)^T]; needs the Gram matrix."""
        if self.gram is None:
            raise ValueError("covariance needs statistics collected with gram=True")
        return self.gram / self.count - torch.outer(self.mean, self.mean)


class _Accumulator:
    """Shifted sums: per batch in float32 around a per-channel shift, accumulated in float64.

    Subtracting a shift close to the mean (the first batch's mean) before summing x and x^2 keeps the
    variance accurate when |mean| >> std, at the cost of one pass; reductions over tokens in float32
    are 5-20x cheaper than float64 or `var_mean` over dim 0 on CPU.
    """

    def __init__(self, gram: bool):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None  # sum of (x - shift), float64
        self.s2: torch.Tensor | None = None  # sum of (x - shift)^2, float64
        self.want_gram = gram
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        if self.shift is None:
            # the first batch's mean, not its first token: position 0 often carries outliers
            self.shift = x.sum(0) / n
            self.s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.s2 = torch.zeros_like(self.s1)
        d = x - self.shift
        self.s1 += d.sum(0).double()
        self.s2 += (d * d).sum(0).double()
        self.count += n
        if self.want_gram:
            # float32 product per batch (fast), accumulated in float64 across batches
            g = (x.T @ x).double()
            self.gram = g if self.gram is None else self.gram + g

    def result(self) -> InputStats:
        if self.shift is None:
            raise RuntimeError("no calibration tokens reached this module")
        n = self.count
        shift = self.shift.double()
        m1 = self.s1 / n
        var = (self.s2 / n - m1 * m1).clamp_min(0.0)
        sqnorm = self.s2 + 2.0 * shift * self.s1 + n * shift * shift
        return InputStats(n, shift + m1, var, sqnorm, self.gram)


class _StopForward(Exception):
    pass


def _hook_inputs(module: nn.Module, names: list[str], accs: dict[str, _Accumulator]) -> list[Any]:
    handles = []
    for name in names:
        try:
            mod = module.get_submodule(name)
        except AttributeError:
            raise SlimcError(f"collect_input_stats: the model has no module '{name}'") from None

        def hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
            accs[_name].add(args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def collect_input_stats(
    model: Model | nn.Module,
    tokens: torch.LongTensor,
    modules: list[str],
    *,
    gram: bool = False,
    batch_size: int = 8,
) -> dict[str, InputStats]:
    """Input statistics of each named module over all tokens of `tokens` ([n, seq_len] ids).

    Decoder LLMs are run layer by layer: the inputs of the first decoder layer are captured once,
    then each layer runs on the cached hidden states of the layer before it, with hooks only on the
    requested modules of that layer. Layers after the last requested one are never run.
    """
    module = model.module if isinstance(model, Model) else model
    if module is None:
        raise SlimcError("collect_input_stats needs a PyTorch model (this one was loaded from ONNX)")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, seq_len], got shape {tuple(tokens.shape)}")
    accs = {name: _Accumulator(gram) for name in modules}
    found = find_layer_list(module)
    in_layer: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in modules:
        idx = None
        if found is not None and name.startswith(found[0] + "."):
            head = name[len(found[0]) + 1 :].split(".", 1)[0]
            idx = int(head) if head.isdigit() else None
        if idx is None:
            outside.append(name)
        else:
            in_layer.setdefault(idx, []).append(name)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        batches = [tokens[i : i + batch_size].to(device) for i in range(0, tokens.shape[0], batch_size)]
        if outside:
            handles = _hook_inputs(module, outside, accs)
            try:
                for ids in batches:
                    module(input_ids=ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        if in_layer:
            _layerwise(module, batches, in_layer, accs)
    finally:
        module.train(was_training)
    return {name: accs[name].result() for name in modules}


def decoder_inputs(module: nn.Module, batches: list[torch.Tensor]) -> tuple[nn.ModuleList, list[tuple[torch.Tensor, dict[str, Any]]]]:
    """The decoder layers and, per batch, the first layer's (hidden states, keyword arguments).

    The model runs only up to its first decoder layer; the keyword arguments (rotary position
    embeddings, attention mask, ...) are the same for every layer, so any layer can be run on
    cached hidden states as `layer(hidden, **kwargs)`.
    """
    found = find_layer_list(module)
    if found is None:
        raise SlimcError("not a decoder LLM slimc recognises: no model.layers list of decoder layers")
    layers = found[1]
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def catch(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                module(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return layers, captured


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


def _layerwise(
    module: nn.Module,
    batches: list[torch.Tensor],
    in_layer: dict[int, list[str]],
    accs: dict[str, _Accumulator],
) -> None:
    layers, captured = decoder_inputs(module, batches)
    last = max(in_layer)
    for i in range(last + 1):
        layer = layers[i]
        handles = _hook_inputs(module, in_layer.get(i, []), accs)
        try:
            for b, (hidden, kwargs) in enumerate(captured):
                out = layer(hidden, **kwargs)
                if i < last:
                    captured[b] = (layer_output(out), kwargs)
        finally:
            for h in handles:
                h.remove()
