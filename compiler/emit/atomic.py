"""Atomic output: write into a temporary directory beside OUT, then move it into place.

    with atomic_dir(out, protect=[input_path]) as tmp:
        ...write and verify files under tmp...
    # here OUT holds exactly what was verified; on any exception nothing is left at OUT

The temporary directory lives in OUT's parent so the final `rename` stays on one file system. An
existing OUT is replaced only when it is empty or was written by slimc (it holds `report.json`);
anything else is refused, so a typo in `-o` cannot delete a user's data. OUT may never be the input
or contain it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from slimc.errors import SlimcError

SLIMC_MARKER = "report.json"  # a directory holding this was written by slimc and may be replaced


def check_output(out: Path, protect: Iterable[Path] = ()) -> Path:
    """Resolve OUT and refuse targets that would destroy the input or someone else's files."""
    out = Path(out).expanduser().resolve()
    for p in protect:
        p = Path(p).expanduser().resolve()
        if out == p or out in p.parents:
            raise SlimcError(f"output {out} is the input or contains it; choose another -o")
    if out.exists():
        if not out.is_dir():
            raise SlimcError(f"output {out} exists and is a file; remove it or choose another -o")
        if any(out.iterdir()) and not (out / SLIMC_MARKER).is_file():
            raise SlimcError(f"output {out} exists and was not written by slimc; remove it or choose another -o")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces OUT, on failure it is removed."""
    out = check_output(Path(out), protect)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT should get normal permissions
    except OSError as e:
        raise SlimcError(f"cannot write next to {out}: {e.strerror or e}; choose a writable -o") from None
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normal_permissions(tmp: Path) -> None:
    """Some writers (safetensors via a temp file) leave files private; give them the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    """Move tmp to out; an old slimc output is moved aside first and deleted only afterwards."""
    _normal_permissions(tmp)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old, out)  # put the previous output back
        raise SlimcError(f"cannot move the result into {out}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
