"""The machine a benchmark runs on: CPU, flags, memory bandwidth, versions, and how busy it is.

Every figure states the CPU it was measured on (the same machine kind has come with an AVX-512 VNNI
Xeon, an AVX2-only EPYC and an AVX-512 EPYC), and DeepSparse, which pins one thread per core, collapses
beside any other load: :class:`CpuMonitor` samples the CPU time of every *other* process during the
timed sessions and :func:`noise_verdict` flags a run by the thresholds of :class:`NoisePolicy`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from owl_deploy.errors import one_line
from owl_deploy.versions import cpu_info, git_commit, package_versions, python_version, vector_flags


# ---------------------------------------------------------------- hardware and versions
def measure_read_bandwidth(nbytes: int = 1 << 30, threads: int = 1, repeats: int = 4) -> float:
    """Memory read bandwidth in bytes/s: best of ``repeats`` passes of ``max`` over ``nbytes`` of float32.

    ``threads`` numpy reductions run side by side (numpy releases the GIL in them).  1 GiB is several
    times any last-level cache this code runs on.
    """
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(nbytes // 4, dtype=np.float32)  # np.ones touches every page
    chunks = np.array_split(a, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(np.max, chunks))
            best = min(best, time.perf_counter() - t0)
    size = a.nbytes
    del a, chunks
    return size / best


def hardware_info(measure_bandwidth: bool = True, deepsparse_view: bool = True) -> dict[str, Any]:
    """CPU model, vector extensions, cores, memory, and (once) the measured memory read bandwidth."""
    import psutil

    cpu = cpu_info()
    flags = cpu["flags"]
    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    info: dict[str, Any] = {
        "cpu_model": cpu["model"],
        "cpu_vendor": cpu["vendor"],
        "flags": vector_flags(flags),
        "hypervisor": "hypervisor" in flags,
        "logical_cpus": logical,
        "physical_cores": physical,
        "usable_cpus": affinity,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "machine": platform.machine(),
        "kernel": platform.release(),
    }
    if deepsparse_view:
        try:
            from deepsparse.cpu import cpu_architecture

            arch = cpu_architecture()
            info["deepsparse_isa"] = arch.isa
            info["deepsparse_vnni"] = bool(arch.vnni)
        except Exception as exc:  # the benchmark still works without DeepSparse's view
            info["deepsparse_isa"] = f"unavailable: {one_line(exc)}"
    if measure_bandwidth:
        bw1 = measure_read_bandwidth(threads=1)
        bwn = measure_read_bandwidth(threads=max(1, physical))
        info["memory_read_gb_per_s"] = {"1_thread": round(bw1 / 1e9, 2), "all_cores": round(bwn / 1e9, 2)}
    return info


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages, rounded: every record states them before and after its run."""
    return [round(x, 2) for x in os.getloadavg()]


def run_context(started: float, loadavg_before: list[float]) -> dict[str, Any]:
    """What a benchmark script's record carries beside its numbers: the wall seconds since ``started``
    (``time.perf_counter()``), the load average before and after, the hardware (no bandwidth probe) and the versions."""
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
        "hardware": hardware_info(measure_bandwidth=False),
        "versions": versions_info(),
    }


def versions_info() -> dict[str, Any]:
    """Python, owl_deploy, the engines and the libraries that shape a result, and the git commit."""
    import owl_deploy

    out: dict[str, Any] = {"python": python_version(), "owl_deploy": owl_deploy.__version__}
    out.update(package_versions(("deepsparse", "onnxruntime", "onnx", "numpy", "torch", "transformers", "psutil")))
    commit = git_commit()
    if commit:
        out["git_commit"] = commit
    return out


def engine_env() -> dict[str, str]:
    """Environment variables that change how the engines compile or run (recorded for reproducibility)."""
    keys = ("WAND_", "NM_", "OMP_", "ORT_", "DEEPSPARSE_", "OWL_ORT_")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(keys)}


