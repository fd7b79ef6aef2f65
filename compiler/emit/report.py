"""The compression report: OUT/report.json, OUT/report.md and, for LLMs, OUT/layer_widths.png.

It records what came in and what went out (parameter counts, file sizes), each pass's stats and
time (from `model.history`), the verification results of every emitter, the per-layer kept
widths of a decoder LLM (query heads, KV heads, MLP neurons) read from the weights, and `notes`:
what a reader must not miss, such as a recipe that removed nothing (with the reason its passes gave).

The same command gives the same report bytes except for its timings, which are exactly: `created`
(when the report was written), each pass's `seconds`, and the pass stats whose key ends in
`_seconds` (`calibration_seconds`, ...). report.md shows timings only in its last section,
"## Timings", so everything above that heading is byte-identical between runs. The files do not
record OUT's own location (they are inside it; the table of files is relative to it), so writing to
another directory, or moving OUT, changes nothing; the input's absolute path is kept as provenance.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from slimc._version import __version__
from slimc.compiler.analysis.llm import recognised_layers
from slimc.compiler.model import Model

PLOT_NAME = "layer_widths.png"
TIMING_SUFFIX = "_seconds"  # pass stats named so are wall-clock times


def is_timing_stat(key: str) -> bool:
    return key.endswith(TIMING_SUFFIX)


def path_bytes(path: Path | None) -> int | None:
    """Size of a file, or of every file under a directory."""
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def layer_widths(model: Model) -> list[dict[str, int]] | None:
    """Per decoder layer: query heads, KV heads, MLP neurons; None when not a decoder LLM."""
    if not model.is_causal_lm:
        return None
    views = recognised_layers(model)
    if views is None:
        return None  # not a Llama-style layout: no per-layer table
    return [
        {"layer": v.index, "num_heads": v.num_heads, "num_kv_heads": v.num_kv_heads, "intermediate_size": v.intermediate_size}
        for v in views
    ]


def model_dtype(model: Model) -> str | None:
    """The float type of a PyTorch model's parameters ('float32', 'bfloat16', ...), None for ONNX."""
    if model.module is None:
        return None
    p = next(iter(model.module.parameters()), None)
    return None if p is None else str(p.dtype).removeprefix("torch.")


