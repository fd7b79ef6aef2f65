"""`compress eval`: perplexity, parameter counts and file size of any model `slimc.load` reads.

    compress eval MODEL [--text FILE | --split pydoc-heldout] [--seq-len 512] [--max-windows N] [--json]

Perplexity is measured over non-overlapping windows from the start of the text (default: the
held-out half of the built-in pydoc text, which calibration never sees).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from slimc.cli.common import quiet_libraries, user_errors
from slimc.errors import SlimcError

SPLITS = ("pydoc-heldout",)


def file_size(path: Path) -> int | None:
    """Bytes on disk of a model file or checkpoint directory (None for an alias)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def evaluate(
    model_arg: str,
    text: Path | None = None,
    split: str | None = None,
    seq_len: int = 512,
    max_windows: int | None = None,
    trust_pickle: bool = False,
    config: str | None = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load a model and measure it; the dict the command prints."""
    from slimc.api import load
    from slimc.compiler.calibration.evaluation import eval_windows, heldout_tokens, parameter_counts, perplexity
    from slimc.compiler.calibration.sources import read_text_file, tokenize_stream
    from slimc.compiler.frontends.loaders import resolve_alias

    if text is not None and split is not None:
        raise SlimcError("give either --text FILE or --split, not both")
    if split is not None and split not in SPLITS:
        raise SlimcError(f"unknown split '{split}'; known splits: {', '.join(SPLITS)}")
    if text is not None and not text.is_file():
        raise SlimcError(f"text file '{text}' does not exist")
    t0 = time.perf_counter()
    model = load(model_arg, trust_pickle=trust_pickle, config=config, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    load_s = time.perf_counter() - t0
    if model.tokenizer is None:
        raise SlimcError(f"{model_arg} has no tokenizer; perplexity needs one (give --tokenizer DIR, or save the tokenizer files beside the model)")
    if text is not None:
        tokens = tokenize_stream(model.tokenizer, read_text_file(text))
        source = str(text)
    else:
        tokens = heldout_tokens(model.tokenizer)
        source = "pydoc-heldout"
    windows = eval_windows(tokens, seq_len, max_windows)
    t0 = time.perf_counter()
    ppl = perplexity(model, windows, seq_len)
    eval_s = time.perf_counter() - t0
    return {
        "model": model_arg,
        "format": model.source_format,
        "text": source,
        "seq_len": seq_len,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "perplexity": ppl,
        "parameters": parameter_counts(model),
        "file_bytes": file_size(resolve_alias(model_arg)),
        "load_seconds": round(load_s, 2),
        "eval_seconds": round(eval_s, 2),
    }


def eval_command(
    model: str = typer.Argument(..., help="HF dir, .gguf, .pt2, .onnx, .pt, or the alias 'smollm2'"),
    text: Optional[Path] = typer.Option(None, "--text", help="a .txt (or .jsonl with a 'text' field) to measure on"),
    split: Optional[str] = typer.Option(None, "--split", help="built-in text: pydoc-heldout (the default)"),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="tokens per window"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="measure at most N windows"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled nn.Module (runs code from the file)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow code shipped in a checkpoint (auto_map) to run"),
    config: Optional[str] = typer.Option(None, "--config", help="HF config dir/json for a .pt state dict"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer dir for a model that ships none"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Perplexity over non-overlapping windows, parameter counts and file size of MODEL."""
    with user_errors(debug):
        quiet_libraries()
        result = evaluate(model, text, split, seq_len, max_windows, trust_pickle, config, tokenizer, trust_remote_code)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    params = result["parameters"]
    typer.echo(f"model        {result['model']} ({result['format']})")
    typer.echo(f"perplexity   {result['perplexity']:.4f}  ({result['windows']} windows x {result['seq_len']} tokens of {result['text']})")
    typer.echo(f"parameters   {params['total']:,}" + (f"  (attention+MLP {params['attention_mlp']:,})" if "attention_mlp" in params else ""))
    if result["file_bytes"] is not None:
        typer.echo(f"file size    {result['file_bytes'] / 2**20:.1f} MiB")
    typer.echo(f"time         load {result['load_seconds']} s, eval {result['eval_seconds']} s")
