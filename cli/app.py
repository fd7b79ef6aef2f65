"""The `compress` command (also installed as `slimc`).

    compress MODEL --recipe R [-o OUT] [--format hf|onnx|pt2|all] [--calib SOURCE] [--tokenizer DIR]
             [--data digits|pydoc|FILE] [--epochs N] [--steps N]   # passes that train (hesso)
             [--device D] [--dtype float32|bfloat16|float16] [--seed N] [--set pass.key=value ...]
             [--check-passes] [--trust-pickle] [--config CFG] [--debug]
    compress recipes                      # shipped recipes
    compress inspect MODEL [--json]       # architecture, parameters, FLOPs/token, prunable groups
    compress export MODEL --format onnx   # export alone, with the ONNX Runtime parity check
    compress eval ...                     # perplexity (cli/eval_cmd.py)

`compress MODEL ...` is dispatched to the `run` subcommand, which calls the public API
(`slimc.api.load`, `.compress`, `.save`): the command line and Python share one code path. Errors a user can
cause print `error: <one line>` on stderr and exit with status 2 (a traceback only with --debug).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from slimc.cli.common import EXIT_USER_ERROR, err_console, quiet_libraries, user_errors  # noqa: F401

app = typer.Typer(
    name="compress",
    help="slimc: compress a neural network with a recipe and write a verified checkpoint.\n\n"
    "Usage: compress MODEL --recipe R [-o OUT]   (or a subcommand below)",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
SUBCOMMANDS = ("run", "recipes", "inspect", "export", "eval")
class Steps:
    """A rich progress display: one line per step, with a spinner and the time it took."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=err_console, transient=False, disable=not (enabled and err_console.is_terminal),
        )

    def __enter__(self) -> "Steps":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        pending = getattr(self, "_pass_cm", None)
        if pending is not None and exc[0] is not None:  # a pass failed: drop its line, the error says which
            with contextlib.suppress(BaseException):
                pending.__exit__(*exc)
            self._pass_cm = None
        self.progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        task = self.progress.add_task(label, total=1)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.progress.remove_task(task)  # the error line printed afterwards says what failed
            raise
        dt = time.perf_counter() - t0
        if dt < 1.0:
            self.progress.remove_task(task)  # only steps that take a while stay on screen
        else:
            self.progress.update(task, completed=1, description=f"[green]✓[/green] {label}")

    def instrument(self, event: str, pass_name: str, model: Any) -> None:
        """PassContext instrument: a progress line per pass."""
        if event == "start":
            self._pass_cm = self.step(f"pass {pass_name}")
            self._pass_cm.__enter__()
        elif event == "end" and getattr(self, "_pass_cm", None) is not None:
            self._pass_cm.__exit__(None, None, None)
            self._pass_cm = None


def default_output(model_arg: str, suffix: str) -> Path:
    """`<input>-<suffix>` beside the input; `./smollm2-<suffix>` for the alias."""
    from slimc.compiler.frontends.loaders import ALIASES

    if model_arg in ALIASES and not Path(model_arg).exists():
        return Path.cwd() / f"{model_arg}-{suffix}"
    p = Path(model_arg).expanduser().resolve()
    stem = p.name if p.is_dir() else p.stem
    return p.parent / f"{stem}-{suffix}"


def _input_path(model_arg: str) -> Path:
    from slimc.compiler.frontends.loaders import resolve_alias

    return resolve_alias(model_arg).resolve()


def _input_info(model: Any, path: Path) -> dict[str, Any]:
    from slimc.compiler.emit.report import model_dtype, path_bytes

    return {"path": str(path), "format": model.source_format, "parameters": model.num_parameters(),
            "dtype": model_dtype(model), "bytes": path_bytes(path)}


def _summary(report: dict[str, Any], out: Path) -> None:
    inp, outp = report["input"], report["output"]
    kept = f" ({outp['parameters'] / inp['parameters']:.1%} kept)" if inp.get("parameters") else ""
    typer.echo(f"wrote {out}")
    typer.echo(f"  parameters: {inp.get('parameters', 0):,} -> {outp['parameters']:,}{kept}")
    for p in report.get("passes") or []:  # passes that trained: what the training reached, and the MACs
        st = p.get("stats") or {}
        if "macs_before" in st and "macs_after" in st:
            typer.echo(f"  MACs ({p['name']}): {st['macs_before']:,} -> {st['macs_after']:,} ({st['macs_kept']:.1%} kept)")
        for metric in ("accuracy", "train_accuracy", "perplexity"):
            if f"{metric}_after" in st:
                start = f"{st[f'{metric}_before']:.4g} at the start, " if f"{metric}_before" in st else ""
                typer.echo(f"  {metric} ({p['name']}): {start}{st[f'{metric}_after']:.4g} after")
    for fmt, v in report["verification"].items():
        diff = v.get("max_abs_diff")
        detail = f"max abs diff {diff:.3g} (tolerance {v.get('atol'):g})" if diff is not None else v.get("check", "")
        f64 = v.get("float64_check")
        if f64:
            pytorch = f64["pytorch_fp32_vs_fp64"]
            mine = max(val for key, val in f64.items() if key.endswith("_vs_fp64") and not key.startswith("pytorch"))
            detail += f"; vs float64: {mine:.3g}, PyTorch fp32 itself {pytorch:.3g} (fp32 rounding)"
        typer.echo(f"  {fmt}: {'verified' if v.get('ok') else 'FAILED'}, {detail}")
    for note in report.get("notes") or []:  # e.g. a recipe that found nothing it could remove
        typer.echo(f"  note: {note}")