def jsonable(value: Any) -> Any:
    """Pass stats may hold tensors, numpy values, sets or paths: make them JSON (sets sorted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        # a set's iteration order follows string hashes, which change per process: sort it
        return [jsonable(v) for v in sorted(value, key=lambda v: (type(v).__name__, repr(v)))]
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_report(
    model: Model,
    out_dir: Path,
    *,
    formats: Sequence[str],
    verification: dict[str, Any],
    written: dict[str, Any] | None = None,
    input_info: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}
    report = {
        "slimc_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": input_info or {
            "path": str(model.source) if model.source else None,
            "format": model.source_format,
            "bytes": path_bytes(model.source),
        },
        "recipe": recipe,
        "passes": [
            {"name": r.name, "modified": r.modified, "seconds": round(r.seconds, 3), "stats": r.stats,
             **({"checks": r.checks} if r.checks else {})}
            for r in model.history
        ],
        "output": {
            "formats": list(formats),
            "parameters": model.num_parameters(),
            "dtype": model_dtype(model),
            "files": files,
            "bytes": sum(files.values()),
            "written": written or {},
        },
        "verification": verification,
        "layers": layer_widths(model),
    }
    report = jsonable(report)
    report["notes"] = removal_notes(report["passes"])
    return report


NOTHING_REMOVED = "nothing_removed"  # a pass stat: why the pass removed nothing (group-magnitude, ...)


def removal_notes(passes: list[dict[str, Any]]) -> list[str]:
    """Notes for passes that set out to remove something and removed nothing.

    Such a pass says so with the stat `nothing_removed` (the reason, or "" when it cannot tell);
    passes that change nothing by design (`identity`) do not set it. When no pass of the recipe
    changed the model the note is about the recipe; otherwise one note per such pass."""
    idle = [p for p in passes if NOTHING_REMOVED in p["stats"] and not p["modified"]]
    if not idle:
        return []
    if not any(p["modified"] for p in passes):
        reasons = [f"{p['name']}: {r}" if len(idle) > 1 else r for p in idle if (r := _reason(p))]
        return [f"the recipe removed nothing ({'; '.join(reasons)})" if reasons else "the recipe removed nothing"]
    return [f"pass {p['name']} removed nothing" + (f" ({_reason(p)})" if _reason(p) else "") for p in idle]


def _reason(p: dict[str, Any]) -> str:
    return str(p["stats"].get(NOTHING_REMOVED) or "")


def _fmt(n: Any) -> str:
    if isinstance(n, bool) or n is None:
        return str(n)
    if isinstance(n, int):
        return f"{n:,}"
    if isinstance(n, float):
        return f"{n:.4g}"
    return str(n)


def _mib(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def render_markdown(report: dict[str, Any]) -> str:
    inp, out = report["input"], report["output"]
    lines = ["# slimc report", ""]
    if report.get("recipe"):
        lines += [f"Recipe: **{report['recipe'].get('name')}** — {report['recipe'].get('description', '')}", ""]
    lines += [
        "| | input | output |",
        "| --- | --- | --- |",
        f"| path | {inp.get('path')} | {out.get('path', '.')} |",
        f"| format | {inp.get('format')} | {', '.join(out['formats'])} |",
        f"| parameters | {_fmt(inp.get('parameters'))} | {_fmt(out['parameters'])} |",
        f"| size | {_mib(inp.get('bytes'))} | {_mib(out['bytes'])} |",
        f"| dtype | {inp.get('dtype', '')} | {out.get('dtype') or ''} |",
        "",
    ]
    if inp.get("parameters"):
        kept = out["parameters"] / inp["parameters"]
        lines += [f"Parameters kept: {kept:.2%}", ""]
    lines += ["## Passes", "", "| pass | modified | stats |", "| --- | --- | --- |"]
    for p in report["passes"]:
        stats = ", ".join(f"{k}={_fmt(v)}" for k, v in p["stats"].items()
                          if not isinstance(v, (list, dict)) and not is_timing_stat(k) and k != NOTHING_REMOVED)
        lines.append(f"| {p['name']} | {p['modified']} | {stats} |")
    if not report["passes"]:
        lines.append("| (none) | | |")
    if report.get("notes"):
        lines += ["", *(f"**Note:** {n}." for n in report["notes"])]
    probes = [(p["name"], p["checks"]["probe"]) for p in report["passes"] if p.get("checks", {}).get("probe")]
    if probes:
        lines += ["", "Output drift on the probe input after each pass (`--check-passes`):", "",
                  "| pass | finite | max abs drift from previous | from input |", "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {c['finite']} | {_fmt(c['max_abs_drift_from_previous'])} | {_fmt(c['max_abs_drift_from_input'])} |"
                  for n, c in probes]
    lines += ["", "## Verification", "", "| output | check | result | max abs diff | tolerance |", "| --- | --- | --- | --- | --- |"]
    notes = []
    for fmt, v in report["verification"].items():
        lines.append(f"| {fmt} | {v.get('check', '')} | {'ok' if v.get('ok') else 'FAILED'} | {_fmt(v.get('max_abs_diff'))} | {_fmt(v.get('atol'))} |")
        if v.get("float64_check"):
            f64 = v["float64_check"]
            mine = next(val for key, val in f64.items() if key.endswith("_vs_fp64") and not key.startswith("pytorch"))
            notes.append(
                f"- {fmt}: the difference exceeds the tolerance, so both were compared with a float64 PyTorch run: "
                f"{fmt} is {_fmt(mine)} from it, PyTorch fp32 {_fmt(f64['pytorch_fp32_vs_fp64'])} "
                f"(pass if <= {_fmt(f64['bound'])}): the gap is fp32 rounding, not the export."
            )
    if notes:
        lines += ["", *notes]
    if report.get("layers"):
        lines += ["", "## Per-layer widths", "", f"![per-layer widths]({PLOT_NAME})", "",
                  "| layer | query heads | KV heads | MLP neurons |", "| --- | --- | --- | --- |"]
        for row in report["layers"]:
            lines.append(f"| {row['layer']} | {row['num_heads']} | {row['num_kv_heads']} | {row['intermediate_size']} |")
    if report.get("training_plot"):
        lines += ["", "## Training", "", f"![pruning while training]({report['training_plot']})"]
    lines += ["", "## Files", "", "| file | size |", "| --- | --- |"]
    lines += [f"| {name} | {_mib(size)} |" for name, size in out["files"].items()]
    lines += _timings_section(report)
    return "\n".join(lines) + "\n"


def _timings_section(report: dict[str, Any]) -> list[str]:
    """The last section of report.md, the only one holding wall-clock values."""
    lines = ["", "## Timings", "", "Wall-clock times; they differ from run to run, the rest of this report does not.", ""]
    if report.get("created"):
        lines += [f"Written: {report['created']}", ""]
    lines += ["| pass | seconds | timed stats |", "| --- | --- | --- |"]
    for p in report["passes"]:
        timed = ", ".join(f"{k}={_fmt(v)}" for k, v in p["stats"].items() if is_timing_stat(k))
        lines.append(f"| {p['name']} | {p['seconds']:.2f} | {timed} |")
    if not report["passes"]:
        lines.append("| (none) | | |")
    return lines


def plot_layer_widths(layers: list[dict[str, int]], path: Path, before: list[dict[str, int]] | None = None) -> None:
    """Bar chart of kept KV heads / query heads and MLP neurons per layer (dashed: the input's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [r["layer"] for r in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(idx) + 3), 6), sharex=True)
    ax1.bar(idx, [r["num_heads"] for r in layers], color="tab:blue", label="query heads")
    ax1.bar(idx, [r["num_kv_heads"] for r in layers], color="tab:orange", label="KV heads")
    ax2.bar(idx, [r["intermediate_size"] for r in layers], color="tab:green", label="MLP neurons")
    if before:
        x = [r["layer"] for r in before]
        left, right = [i - 0.4 for i in x], [i + 0.4 for i in x]
        ax1.hlines([r["num_heads"] for r in before], left, right, colors="k", linestyles="--", label="input")
        ax2.hlines([r["intermediate_size"] for r in before], left, right, colors="k", linestyles="--", label="input")
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel("heads kept")
    ax2.set_ylabel("MLP neurons kept")
    ax2.set_xlabel("decoder layer")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def as_written(report: dict[str, Any]) -> dict[str, Any]:
    """The report as stored inside OUT: without `output.path` (OUT's absolute location, which a
    caller of `save` may want but which a file inside OUT need not state, and which would make two
    otherwise identical outputs differ by where they were written)."""
    return {**report, "output": {k: v for k, v in report["output"].items() if k != "path"}}


def plot_training(curve: list[dict[str, Any]], path: Path, title: str = "", budget: str = "budget") -> None:
    """Group sparsity and the kept share of the budget (left axis), and the evaluation metric (right
    axis), against training steps: how a training pass (HESSO) pruned while it trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curve]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(steps, [r.get("group_sparsity", 0.0) for r in curve], color="tab:red", label="group sparsity")
    ax.plot(steps, [r.get("cost_kept", 1.0) for r in curve], color="tab:orange", linestyle="--", label=f"{budget} kept (selected counted out)")
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction")
    ax.set_ylim(0.0, 1.05)
    metric = next((k for k in ("accuracy", "train_accuracy", "perplexity") if k in curve[-1]), None) if curve else None
    lines = ax.get_lines()
    if metric:
        ax2 = ax.twinx()
        lines += ax2.plot(steps, [r.get(metric) for r in curve], color="tab:blue", marker=".", label=metric)
        ax2.set_ylabel(metric)
        if metric == "perplexity":
            ax2.set_yscale("log")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TRAINING_PLOT_NAME = "training.png"


def write_report(report: dict[str, Any], out_dir: Path, before_layers: list[dict[str, int]] | None = None) -> None:
    if report.get("layers"):
        plot_layer_widths(report["layers"], out_dir / PLOT_NAME, before_layers)
        report["plot"] = PLOT_NAME
    trained = [p for p in report.get("passes") or [] if isinstance(p.get("stats"), dict) and p["stats"].get("training_curve")]
    if trained:
        p = trained[-1]
        plot_training(p["stats"]["training_curve"], out_dir / TRAINING_PLOT_NAME, title=f"{p['name']}: pruning while training",
                      budget=str(p["stats"].get("budget", "budget")))
        report["training_plot"] = TRAINING_PLOT_NAME
    stored = as_written(report)
    (out_dir / "report.json").write_text(json.dumps(stored, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(stored))
