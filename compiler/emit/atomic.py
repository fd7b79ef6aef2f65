"""Atomic output: write into a temporary directory beside OUT, then move it into place.

    with atomic_dir(out, protect=[input_path]) as tmp:
        ...write and verify files under tmp...
    # here OUT holds exactly what was verified; on any exception nothing is left at OUT

The temporary directory lives in OUT's parent so the final `rename` stays on one file system. An
existing OUT is replaced only when it is empty or was written by slimc (it holds `report.json`);
anything else is refused, so a typo in `-o` cannot delete a user's data. OUT may never be the input
or contain it.

Faults: while a run writes OUT it holds an exclusive lock (`.OUT.lock`, flock) so a second run on
the same OUT stops at once with one error line; the temporary directories carry the writer's pid
(`.OUT.tmp-<pid>-*`, `.OUT.old-<pid>-*`), and the next run removes those a dead process left (a
SIGKILL, a power cut). A directory that appears at OUT while the run writes is never replaced
unless slimc wrote it, a read-only OUT is refused, and an `OSError` while writing (a full disk, a
quota, a read-only file system) is one `SlimcError` naming OUT; in every case OUT keeps the previous
complete result or nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
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
        if not os.access(out, os.W_OK):
            raise SlimcError(f"output {out} is read-only; make it writable or choose another -o")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary directories of OUT that a process no longer alive left behind."""
    removed = []
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = p.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside OUT for the duration; a second writer of OUT gets a SlimcError at once."""
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise SlimcError(f"another slimc run is writing {out}; wait for it to finish or choose another -o") from None
            raise
        # the holder before us may have unlinked the file after we opened it: lock the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: str | Path, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces OUT, on failure it is removed."""
    out = check_output(Path(out), protect)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = _writer_lock(out)
        lock.__enter__()
    except OSError as e:
        raise SlimcError(f"cannot write next to {out}: {e.strerror or e}; choose a writable -o") from None
    try:
        remove_stale(out)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT should get normal permissions
        except OSError as e:
            raise SlimcError(f"cannot write next to {out}: {e.strerror or e}; choose a writable -o") from None
        try:
            try:
                yield tmp
            except Exception as e:  # noqa: BLE001 — only file-system failures are turned into a user error
                why = _file_system_failure(e)
                if why is None:
                    raise
                raise SlimcError(f"cannot write {out}: {why}; nothing was written") from None
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.__exit__(None, None, None)


_FS_ERRNOS = {errno.ENOSPC: "No space left on device (the disk is full: free space or choose another -o)",
              errno.EDQUOT: "Disk quota exceeded (free space or choose another -o)",
              errno.EROFS: "Read-only file system (choose a writable -o)"}


def _file_system_failure(e: BaseException) -> str | None:
    """What went wrong, when `e` is the file system refusing a write: an OSError with an errno, or a
    library's own error that wraps one (safetensors' Rust writer reports ENOSPC in its message)."""
    if isinstance(e, OSError) and e.errno is not None:
        return _FS_ERRNOS.get(e.errno, e.strerror or str(e))
    text = str(e)
    for code, why in _FS_ERRNOS.items():
        if os.strerror(code) in text:
            return why
    return None


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
    if out.exists() or out.is_symlink():
        # re-checked now: something may have appeared at OUT while the run was writing
        if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not (out / SLIMC_MARKER).is_file()):
            raise SlimcError(f"output {out} appeared while slimc was writing and was not written by slimc; it was left as it is "
                             "and nothing was written: remove it or choose another -o")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rmdir(old)
        try:
            os.rename(out, old)
        except OSError as e:
            raise SlimcError(f"cannot replace {out}: {e.strerror or e}; nothing was written") from None
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old, out)  # put the previous output back
        raise SlimcError(f"cannot move the result into {out}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