@app.command("run")
def run_command(
    model: str = typer.Argument(..., help="HF dir, .gguf, .pt2, .onnx, .pt, or the alias 'smollm2'"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="shipped recipe name (see `compress recipes`) or a .yaml path"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output directory [default: <input>-<recipe>]"),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="hf | onnx | pt2 | all [default: hf; onnx for .onnx input, pt2 for .pt2]"),
    calib: str = typer.Option("pydoc", "--calib", help="calibration: 'pydoc', text (.txt, .jsonl with 'text') or token ids (.pt, .npy, .jsonl with 'input_ids')"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer dir (or cached name) for a model that ships none"),
    device: str = typer.Option("cpu", "--device", help="device the passes run on: cpu, cuda, cuda:1 (emission runs on cpu)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16: compute and checkpoint dtype [default: as loaded]"),
    seed: int = typer.Option(0, "--seed", help="random seed for calibration sampling"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe option: pass.key=value (repeatable)"),
    check_passes: bool = typer.Option(False, "--check-passes", help="after every pass, check the model's outputs on a probe input and report their drift"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled nn.Module (runs code from the file)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow code shipped in a checkpoint (auto_map) to run"),
    config: Optional[str] = typer.Option(None, "--config", help="HF config dir/json for a .pt state dict (its tokenizer is used too)"),
    data: Optional[str] = typer.Option(None, "--data", help="training data for passes that train (hesso): digits, pydoc, "
                                       "a .npz of inputs/labels, or a .txt/.jsonl text"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="training epochs for passes that train"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="training steps for passes that train (with --epochs: whichever ends first)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Compress MODEL with a recipe and write a verified checkpoint to OUT."""
    with user_errors(debug):
        _run(model, recipe, output, format, calib, tokenizer, device, dtype, seed, set_, check_passes, trust_pickle, config,
             trust_remote_code, training={"data": data, "epochs": epochs, "steps": steps})


def default_format(model_arg: str) -> str:
    """hf, except for an ONNX or .pt2 input (which has no Hugging Face config to write)."""
    suffix = Path(model_arg).suffix.lower()
    return {".onnx": "onnx", ".pt2": "pt2"}.get(suffix, "hf")


def _run(model_arg: str, recipe_arg: str, output: Path | None, format: str | None, calib: str, tokenizer: str | None,
         device: str, dtype: str | None, seed: int, overrides: list[str], check_passes: bool, trust_pickle: bool,
         config: str | None, trust_remote_code: bool = False, training: dict | None = None) -> None:
    from slimc import api
    from slimc.compiler.calibration.sources import open_source
    from slimc.compiler.emit.atomic import check_output
    from slimc.compiler.emit.report import layer_widths
    from slimc.compiler.emit.save import check_dtype, check_writable, formats_for
    from slimc.compiler.pipeline.passes import NEEDS_TRAINING, resolve_device, resolve_dtype
    from slimc.compiler.pipeline.recipes import load_recipe

    # everything that can be checked without loading the model is checked first
    recipe = load_recipe(recipe_arg, overrides)
    training = training or {}
    format_given = format
    format = format or default_format(model_arg)
    open_source(calib)  # cheap: the file is read only when a pass asks for tokens
    resolve_device(device)
    check_dtype(formats_for(format), resolve_dtype(dtype))
    in_path = _input_path(model_arg)
    out = check_output(output if output is not None else default_output(model_arg, recipe.name), [in_path])
    quiet_libraries()
    with Steps() as steps:
        with steps.step(f"Loading {model_arg}"):
            model = api.load(model_arg, trust_pickle=trust_pickle, config=config, tokenizer=tokenizer,
                             trust_remote_code=trust_remote_code)
        if format_given is None and model.source_format == "pt" and model.config is None:
            format = "pt2"  # a pickled plain nn.Module has no Hugging Face form; .pt2 needs no pickle to load
        trainers = [p for p in recipe.build() if NEEDS_TRAINING in p.needs()]
        spec = training.get("data") or (getattr(trainers[0].config, "data", "digits") if trainers else None)
        if spec and model.module is not None:  # the data is checked now, not after loading and tracing
            from slimc.compiler.training.sources import open_training_data

            data = open_training_data(spec, model)
            if model.example_inputs is None and not model.is_causal_lm:
                model.example_inputs = data.example_inputs(model.module)  # its first example traces and exports the model
        # what the passes cannot run on, or the output cannot hold, is refused before any work
        api.check(model, recipe, calib=calib, device=device, dtype=dtype, **training)
        check_writable(model, formats_for(format))
        if model.module is not None:
            check_dtype(formats_for(format), resolve_dtype(dtype) or next(iter(model.module.parameters())).dtype)
        input_info = _input_info(model, in_path)
        before = layer_widths(model)
        model = api.compress(model, recipe, calib=calib, seed=seed, device=device, dtype=dtype,
                             check_passes=check_passes, instruments=[steps.instrument], **training)
        report = api.save(model, out, format=format, protect=[in_path], input_info=input_info,
                          recipe=recipe.to_dict(), before_layers=before, step=steps.step)
    _summary(report, out)


@app.command("recipes")
def recipes_command(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """List the shipped recipes."""
    from slimc.compiler.pipeline.recipes import load_recipe, shipped_recipes

    with user_errors(debug):
        table = Table(title="slimc recipes")
        table.add_column("recipe", style="bold")
        table.add_column("passes")
        table.add_column("description")
        for name in shipped_recipes():
            r = load_recipe(name)
            passes = ", ".join(f"{n}({', '.join(f'{k}={v}' for k, v in o.items())})" for n, o in r.passes)
            table.add_row(name, passes, r.description)
        Console(width=160).print(table)


# ---------------------------------------------------------------- inspect


def llm_summary(model: Any) -> dict[str, Any]:
    """Architecture numbers of a decoder LLM, read from its weights, and its pruning units.

    The units are the ones every LLM structured-pruning pass uses (`passes.structured.units.
    decoder_units`): per layer, the attention units (KV groups / heads) and MLP units (neurons,
    expert neurons), each prunable with its cost, and what is left whole with the reason (an MQA
    model's single KV head, a fused QKV the analysis cannot cut, ...).
    """
    from torch import nn

    from slimc.errors import SlimcError
    from slimc.passes.structured.units import decoder_units

    cfg = model.config
    linear = sum(m.in_features * m.out_features for m in model.module.modules() if isinstance(m, nn.Linear))
    linear += sum(m.weight.numel() for m in model.module.modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf"))
    emb, head = model.module.get_input_embeddings(), model.module.get_output_embeddings()
    info: dict[str, Any] = {
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "tied_embeddings": emb is not None and head is not None and emb.weight is head.weight,
        "flops_per_token": 2 * linear,
    }
    try:
        found = decoder_units(model, strict=False)
    except SlimcError as exc:  # still show what can be read without the units
        info["units_error"] = str(exc)
        return info
    views = found.groups
    info["layers"] = len(views)
    info["head_dim"] = views[0].head_dim if views else None
    # QK^T and AV per token per context position
    info["attention_flops_per_token_per_context_position"] = sum(
        2 * 2 * v.query_heads * v.head_dim for v in views if v.query_heads and v.head_dim)
    info["per_layer"] = [
        {"layer": v.index, "query_heads": v.query_heads, "kv_heads": v.kv_heads,
         "group_size": v.query_heads // v.kv_heads if v.query_heads and v.kv_heads else None,
         "mlp_neurons": sum(g.size for g in v.mlp) if v.mlp else None}
        for v in views
    ]
    groups = []
    for units in found:
        for u in units:
            groups.append({"name": u.group.name, "role": u.group.role, "layer": u.layer, "size": u.size, "prunable": True,
                           "cost": u.cost, "output_projection": u.out_proj, "reason": ""})
    for w in found.whole:
        groups.append({"name": w["name"], "role": w["role"], "layer": w["layer"], "size": w["size"], "prunable": False,
                       "reason": w["reason"]})
    info["groups"] = sorted(groups, key=lambda g: (g["layer"], not g["prunable"]))
    return info


def generic_groups(model: Any) -> list[dict[str, Any]] | None:
    """Groups from the coupled-dimension analysis on the graph IR (None without example inputs)."""
    from slimc.compiler.analysis.coupling import model_groups

    if not model.is_onnx and not model.example_inputs:
        return None  # a torch module without example inputs cannot be traced
    return [
        {"name": g.name, "role": g.role, "layer": g.layer, "size": g.size, "prunable": g.prunable, "reason": g.reason}
        for g in model_groups(model)
    ]


def inspect_model(model: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": str(model.source) if model.source else None,
        "format": model.source_format,
        "architecture": (
            (getattr(model.config, "architectures", None) or [type(model.module).__name__])[0]
            if model.module is not None else "onnx graph"
        ),
        "parameters": model.num_parameters(),
    }
    if model.is_causal_lm:
        info["model_type"] = getattr(model.config, "model_type", None)
        info.update(llm_summary(model))
    else:
        info["groups"] = generic_groups(model)
    return info


@app.command("inspect")
def inspect_command(
    model: str = typer.Argument(..., help="HF dir, .gguf, .pt2, .onnx, .pt, or 'smollm2'"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled nn.Module"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow code shipped in a checkpoint (auto_map) to run"),
    config: Optional[str] = typer.Option(None, "--config", help="HF config dir/json for a .pt state dict"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Show a model's architecture, size, FLOPs per token and the prunable groups slimc finds."""
    from slimc.api import load
    from slimc.compiler.emit.report import jsonable

    with user_errors(debug):
        quiet_libraries()
        info = jsonable(inspect_model(load(model, trust_pickle=trust_pickle, config=config, trust_remote_code=trust_remote_code)))
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        console = Console(width=140)
        head = Table(show_header=False, title=f"{model}")
        for key in ("architecture", "format", "parameters", "layers", "hidden_size", "vocab_size", "head_dim",
                    "tied_embeddings", "flops_per_token", "attention_flops_per_token_per_context_position"):
            if key in info:
                value = info[key]
                head.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
        console.print(head)
        if info.get("per_layer"):
            t = Table(title="decoder layers (prunable units: KV groups, MLP neurons)")
            for col in ("layer", "query heads", "KV heads (groups)", "q heads per group", "MLP neurons"):
                t.add_column(col, justify="right")
            for r in info["per_layer"]:
                t.add_row(*("-" if r[k] is None else str(r[k]) for k in ("layer", "query_heads", "kv_heads", "group_size", "mlp_neurons")))
            console.print(t)
            t = Table(title="units (what the LLM structured-pruning passes can remove)")
            for col in ("layer", "group", "role", "size", "params / unit", "prunable"):
                t.add_column(col)
            for g in info.get("groups") or []:
                t.add_row(str(g["layer"]), g["name"], g["role"], "-" if g["size"] is None else str(g["size"]),
                          str(g.get("cost", "-")), "yes" if g["prunable"] else f"no: {g.get('reason', '')}")
            console.print(t)
        elif info.get("units_error"):
            console.print(f"units: {info['units_error']}")
        elif info.get("groups"):
            t = Table(title="prunable groups")
            for col in ("group", "role", "size", "prunable"):
                t.add_column(col)
            for g in info["groups"]:
                t.add_row(g["name"], g["role"], str(g["size"]), "yes" if g["prunable"] else f"no: {g.get('reason', '')}")
            console.print(t)
        elif info.get("groups") is None and not info.get("per_layer"):
            console.print("groups: coupled-dimension analysis is not available for this model")


# ---------------------------------------------------------------- export


@app.command("export")
def export_command(
    model: str = typer.Argument(..., help="HF dir, .gguf, .pt2, .onnx, .pt, or 'smollm2'"),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx | pt2 | hf | all"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output directory [default: <input>-<format>]"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled nn.Module"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow code shipped in a checkpoint (auto_map) to run"),
    config: Optional[str] = typer.Option(None, "--config", help="HF config dir/json for a .pt state dict"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Export MODEL without compressing it (ONNX is checked against PyTorch in ONNX Runtime)."""
    from slimc.api import load
    from slimc.compiler.emit.atomic import check_output
    from slimc.compiler.emit.report import layer_widths
    from slimc.compiler.emit.save import formats_for, save

    with user_errors(debug):
        formats_for(format)
        in_path = _input_path(model)
        out = check_output(output if output is not None else default_output(model, format), [in_path])
        quiet_libraries()
        with Steps() as steps:
            with steps.step(f"Loading {model}"):
                m = load(model, trust_pickle=trust_pickle, config=config, trust_remote_code=trust_remote_code)
            report = save(m, out, format=format, protect=[in_path], input_info=_input_info(m, in_path),
                          before_layers=layer_widths(m), step=steps.step)
        _summary(report, out)


# `compress eval` lives in cli/eval_cmd.py, registered here so `compress eval ...` dispatches
from slimc.cli.eval_cmd import eval_command  # noqa: E402 — after `app` exists; eval_cmd imports app lazily

app.command("eval")(eval_command)


def dispatch(argv: list[str]) -> list[str]:
    """`compress MODEL ...` -> `compress run MODEL ...`; subcommands and --help pass through."""
    if not argv:
        return argv
    first = argv[0]
    if first in SUBCOMMANDS or first in ("--help", "-h"):
        return argv
    return ["run", *argv]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    app(args=dispatch(args), prog_name=Path(sys.argv[0]).name if argv is None else "compress")


if __name__ == "__main__":
    main()
