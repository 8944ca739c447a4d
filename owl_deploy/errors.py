"""One exception type for every user-facing failure: the CLI prints its message on one line."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


class OwlError(Exception):
    """A bad input or an environment problem the user can fix; never a bug."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A library's exception as one line: its first non-empty line, and when that line only introduces
    what follows (it ends with ':'), the following lines too, joined; at most ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = " ".join(lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: what libraries that do their own I/O (safetensors, protobuf) say instead of raising OSError
_ERRNO_TEXT = {
    errno.ENOSPC: ("No space left on device", "StorageFull"),
    errno.EROFS: ("Read-only file system", "ReadOnlyFilesystem"),
    errno.EDQUOT: ("Disk quota exceeded", "FilesystemQuotaExceeded"),
    errno.EACCES: ("Permission denied", "PermissionDenied"),
}


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc)
    return next((e for e, needles in _ERRNO_TEXT.items() if any(n in text for n in needles)), None)


@contextlib.contextmanager
def writing(out: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure while a command writes ``out`` (a full disk, a read-only mount, no permission)
    into one OwlError line naming the path and the cause, whichever library hit it."""
    out = Path(out).expanduser()
    try:
        yield
    except OwlError:
        raise
    except Exception as exc:
        code = _errno_of(exc)
        if code is None:
            raise
        name = getattr(exc, "filename", None)
        inside = name is not None and Path(name).resolve().is_relative_to(out.resolve().parent)
        where = f"cannot write {out}" if name is None or inside else str(name)
        raise OwlError(f"{where}: {os.strerror(code)}") from exc
