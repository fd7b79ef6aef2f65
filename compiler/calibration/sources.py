"""Calibration sources: text or token ids, and the token windows passes calibrate on.

A `CalibrationSource` gives a token stream and draws `[n, seq_len]` windows from it. Sources:

- ``pydoc``: CPython's documentation topics (`pydoc_data.topics`), joined in sorted key order with
  blank lines and tokenised as one stream; the first half of the token stream is the calibration
  split, the second half the evaluation split (`compiler.calibration.evaluation.heldout_tokens`), so
  calibration never sees evaluation text.
- a ``.txt`` file (all of it), or a ``.jsonl`` file whose lines carry a ``"text"`` field;
- token ids, for models without a tokenizer: a ``.pt`` tensor (read with ``weights_only``), a
  ``.npy`` array (no pickles), or a ``.jsonl`` file whose lines carry ``"input_ids"``; rows are
  joined in order into one stream and windows are drawn from it as from text.

Statistics over those windows: `compiler.calibration.stats`; the layer-by-layer driver:
`compiler.calibration.layerwise`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from slimc.errors import SlimcError

PYDOC = "pydoc"


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


def draw_windows(stream: torch.LongTensor, n: int, seq_len: int, seed: int, origin: str = "calibration text") -> torch.LongTensor:
    """`n` windows of `seq_len` tokens at random offsets of `stream`, reproducible by `seed`.

    `origin` names the source in the error a too-short stream raises."""
    if n < 1 or seq_len < 1:
        raise SlimcError(f"calibration needs n >= 1 windows of seq_len >= 1 tokens (got n={n}, seq_len={seq_len})")
    span = stream.numel() - seq_len
    if span < 0:
        raise SlimcError(
            f"{origin} has {stream.numel()} tokens, fewer than seq_len={seq_len}; use a longer text or a shorter seq_len"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, span + 1, (n,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


class CalibrationSource:
    """Where calibration tokens come from; `windows` draws `[n, seq_len]` token ids from it."""

    name: str
    needs_tokenizer: bool = True

    def tokens(self, tokenizer: Any) -> torch.LongTensor:
        """The whole calibration token stream (1-D)."""
        raise NotImplementedError

    def windows(self, tokenizer: Any, n: int, seq_len: int, seed: int) -> torch.LongTensor:
        origin = "the pydoc calibration text" if self.name == PYDOC else f"calibration '{self.name}'"
        return draw_windows(self.tokens(tokenizer), n, seq_len, seed, origin)


class TextSource(CalibrationSource):
    """Text, tokenised with the model's tokenizer as one stream."""

    def __init__(self, name: str, text_fn: Callable[[], str], builtin_split: bool = False):
        self.name = name
        self.text_fn = text_fn
        self.builtin_split = builtin_split  # pydoc: use only the calibration half of the token stream

    def tokens(self, tokenizer: Any) -> torch.LongTensor:
        if tokenizer is None:
            raise SlimcError(
                f"calibration source '{self.name}' is text and needs the model's tokenizer; load the model with its "
                "tokenizer (--tokenizer DIR) or calibrate on token ids (.pt / .npy / .jsonl with 'input_ids')"
            )
        if self.builtin_split:
            return pydoc_split(tokenizer, "calibration")
        return _cached_stream(tokenizer, self.name, self.text_fn)


class TokenSource(CalibrationSource):
    """Token ids given by the user, read lazily: rows are joined, in order, into one stream."""

    needs_tokenizer = False

    def __init__(self, name: str, read: Callable[[], torch.LongTensor]):
        self.name = name
        self._read = read
        self._stream: torch.LongTensor | None = None

    def tokens(self, tokenizer: Any = None) -> torch.LongTensor:
        if self._stream is None:
            self._stream = self._read()
        return self._stream


def _id_stream(rows: list, origin: str) -> torch.LongTensor:
    """Integer token ids (a tensor, an array, or lists of ints) as one non-negative 1-D int64 stream."""
    try:
        parts = [torch.as_tensor(r) for r in rows]
    except (TypeError, ValueError, RuntimeError):
        raise SlimcError(f"{origin}: token ids must be integers (a tensor, an array, or lists of ints)") from None
    parts = [p.reshape(-1) for p in parts if p.numel()]
    if not parts:
        raise SlimcError(f"{origin}: holds no token ids")
    if any(p.is_floating_point() or p.is_complex() or p.dtype == torch.bool for p in parts):
        raise SlimcError(f"{origin}: token ids must be integers, not {parts[0].dtype}")
    stream = torch.cat([p.to(torch.long) for p in parts])
    if int(stream.min()) < 0:
        raise SlimcError(f"{origin}: token ids must be >= 0 (found {int(stream.min())})")
    return stream


