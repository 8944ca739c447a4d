"""``owl-deploy`` commands run as subprocesses, once per output folder: the preparation steps of the benchmark
scripts (prune, export), serially or as Ray jobs (:func:`run_steps`, issue 18).

A folder made by a command is stamped with the command's arguments (``<folder>.args.json``) and its wall time and
peak RSS (``<folder>.stats.json``); the same command on the same folder is then skipped, so a study killed
halfway resumes where it stopped, and Ray workers and the driver agree on what is done (on a cluster, the work
folder must be on a filesystem every node sees).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from owl_deploy.errors import OwlError
from owl_deploy.io import write_json

#: a preparation step: (output folder, the file that marks it complete, the owl-deploy arguments)
Step = tuple[str, str, list[str]]


def log(msg: str, who: str = "owl-deploy") -> None:
    """One timestamped progress line on stderr, tagged with the script (``who``) that writes it."""
    print(f"[{who} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: list[str], cwd: str | Path | None = None, threads: int | None = None, capture: bool = False) -> dict:
    """Run ``owl-deploy args`` in a child process; its wall time and its own peak RSS (``wait4``), plus stdout
    when ``capture``. ``threads`` sets the child's torch threads (``OMP_NUM_THREADS``): a Ray worker runs with
    Ray's 1, and float reductions must happen in the serial run's order for the same bits."""
    cmd = [sys.executable, "-m", "owl_deploy", *args]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)} if threads else None
    log("$ owl-deploy " + " ".join(shlex.quote(x) for x in args))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE if capture else None, text=True)
    out = proc.stdout.read() if capture and proc.stdout else None
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OwlError(f"`owl-deploy {args[0]}` failed with exit status {code}")
    stats = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    log(f"  done in {stats['seconds']:.0f} s, peak RSS {stats['peak_rss_mb']} MB")
    return stats | ({"stdout": out} if capture else {})


def _stamp_file(folder: Path, kind: str) -> Path:
    return folder.parent / f"{folder.name}.{kind}.json"


def stamped(folder: Path, marker: str, args: list[str]) -> bool:
    """True when ``folder`` holds ``marker`` and was made by exactly ``args`` (so it can be reused)."""
    stamp = _stamp_file(folder, "args")
    return (folder / marker).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == args


def run_once(
    folder: Path, marker: str, args: list[str], cwd: str | Path | None = None, threads: int | None = None
) -> dict | None:
    """Run ``owl-deploy args`` unless ``folder`` was made by exactly ``args``; the run's stats (wall time, peak
    RSS), or the recorded ones when the folder is reused (None if never recorded)."""
    folder = Path(folder)
    stats_file = _stamp_file(folder, "stats")
    if stamped(folder, marker, args):
        log(f"reusing {folder}")
        return json.loads(stats_file.read_text()) if stats_file.is_file() else None
    stats = run(args, cwd=cwd, threads=threads)
    write_json(_stamp_file(folder, "args"), args)
    write_json(stats_file, stats)
    return stats


@dataclass(frozen=True)
class Workdir:
    """The study of a preparation job (``owl_deploy.cluster.Job.spec``): only where its commands run."""

    path: str

    def build(self, built: dict | None = None) -> Workdir:
        return self


def run_steps(workdir: Workdir, steps: list[Step], threads: int | None = None) -> list[dict | None]:
    """A Ray job (or a serial call): the steps in order, each skipped when already made; their stats.
    The first failing step raises, so the ones after it (which need its output) do not run."""
    return [run_once(Path(folder), marker, args, cwd=workdir.path, threads=threads) for folder, marker, args in steps]
