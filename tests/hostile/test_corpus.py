"""Every case of the hostile-input corpus: exit 2, one `error:` line naming the file, nothing lost.

The whole corpus runs once per session (`results`); each case is then its own test. TESTING.md
keeps the table of cases with the error line each one printed; `SLIMC_WRITE_TESTING=1 pytest
tests/hostile/test_corpus.py` rewrites it, and `test_testing_md_is_current` fails when a case was
added, removed or changed without that.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from slimc.cli.app import app, dispatch

from hostile_corpus import CASES, Base, Case

TESTING_MD = Path(__file__).resolve().parents[2] / "TESTING.md"
BEGIN, END = "<!-- corpus:begin -->", "<!-- corpus:end -->"


def tree_digest(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under root (symlinks by their target text, sparse files by content)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


@dataclass
class Outcome:
    case: Case
    exit_code: int
    stderr: str
    stdout: str
    out_exists: bool
    leftovers: list[str]
    input_changed: list[str]
    marker_ran: bool
    names: str


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Base:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_tokenizer import save_tiny_tokenizer

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny"
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    save_tiny_tokenizer(path, 128)
    return Base(hf=path, tensors=load_file(path / "model.safetensors"))


def run_case(c: Case, base: Base, root: Path) -> Outcome:
    d = root / c.name
    d.mkdir()
    args = [str(a) for a in c.build(d, base)]
    names = c.names or Path(args[0]).name
    before_inputs = {"case": tree_digest(d), "base": tree_digest(base.hf)}
    out = d / "out"
    try:
        result = CliRunner().invoke(app, dispatch([*args, "-o", str(out)]), catch_exceptions=False)
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    except Exception:  # noqa: BLE001 — recorded, and reported by this case's own test
        code, stdout, stderr = -1, "", traceback.format_exc()
    after_inputs = {"case": tree_digest(d), "base": tree_digest(base.hf)}
    changed = [f"{k}/{p}" for k in before_inputs for p in set(before_inputs[k]) | set(after_inputs[k])
               if before_inputs[k].get(p) != after_inputs[k].get(p)]
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".out.")]
    marker = d / c.marker if c.marker else None
    outcome = Outcome(c, code, stderr, stdout, out.exists(), leftovers, changed,
                      bool(marker and marker.exists()), names)
    # big sparse inputs are removed now so the session does not hold them
    for p in d.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size > 10**8:
            p.unlink()
    return outcome


@contextlib.contextmanager
def memory_guard(extra_bytes: int = 6 << 30):
    """Cap this process's address space at its current size + `extra_bytes` while the corpus runs: an
    input that makes a library allocate a model its header only claims (a memory bomb) then fails its
    case with MemoryError instead of taking the machine down."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    cap = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="session")