# ---------------------------------------------------------------- noise
@dataclass(frozen=True)
class NoisePolicy:
    """When a run counts as noisy.  ``cores`` = CPU time per second of wall time (1.0 = one busy core)."""

    #: other processes' mean CPU use during the timed sessions
    other_cpu_mean: float = 0.20
    #: other processes' CPU use during any single round (a burst)
    other_cpu_round: float = 0.50
    #: other processes' CPU use in a 1 s sample just before the run
    other_cpu_before: float = 0.20
    #: CPU time stolen by the hypervisor during the timed sessions
    steal_mean: float = 0.10
    #: 1-minute load average before the run, per logical CPU (lags: it remembers the last minute)
    loadavg_per_cpu: float = 1.0
    #: rounds shorter than this are too short for the 10 ms kernel tick to judge on their own
    min_round_seconds: float = 0.25
    #: length of the idle sample taken before compiling
    before_sample_seconds: float = 1.0
    #: the CPU ran at two speeds: its slow session-rounds this much slower than its fast ones (see speed_phases)
    phase_ratio: float = 1.2
    #: session-rounds whose timed steps took less than this are too short (too jittery) to judge the CPU's speed
    min_phase_seconds: float = 0.1


class CpuMonitor:
    """System-wide busy/steal CPU time versus this process's own, so other processes' use is the difference."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()

    def sample(self) -> tuple[float, float, float, float]:
        """(wall, busy, steal, own) in seconds."""
        t = self._psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        own = self._me.cpu_times()
        return time.perf_counter(), busy, getattr(t, "steal", 0.0), own.user + own.system

    @staticmethod
    def usage(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> dict[str, float]:
        """Cores used between two samples: by other processes, stolen, and by this process."""
        wall = max(b[0] - a[0], 1e-9)
        own = max(b[3] - a[3], 0.0)
        other = max((b[1] - a[1]) - own, 0.0)
        return {"wall": wall, "other": other / wall, "steal": max(b[2] - a[2], 0.0) / wall, "own": own / wall}

    def process_times(self) -> dict[int, tuple[str, float]]:
        """CPU time of every other process (pid -> (name, seconds))."""
        out = {}
        me = os.getpid()
        for p in self._psutil.process_iter(["pid", "name", "cpu_times", "cmdline"]):
            try:
                if p.info["pid"] == me or p.info["cpu_times"] is None:
                    continue
                ct = p.info["cpu_times"]
                cmd = " ".join(p.info["cmdline"] or [])[:80] or p.info["name"]
                out[p.info["pid"]] = (cmd, ct.user + ct.system)
            except (self._psutil.Error, TypeError):
                continue
        return out

    @staticmethod
    def top(before: dict, after: dict, wall: float, n: int = 8) -> list[dict[str, Any]]:
        rows = []
        for pid, (name, t1) in after.items():
            if pid in before:
                cores = (t1 - before[pid][1]) / max(wall, 1e-9)
                if cores >= 0.02:
                    rows.append({"pid": pid, "command": name, "cores": round(cores, 3)})
        return sorted(rows, key=lambda r: -r["cores"])[:n]


def two_speeds(values: list[float], ratio: float = 1.2) -> dict[str, Any]:
    """``values`` split into a fast and a slow group: two means (Lloyd's iterations from the smallest and the largest
    value), cut halfway between them; one group (``slow`` = 0) unless the slow group's median exceeds ``ratio`` times
    the fast one's.  Pure: the CPU's phases in ``benchmarks/cpu_phases.py`` and in the bench's noise check."""
    vals = sorted(values)
    if not vals:
        return {"fast": 0, "slow": 0, "cut": None, "fast_median": None, "slow_median": None, "slow_over_fast": None}
    lo, hi = vals[0], vals[-1]
    cut = (lo + hi) / 2
    for _ in range(50):
        cut = (lo + hi) / 2
        fast, slow = [v for v in vals if v <= cut], [v for v in vals if v > cut]
        if not slow:
            break
        lo, hi = statistics.fmean(fast), statistics.fmean(slow)
    fast, slow = [v for v in vals if v <= cut], [v for v in vals if v > cut]
    if not slow or statistics.median(slow) <= ratio * statistics.median(fast):
        return {"fast": len(vals), "slow": 0, "cut": None, "fast_median": statistics.median(vals),
                "slow_median": None, "slow_over_fast": None}  # fmt: skip
    fm, sm = statistics.median(fast), statistics.median(slow)
    return {"fast": len(fast), "slow": len(slow), "cut": cut, "fast_median": fm, "slow_median": sm,
            "slow_over_fast": round(sm / fm, 2)}  # fmt: skip


