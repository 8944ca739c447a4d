"""Versions of the packages that shape a result (recorded in every report) and the git commit."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """``{distribution: version}``, None for one that is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from (``-dirty`` with uncommitted changes), or None."""
    repo = Path(__file__).resolve().parent.parent
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    return None


def python_version() -> str:
    return platform.python_version()
