"""What a result ran with: the packages that shape it, the git commit and the CPU (recorded in every report)."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


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


def cpu_info() -> dict[str, Any]:
    """/proc/cpuinfo's model name, vendor and flags (the first CPU's)."""
    out: dict[str, Any] = {"model": platform.processor() or platform.machine(), "vendor": None, "flags": set()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                out["model"] = value
            elif key == "vendor_id":
                out["vendor"] = value
            elif key == "flags" and not out["flags"]:
                out["flags"] = set(value.split())
    return out


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def vector_flags(flags: set[str]) -> dict[str, bool]:
    """The vector extensions that decide a kernel's speed, as booleans (results compare them by name)."""
    return {name: name in flags for name in VECTOR_FLAGS}


def isa_label(flags: dict[str, bool]) -> str:
    """The widest matrix ISA in ``vector_flags()``: the same "Intel(R) Xeon(R) Processor" name has come
    with and without AMX, and bf16 compute and DeepSparse's speed-ups depend on which."""
    for key, label in (("amx_int8", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flags.get(key):
            return label
    return ""


def cpu_record(threads: int) -> dict[str, Any]:
    """What a stage's own report (sparsity.json, recover.json) records of the CPU its timings come from."""
    cpu = cpu_info()
    flags = vector_flags(cpu["flags"])
    return {"cpu_model": cpu["model"], "isa": isa_label(flags), "flags": flags, "threads": threads}