def speed_phases(points: list[dict[str, Any]], policy: NoisePolicy) -> dict[str, Any]:
    """Did the CPU itself change speed during the rounds?  ``points`` are session-rounds: ``{"session", "relative",
    "seconds"}``, ``relative`` = that round's median step over the session's median step (1.0 = its usual speed).

    Shared VMs drift between two speeds for seconds at a time (measured on an EPYC Zen 4 VM: a 64-token call 27.9 or
    46.1 ms, every engine slowing together), which no process count can see.  One engine's quirk moves one session;
    the machine moves all of them: two speeds count only when the slow group holds rounds of two or more sessions
    (or of the only one).  Rounds shorter than ``policy.min_phase_seconds`` are left out (timer jitter)."""
    judged = [p for p in points if p["seconds"] >= policy.min_phase_seconds]
    sessions = {p["session"] for p in judged}
    sp = two_speeds([p["relative"] for p in judged], policy.phase_ratio)
    slow = sorted({p["session"] for p in judged if sp["cut"] is not None and p["relative"] > sp["cut"]})
    return {
        "judged_rounds": len(judged),
        "slow_rounds": sp["slow"],
        "slow_over_fast": sp["slow_over_fast"],
        "slow_sessions": slow,
        "two_speeds": bool(sp["slow"]) and len(slow) >= min(2, len(sessions)),
    }


def noise_verdict(obs: dict[str, Any], policy: NoisePolicy, cpus: int) -> list[str]:
    """Reasons the run is noisy (empty = quiet), from the observations ``run_benchmark`` records."""
    reasons = []
    before = obs.get("other_cpu_before")
    if before is not None and before > policy.other_cpu_before:
        reasons.append(
            f"other processes used {before:.2f} cores just before the run (limit {policy.other_cpu_before:.2f})"
            + _top_text(obs.get("top_other_before"))
        )
    la = obs.get("loadavg_before")
    if la and la[0] > policy.loadavg_per_cpu * cpus:
        reasons.append(
            f"1-minute load average {la[0]:.2f} before the run exceeds {policy.loadavg_per_cpu * cpus:.2f} "
            f"({policy.loadavg_per_cpu:g} per CPU x {cpus})"
        )
    mean = obs.get("other_cpu_mean")
    if mean is not None and mean > policy.other_cpu_mean:
        reasons.append(
            f"other processes used {mean:.2f} cores on average during the timed sessions "
            f"(limit {policy.other_cpu_mean:.2f})" + _top_text(obs.get("top_other_during"))
        )
    for i, (cores, wall) in enumerate(zip(obs.get("other_cpu_rounds", []), obs.get("round_seconds", []), strict=False)):
        if cores is not None and wall >= policy.min_round_seconds and cores > policy.other_cpu_round:
            reasons.append(
                f"round {i + 1}: other processes used {cores:.2f} cores (limit {policy.other_cpu_round:.2f})"
            )
            break
    steal = obs.get("steal_mean")
    if steal is not None and steal > policy.steal_mean:
        reasons.append(
            f"the hypervisor stole {steal:.2f} cores during the timed sessions (limit {policy.steal_mean:.2f})"
        )
    speed = obs.get("cpu_speed") or {}
    if speed.get("two_speeds"):
        reasons.append(
            f"the CPU ran at two speeds: {speed['slow_rounds']} of {speed['judged_rounds']} session-rounds were "
            f"{speed['slow_over_fast']}x slower than the rest, in {len(speed['slow_sessions'])} sessions at once "
            "(the host's phases, not a process here; benchmarks/cpu_phases.py times them): medians mix both speeds"
        )
    return reasons


def _top_text(top: list[dict[str, Any]] | None) -> str:
    if not top:
        return ""
    return "; busiest: " + ", ".join(f"{r['command'][:40]} (pid {r['pid']}) {r['cores']:.2f}" for r in top[:3])


def quiet_sample(monitor: CpuMonitor, seconds: float = 1.0) -> tuple[float, list[dict[str, Any]]]:
    """Other processes' CPU use over ``seconds`` of this process sleeping, and the busiest of them."""
    procs = monitor.process_times()
    a = monitor.sample()
    time.sleep(seconds)
    b = monitor.sample()
    use = CpuMonitor.usage(a, b)
    return use["other"], CpuMonitor.top(procs, monitor.process_times(), use["wall"])
