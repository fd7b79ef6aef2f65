"""Faults during a run: the process killed while writing, a full disk, an OUT that appears meanwhile,
two runs on one OUT, a read-only OUT. In every case the input is untouched, OUT holds the previous
complete result or nothing, and temporary files are gone after the next run."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from slimc.cli.app import app, dispatch
from slimc.compiler.emit.atomic import _writer_lock


def compress(*args):
    return CliRunner().invoke(app, dispatch([str(a) for a in args]), catch_exceptions=False)


def digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def beside(out: Path) -> list[str]:
    """Names in OUT's parent that belong to OUT's writing (temporary dirs, the lock), OUT excluded."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def tiny(tmp_path) -> Path:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path / "tiny"
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


KILLED_WRITER = """
import sys, time
import slimc.compiler.emit.save as emit
real = emit.write_hf
def slow(model, tmp):
    written = real(model, tmp)
    (tmp / "WRITING").write_text("half-way")
    time.sleep(300)
    return written
emit.write_hf = slow
from slimc.cli.app import main
sys.argv = ["compress", sys.argv[1], "--recipe", "identity", "-o", sys.argv[2]]
main()
"""


def kill_while_writing(model: Path, out: Path) -> None:
    """Start `compress` in a subprocess and SIGKILL it once its weights are half written."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(model), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(out.parent.glob(f".{out.name}.tmp-*/WRITING")):
            assert proc.poll() is None, "the writer exited before it was killed"
            assert time.monotonic() < deadline, "the writer never reached the write"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkill_while_writing_leaves_nothing_and_the_next_run_cleans_up(tiny, tmp_path):
    before = digest(tiny)
    out = tmp_path / "out"
    kill_while_writing(tiny, out)
    assert not out.exists()
    assert digest(tiny) == before
    assert any(n.startswith(".out.tmp-") for n in beside(out))  # what the killed run left
    r = compress(tiny, "--recipe", "identity", "-o", out)
    assert r.exit_code == 0, r.output
    assert (out / "report.json").is_file() and beside(out) == []


def test_sigkill_while_replacing_keeps_the_previous_result(tiny, tmp_path):
    out = tmp_path / "out"
    assert compress(tiny, "--recipe", "identity", "-o", out).exit_code == 0
    previous = digest(out)
    kill_while_writing(tiny, out)
    assert digest(out) == previous  # the earlier complete result, untouched
    assert compress(tiny, "--recipe", "identity", "-o", out).exit_code == 0
    assert beside(out) == []


def test_full_disk_while_writing(tiny, tmp_path, monkeypatch):
    """ENOSPC raised by the writer (as a full disk raises it): one error line, nothing at OUT."""
    import slimc.compiler.emit.save as emit

    real = emit.write_hf

    def full(model, tmp):
        real(model, tmp)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(emit, "write_hf", full)
    before = digest(tiny)
    out = tmp_path / "out"
    line = one_error(compress(tiny, "--recipe", "identity", "-o", out))
    assert "disk is full" in line and str(out) in line
    assert not out.exists() and beside(out) == [] and digest(tiny) == before


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A real small file system mounted at `where` (root only); skips the test where mounting is not possible."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the injected ENOSPC test covers the writer")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_on_a_real_small_file_system(tiny, tmp_path):
    with small_tmpfs(tmp_path / "small", "64k") as fs:
        out = fs / "out"
        line = one_error(compress(tiny, "--recipe", "identity", "-o", out))
        assert "No space left on device" in line or "disk is full" in line
        assert list(fs.iterdir()) == []  # neither OUT nor any temporary file or lock


def test_read_only_output(tiny, tmp_path):
    """A previous result on a file system that became read-only (or a read-only OUT) is kept, and the run says why."""
    out = tmp_path / "ro" / "out"
    if os.geteuid() == 0:
        with small_tmpfs(tmp_path / "ro", "16m") as fs:
            assert compress(tiny, "--recipe", "identity", "-o", out).exit_code == 0
            previous = digest(out)
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
            line = one_error(compress(tiny, "--recipe", "identity", "-o", out))
            assert "read-only" in line.lower()
            assert digest(out) == previous
    else:
        out.parent.mkdir()
        assert compress(tiny, "--recipe", "identity", "-o", out).exit_code == 0
        previous = digest(out)
        out.chmod(0o555)
        try:
            line = one_error(compress(tiny, "--recipe", "identity", "-o", out))
            assert "read-only" in line
            assert digest(out) == previous
        finally:
            out.chmod(0o755)


def test_output_that_appears_meanwhile_is_not_replaced(tiny, tmp_path, monkeypatch):
    import slimc.compiler.emit.save as emit

    out = tmp_path / "out"
    real = emit.write_hf

    def someone_else_writes(model, tmp):
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
        return real(model, tmp)

    monkeypatch.setattr(emit, "write_hf", someone_else_writes)
    line = one_error(compress(tiny, "--recipe", "identity", "-o", out))
    assert "appeared while slimc was writing" in line
    assert digest(out) == {"thesis.tex": b"years of work"} and beside(out) == []


def test_second_run_on_the_same_output_stops_at_once(tiny, tmp_path):
    out = tmp_path / "out"
    with _writer_lock(out.resolve()):  # another run holds OUT
        line = one_error(compress(tiny, "--recipe", "identity", "-o", out))
        assert "another slimc run is writing" in line
        assert not out.exists()
    assert compress(tiny, "--recipe", "identity", "-o", out).exit_code == 0
    assert beside(out) == []


def test_two_concurrent_runs_leave_one_complete_result(tiny, tmp_path):
    """Two real processes on one OUT: each either finishes or stops with one error line; OUT is complete."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from slimc.cli.app import main; main()", str(tiny), "--recipe", "identity", "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code in (0, 2), err
        if code == 2:
            assert [ln for ln in err.splitlines() if ln.strip()][-1].startswith("error: "), err
    assert (out / "report.json").is_file() and (out / "model.safetensors").is_file()
    assert beside(out) == []