def read_token_file(path: Path) -> torch.LongTensor:
    """Token ids from a .pt (tensor or list; read with weights_only), .npy (no pickles) or .jsonl ('input_ids')."""
    if path.suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SlimcError(f"{path}: not a readable .npy array of token ids ({e})") from None
        return _id_stream([arr], str(path))
    if path.suffix == ".pt":
        import pickle

        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise SlimcError(f"{path}: not a tensor of token ids saved with torch.save ({type(e).__name__})") from None
        if isinstance(obj, dict) and "input_ids" in obj:
            obj = obj["input_ids"]
        rows = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        return _id_stream(rows, str(path))
    rows = []
    for lineno, obj in _jsonl_objects(path):
        ids = obj.get("input_ids") if isinstance(obj, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise SlimcError(f"{path}:{lineno}: expected an object with an 'input_ids' list of integers")
        rows.append(ids)
    return _id_stream(rows, str(path))


def _utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 (binary, or another encoding) is a SlimcError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlimcError(f"{path}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); convert it to UTF-8 "
                         "(e.g. iconv -t utf-8) or give token ids (.pt / .npy)") from None


def _jsonl_objects(path: Path):
    """(line number, parsed object) of every non-empty line of a JSONL file."""
    found = False
    for lineno, line in enumerate(_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimcError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be a JSON object") from None
        found = True
        yield lineno, obj
    if not found:
        raise SlimcError(f"{path}: the file has no JSON lines; give one JSON object per line")


def _jsonl_holds_ids(path: Path) -> bool:
    """Whether a JSONL file's first object carries 'input_ids' (token ids) rather than 'text'."""
    for _, obj in _jsonl_objects(path):
        return isinstance(obj, dict) and "input_ids" in obj and "text" not in obj
    return False


def read_text_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        parts = []
        for lineno, obj in _jsonl_objects(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise SlimcError(f"{path}:{lineno}: expected an object with a string 'text' field")
            parts.append(obj["text"])
        return "\n\n".join(parts)
    text = _utf8(path)
    if not text.strip():
        raise SlimcError(f"{path}: the text file is empty; give a text of at least one calibration window")
    return text


SOURCE_HELP = "give 'pydoc', text (.txt, .jsonl with 'text') or token ids (.pt, .npy, .jsonl with 'input_ids')"


def open_source(spec: str) -> CalibrationSource:
    """'pydoc' (built in), text (.txt, .jsonl with 'text') or token ids (.pt, .npy, .jsonl with 'input_ids').

    Only the path is checked here; the file is read when a pass first asks for tokens.
    """
    if spec == PYDOC:
        return TextSource(PYDOC, pydoc_text, builtin_split=True)
    path = Path(spec).expanduser()
    if path.suffix not in (".txt", ".jsonl", ".pt", ".npy"):
        raise SlimcError(f"calibration source '{spec}': {SOURCE_HELP}")
    if not path.is_file():
        raise SlimcError(f"calibration file '{spec}' does not exist")
    if path.suffix in (".pt", ".npy") or (path.suffix == ".jsonl" and _jsonl_holds_ids(path)):
        return TokenSource(str(path), lambda: read_token_file(path))
    return TextSource(str(path), lambda: read_text_file(path))


def calibration_tokens(
    calibration: Any, spec: str, tokenizer: Any, samples: int, seq_len: int, seed: int, vocab_size: int | None = None
) -> tuple[torch.LongTensor, str]:
    """`[n, seq_len]` token ids and their source's name.

    `calibration` is a context's calibration: ready `[n, seq_len]` ids (used as they are), a
    `CalibrationSource`, or None (then the source `spec` is opened). Ids at or above `vocab_size`
    are refused: they would index past the embedding.
    """
    if isinstance(calibration, torch.Tensor):
        tokens, name = calibration, "tokens"
    else:
        source = calibration if calibration is not None else open_source(spec)
        tokens, name = source.windows(tokenizer, samples, seq_len, seed), source.name
    if vocab_size is not None and tokens.numel() and int(tokens.max()) >= vocab_size:
        raise SlimcError(f"calibration '{name}': token id {int(tokens.max())} is outside the model's vocabulary of {vocab_size}")
    return tokens, name
