"""Memory of the export, measured: peak RSS and each phase's anonymous peak, against owl_deploy's estimate,
optionally under a hard memory limit (a cgroup) to show that what the estimate promises fits.

Each run is one ``owl-deploy export`` in its own process (so its peak is its own), alone on the machine:

    .venv/bin/python benchmarks/export_memory.py --model qwen2.5-coder-1.5b \\
        --run fp32 --run int8 --run fp32@9G --out benchmarks/results/memory-qwen2.5-coder-1.5b-epyc

``fp32@9G`` runs ``--max-memory 9G`` inside a cgroup whose limit is 9 GB (the kernel reclaims page cache and
kills the process if its own memory passes it): the export must finish there. ``--reuse LABEL=DIR`` records
a deployment folder exported earlier (its export.json) instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from owl_deploy import memory
from owl_deploy.bench.machine import hardware_info, versions_info
from owl_deploy.cli_options import positive_int
from owl_deploy.errors import OwlError
from owl_deploy.io import write_report
from owl_deploy.runtime import prefill_cascade
from owl_deploy.specs import resolve_model

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup/unified")


def parse_run(text: str) -> tuple[str, float | None]:
    """``fp32`` / ``int8`` with an optional ``@SIZE`` hard limit."""
    scheme, _, limit = text.partition("@")
    if scheme not in ("fp32", "int8"):
        raise OwlError(f"--run {text!r}: expected fp32 or int8, optionally @SIZE (fp32@9G)")
    return scheme, (memory.parse_limit(limit) if limit else None)


class Cgroup:
    """A memory cgroup for one child process (v1 or v2, whichever this machine lets us write)."""

    def __init__(self, limit: float):
        name = f"owl-memory-{os.getpid()}"
        if (CGROUP_V1 / "memory.limit_in_bytes").exists() and os.access(CGROUP_V1, os.W_OK):
            self.path, self.v1 = CGROUP_V1 / name, True
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit)))
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(int(limit)))  # no swap beyond it
        elif (CGROUP_V2 / "cgroup.controllers").exists() and os.access(CGROUP_V2, os.W_OK):
            self.path, self.v1 = CGROUP_V2 / name, False
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(int(limit)))
            (self.path / "memory.swap.max").write_text("0")
        else:
            raise OwlError("no writable memory cgroup (v1 or v2) on this machine: run as root, or drop @SIZE")

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *cmd]

    def peak_bytes(self) -> int | None:
        f = self.path / ("memory.max_usage_in_bytes" if self.v1 else "memory.peak")
        return int(f.read_text()) if f.exists() else None

    def oom_kills(self) -> int:
        if self.v1:
            return int((self.path / "memory.failcnt").read_text())
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return int(events.get("oom_kill", 0))

    def remove(self) -> None:
        self.path.rmdir()


def drop_page_cache() -> bool:
    """Start from a cold page cache where we may (root): pages another process read are charged to *its*
    cgroup, so a warm checkpoint would sit outside the limit of the run being measured."""
    try:
        os.sync()
        DROP_CACHES.write_text("1")
        return True
    except OSError:
        return False


def run_limited(cmd: list[str], limit: float | None) -> dict:
    """Run ``cmd`` (an owl-deploy command) from a dropped page cache, inside a cgroup of ``limit`` bytes if given,
    with ``--max-memory`` set to the same limit; what it did, its wall time and the cgroup's peak."""
    cmd = [*cmd, "--max-memory", f"{limit / 1e9:g}G" if limit else "off"]
    group = Cgroup(limit) if limit else None
    cold = drop_page_cache()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(group.wrap(cmd) if group else cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        cgroup = None if group is None else {"limit_bytes": int(limit), "peak_bytes": group.peak_bytes()}
        if group is not None:
            cgroup["limit_hits"] = group.oom_kills()
    finally:
        if group is not None:
            time.sleep(0.5)
            group.remove()
    out = {"command": " ".join(cmd), "exit_code": proc.returncode, "wall_seconds": round(wall, 1), "cgroup": cgroup}
    out["cold_page_cache"] = cold
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return out


def run_export(model: str, scheme: str, limit: float | None, folder: Path, sequence_length: int | None) -> dict:
    cmd = [str(Path(sys.executable).parent / "owl-deploy"), "export", "--model", model, "--out", str(folder)]
    cmd += ["--sequence-length", str(sequence_length)] if sequence_length else []
    cmd += ["--quantize", "int8"] if scheme == "int8" else []
    return run_limited(cmd, limit)


def estimate(shape: memory.Shape, measured: dict) -> dict:
    """The estimate for a measured run, from what it recorded (so a changed formula can be re-rendered)."""
    graphs = 1 if measured["deepsparse_one_graph_at_a_time"] else len(prefill_cascade(measured["prefill_length"]))
    est = memory.export_estimate(shape, measured["scheme"] == "int8", graphs)
    return {"estimate_gb": round(est.total / 1e9, 2), "estimate": est.describe()}


def describe(report: dict, shape: memory.Shape, scheme: str, limit: float | None) -> dict:
    """The export's measured memory beside the estimate it was checked against."""
    ds = (report.get("logits") or {}).get("engines", {}).get("deepsparse", {})
    separate = "one_graph_at_a_time" in ds
    phases = report.get("memory_mb") or {}
    anon = max((p["anon_peak_mb"] for p in phases.values() if "anon_peak_mb" in p), default=None)
    measured = {
        "scheme": scheme,
        "prefill_length": report["prefill_length"],
        "peak_rss_gb": round(report["peak_rss_mb"] * memory.MB / 1e9, 2),
        "anon_peak_gb": None if anon is None else round(anon * memory.MB / 1e9, 2),
        "fp32_weights_gb": round(shape.fp32_bytes / 1e9, 2),
        "peak_over_weights": round(report["peak_rss_mb"] * memory.MB / shape.fp32_bytes, 2),
        "deepsparse_one_graph_at_a_time": separate,
        "ok": report.get("ok"),
        "phases_mb": phases,
        "timings_s": report.get("timings_s"),
    }
    return measured | estimate(shape, measured)


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [
        f"# Export memory: {result['model']} ({hw.get('cpu_model')}, {hw.get('logical_cpus')} vCPU, "
        f"{hw.get('memory_gb')} GB)",
        "",
        f"fp32 weights {result['fp32_weights_gb']} GB. Peak RSS counts the mapped checkpoint and files the "
        "engines read (the kernel can drop those pages); the anonymous peak is what the process allocated.",
        "A hard limit is a memory cgroup around the process (page cache included, no swap); each run starts from",
        "a dropped page cache where the script may drop it (root), so the files it reads are charged to its limit.",
        "GB = 10^9 bytes;",
        "the phases' table is in MiB as export.json records them.",
        "",
        "| run | hard limit | exit | wall s | peak RSS GB | x weights | anon peak GB | estimate GB | "
        "DeepSparse graphs | cgroup peak GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for label, r in sorted(result["runs"].items()):
        m = r.get("measured") or {}
        cg = r.get("cgroup") or {}
        limit = f"{cg['limit_bytes'] / 1e9:g} GB" if cg else "—"
        peak = f"{cg['peak_bytes'] / 1e9:.2f}" if cg.get("peak_bytes") else "—"
        mode = "one at a time" if m.get("deepsparse_one_graph_at_a_time") else "together"
        lines.append(
            f"| {label} | {limit} | {r.get('exit_code', '—')} | {r.get('wall_seconds', '—')} | "
            f"{m.get('peak_rss_gb', '—')} | {m.get('peak_over_weights', '—')} | {m.get('anon_peak_gb', '—')} | "
            f"{m.get('estimate_gb', '—')} | {mode if m else '—'} | {peak} |"
        )
    lines += ["", "Anonymous peak per phase (MiB):", ""]
    names = sorted({p for r in result["runs"].values() for p in ((r.get("measured") or {}).get("phases_mb") or {})})
    lines += ["| run | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, r in sorted(result["runs"].items()):
        ph = (r.get("measured") or {}).get("phases_mb") or {}
        lines.append(f"| {label} | " + " | ".join(str(ph.get(n, {}).get("anon_peak_mb", "—")) for n in names) + " |")
    for label, r in sorted(result["runs"].items()):
        if r.get("error"):
            lines += ["", f"{label}: {r['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Asset name or Hugging Face folder.")
    ap.add_argument("--run", action="append", default=[], help="fp32 | int8, optionally @SIZE (a hard limit).")
    ap.add_argument("--reuse", action="append", default=[], metavar="LABEL=DIR", help="An earlier export's folder.")
    ap.add_argument(
        "--sequence-length", type=positive_int, default=None, help="The export's (default: its own default)."
    )
    ap.add_argument("--out", required=True, type=Path, help="Result stem (writes .json and .md).")
    ap.add_argument("--rerender", action="store_true", help="Recompute the estimates of OUT.json; run nothing.")
    args = ap.parse_args(argv)
    try:
        source = resolve_model(args.model)
        shape = memory.model_shape(source)
        if shape is None:
            raise OwlError(f"{args.model}: not a safetensors model folder")
        runs = [(text, *parse_run(text)) for text in args.run]
        reuse = [item.split("=", 1) for item in args.reuse]
        if any(len(item) != 2 for item in reuse):
            raise OwlError("--reuse expects LABEL=DIR")
    except OwlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.rerender:
        stem = args.out.with_name(f"{args.out.name}.json")
        result = json.loads(stem.read_text())
        for run in result["runs"].values():
            if run.get("measured"):
                run["measured"] |= estimate(shape, run["measured"])
        write_report(args.out, result, markdown(result))
        print(markdown(result))
        return 0
    result = {
        "model": args.model,
        "fp32_weights_gb": round(shape.fp32_bytes / 1e9, 2),
        "hardware": hardware_info(measure_bandwidth=False, deepsparse_view=False),
        "versions": versions_info(),
        "load_average_before": list(os.getloadavg()),
        "runs": {},
    }
    for label, folder in reuse:
        report = json.loads((Path(folder) / "export.json").read_text())
        scheme = "int8" if report.get("int8") else "fp32"
        result["runs"][label] = {"reused": str(folder), "measured": describe(report, shape, scheme, None)}
    for label, scheme, limit in runs:

        def run(scratch: Path, scheme=scheme, limit=limit) -> dict:
            return run_export(args.model, scheme, limit, scratch / "odir", args.sequence_length)

        def measured(scratch: Path, scheme=scheme, limit=limit) -> dict:
            report = json.loads((scratch / "odir" / "export.json").read_text())
            return {"measured": describe(report, shape, scheme, limit)}

        result["runs"][label] = run_in_scratch(f"{label}: exporting", run, measured)
    finish(args.out, result, markdown)
    return 0


def run_in_scratch(what: str, run, measured) -> dict:
    """``run(scratch)`` (a child process writing into a fresh scratch folder), then, if it exited 0,
    ``measured(scratch)`` merged into its record; the scratch folder never outlives the run."""
    print(f"{what} ...", file=sys.stderr, flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="owl-memory-"))
    try:
        record = run(scratch)
        if record["exit_code"] == 0:
            record |= measured(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    m = record.get("measured") or {}
    print(
        f"  exit {record['exit_code']}, {record['wall_seconds']} s, peak RSS {m.get('peak_rss_gb')} GB", file=sys.stderr
    )
    return record


def finish(out: Path, result: dict, render) -> None:
    """The load average after the runs, then the JSON + Markdown report (and the Markdown on stdout)."""
    result["load_average_after"] = list(os.getloadavg())
    md = render(result)
    write_report(out, result, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
