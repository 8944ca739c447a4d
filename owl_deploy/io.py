"""Atomic file and folder writes: a killed or failed step never leaves a half-written artifact.

An artifact is written into a hidden sibling named after it and the writing process
(``.NAME.tmp-<pid>-<random>``) and renamed into place at the end. A failure removes the sibling; a
process killed outright cannot, so the next write of the same ``NAME`` removes the siblings whose
writer is no longer alive (and only those: a concurrent live writer keeps its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(dest: Path) -> list[Path]:
    """Remove the temporary siblings of ``dest`` left by writers that were killed; returns them."""
    dest = Path(dest)
    removed = []
    if not dest.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for leftover in dest.parent.glob(f".{dest.name}.{kind}-*"):
            pid_text = leftover.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_dir(dest: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``dest``, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if dest.exists():
            if not overwrite:
                raise FileExistsError(dest)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive(lock: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock`` for the block (the kernel drops it if the process dies); if another
    process holds it, fail at once with ``busy`` (``waiting``, refusing instead of waiting). The lock file is
    removed when the block ends."""
    from owl_deploy.errors import OwlError

    def refuse() -> None:
        raise OwlError(busy) from None

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with waiting(lock, refuse):
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def waiting(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the block: a folder (nothing is written into it, so a read-only one
    works) or a lock file, created if missing and left in place. If another process holds it, call ``on_wait`` and
    wait for it; the kernel drops the lock of a process that dies."""
    import fcntl

    path = Path(path)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def atomic_file(dest: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling file for writing; it is renamed onto ``dest`` only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are ordinary readable files
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(dest: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically (sorted keys keep reports diffable)."""
    with atomic_file(dest) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_report(stem: Path, obj: Any, markdown: str) -> None:
    """A benchmark's record: ``<stem>.json`` (the numbers) and ``<stem>.md`` (their tables), each atomic.

    ``stem`` may hold dots (``quality-qwen2.5-coder-1.5b``): the suffixes are appended, never substituted."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_name(f"{stem.name}.json"), obj)
    with atomic_file(stem.with_name(f"{stem.name}.md")) as fh:
        fh.write(markdown)