def results(base, tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("corpus")
    try:
        with memory_guard():
            return {c.name: run_case(c, base, root) for c in CASES}
    finally:
        shutil.rmtree(root, ignore_errors=True)


INPUT_AREAS = ("safetensors", "hf", "gguf", "onnx", "pytorch")
INSPECTED = [c.name for c in CASES if c.area in INPUT_AREAS and not c.name.startswith("st-nan")]


@pytest.fixture(scope="session")
def inspected(base, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """`compress inspect` on every broken input file: (exit status, stderr)."""
    root = tmp_path_factory.mktemp("inspect")
    out = {}
    try:
        with memory_guard():
            _inspect_all(base, root, out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _inspect_all(base: Base, root: Path, out: dict[str, tuple[int, str]]) -> None:
    for c in CASES:
        if c.name not in INSPECTED:
            continue
        d = root / c.name
        d.mkdir()
        args = [str(a) for a in c.build(d, base)]
        extra = args[args.index("--config"): args.index("--config") + 2] if "--config" in args else []
        try:
            r = CliRunner().invoke(app, ["inspect", args[0], *extra], catch_exceptions=False)
            out[c.name] = (r.exit_code, r.stderr)
        except Exception:  # noqa: BLE001 — reported by the case's test
            out[c.name] = (-1, traceback.format_exc())
        for p in d.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.stat().st_size > 10**8:
                p.unlink()


@pytest.mark.parametrize("name", INSPECTED)
def test_inspect_refuses_the_same_inputs(inspected, name):
    code, stderr = inspected[name]
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{name}: exit {code}\n{stderr}"


def error_line(o: Outcome) -> str:
    lines = [ln for ln in o.stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{o.case.name}: stderr was:\n{o.stderr}"
    return lines[0]


def test_corpus_is_large_enough():
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_case(results, name):
    o = results[name]
    assert o.exit_code == 2, f"{name}: exit {o.exit_code}\n{o.stdout}\n{o.stderr}"
    line = error_line(o)
    assert "Traceback" not in o.stderr + o.stdout
    assert re.search(o.case.expect, line, re.IGNORECASE), f"{name}: {line!r} does not match {o.case.expect!r}"
    assert o.names in line, f"{name}: the error does not name {o.names!r}: {line!r}"
    assert not o.out_exists, f"{name}: something was left at OUT"
    assert not o.leftovers, f"{name}: temporary files left beside OUT: {o.leftovers}"
    assert not o.input_changed, f"{name}: inputs changed: {o.input_changed}"
    assert not o.marker_ran, f"{name}: code from the input ran"


def corpus_table(results: dict[str, Outcome] | None) -> str:
    rows = ["| # | case | input | what is wrong | the error line (paths shortened) |", "| --- | --- | --- | --- | --- |"]
    for i, c in enumerate(CASES, 1):
        seen = ""
        if results is not None:
            o = results[c.name]
            seen = error_line(o).removeprefix("error: ")
            seen = re.sub(r"(/[^\s'\"]*)?/corpus\d*/" + re.escape(c.name) + "/", "", seen)
            seen = re.sub(r"/[^\s'\"]*/base\d*/tiny", "tiny", seen)
            seen = seen.replace("|", "\\|").replace("`", "'")
        safe = " — no code runs" if c.marker else ""
        rows.append(f"| {i} | `{c.name}` | {c.area} | {c.what}{safe} | {seen} |")
    return "\n".join(rows) + "\n"


def test_testing_md_is_current(results):
    """TESTING.md lists exactly the corpus's cases (names, inputs, descriptions) in order."""
    table = corpus_table(results)
    text = TESTING_MD.read_text() if TESTING_MD.is_file() else ""
    if os.environ.get("SLIMC_WRITE_TESTING"):
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        TESTING_MD.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
        text = TESTING_MD.read_text()
    section = text.partition(BEGIN)[2].partition(END)[0]
    def key(t):
        return [r.rsplit("|", 2)[0] for r in t.strip().splitlines()]

    assert key(section) == key(table), "TESTING.md is out of date: SLIMC_WRITE_TESTING=1 pytest tests/hostile/test_corpus.py"


def test_nan_weights_are_named_in_a_warning(results):
    o = results["st-nan-weights"]
    warnings = [ln for ln in o.stderr.splitlines() if ln.startswith("warning: ")]
    assert any("NaN or Inf" in w and "q_proj.weight" in w for w in warnings), o.stderr


TRUSTING_FLAG = {"hf-remote-code-config": "--trust-remote-code", "hf-remote-code-tokenizer": "--trust-remote-code",
                 "pt-pickle-payload": "--trust-pickle", "pt-raw-pickle-payload": "--trust-pickle"}


@pytest.mark.parametrize("name", sorted(TRUSTING_FLAG))
def test_payloads_are_live_and_run_only_with_the_flag(base, tmp_path, name):
    """The marker payloads are real: given the flag that trusts them, they do run (and without it, test_case
    showed they did not)."""
    c = next(c for c in CASES if c.name == name)
    args = c.build(tmp_path, base)
    CliRunner().invoke(app, dispatch([*map(str, args), TRUSTING_FLAG[name], "-o", str(tmp_path / "out")]))
    assert (tmp_path / c.marker).exists()


@pytest.mark.parametrize("name", ["calib-npy-pickle", "calib-pt-pickle", "hf-pickled-bin"])
def test_untrusted_payloads_are_live(base, tmp_path, name):
    """Payloads no flag admits are live too: unpickled directly, they run."""
    import pickle

    import numpy as np
    import torch

    c = next(c for c in CASES if c.name == name)
    c.build(tmp_path, base)
    if name == "calib-npy-pickle":
        np.load(tmp_path / "ids.npy", allow_pickle=True)
    elif name == "calib-pt-pickle":
        torch.load(tmp_path / "ids.pt", weights_only=False)
    else:
        pickle.loads((tmp_path / "model" / "pytorch_model.bin").read_bytes())
    assert (tmp_path / c.marker).exists()


def test_output_diff_never_calls_nan_equal():
    import numpy as np

    from slimc.compiler.emit.onnx_export import output_diff
    from slimc.errors import SlimcError

    ref = np.ones((2, 3))
    assert output_diff(ref + 1e-7, ref, "x") < 1e-6
    got = ref.copy()
    got[0, 1] = np.nan
    assert output_diff(got, ref, "x") == float("inf")  # max() alone would skip the NaN and call this equal
    got[0, 1] = np.inf
    assert output_diff(got, ref, "x") == float("inf")
    with pytest.raises(SlimcError, match="not finite"):
        output_diff(got, got, "the ONNX model")
