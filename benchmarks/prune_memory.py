"""Memory of the prune stage, measured: peak RSS and wall time against owl_deploy's estimate, optionally under a
hard memory limit (a cgroup) to show the block-by-block prune fits it.

Each run is one ``owl-deploy prune`` in its own process (so its peak is its own), alone on the machine, from a
dropped page cache; the prune options after ``--`` are the same for every run:

    .venv/bin/python benchmarks/prune_memory.py --model qwen2.5-coder-1.5b --run stream --run stream@3G \\
        --out benchmarks/results/prune-memory-qwen2.5-coder-1.5b-epyc -- --sparsity 0.7

``LABEL@SIZE`` runs ``--max-memory SIZE`` inside a cgroup whose limit is SIZE (page cache included, no swap).
Every run's weights are hashed: runs of the same options must write the same model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from export_memory import finish, run_in_scratch, run_limited

from owl_deploy import memory
from owl_deploy.bench.machine import hardware_info, versions_info
from owl_deploy.errors import OwlError
from owl_deploy.specs import resolve_model


def parse_run(text: str) -> tuple[str, float | None]:
    label, _, limit = text.partition("@")
    if not label:
        raise OwlError(f"--run {text!r}: expected LABEL or LABEL@SIZE (stream@3G)")
    return label, (memory.parse_limit(limit) if limit else None)


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def run_prune(model: str, limit: float | None, folder: Path, prune_args: list[str]) -> dict:
    cmd = [str(Path(sys.executable).parent / "owl-deploy"), "prune", "--model", model, "--out", str(folder)]
    return run_limited([*cmd, *prune_args], limit)


def describe(report: dict, shape: memory.Shape) -> dict:
    """What the prune recorded, beside the estimate its guard checked (recomputed from its own settings)."""
    cal, cfg = report["calibration"], report["config"]["prune"]
    windows = cal["nsamples"] if cal["used"] else 0
    streamed = report.get("loading") == "block by block"
    est = memory.prune_estimate(
        shape, windows, cal["seqlen"], cfg["batch_size"], cfg["method"] == "sparsegpt", streamed=streamed
    )
    return {
        "loading": report.get("loading"),
        "method": report["method"],
        "allocation": report["allocation"],
        "global_sparsity": round(report["global_sparsity"], 4),
        "calibration": f"{windows}x{cal['seqlen']}",
        "peak_rss_gb": round(report["peak_rss_mb"] * memory.MB / 1e9, 2),
        "fp32_weights_gb": round(shape.fp32_bytes / 1e9, 2),
        "peak_over_weights": round(report["peak_rss_mb"] * memory.MB / shape.fp32_bytes, 2),
        "estimate_gb": round(est.total / 1e9, 2),
        "estimate": est.describe(),
        "timings_s": {k: round(v, 1) for k, v in report["timings"].items()},
    }


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [
        f"# Prune memory: {result['model']} ({hw.get('cpu_model')}, {hw.get('logical_cpus')} vCPU, "
        f"{hw.get('memory_gb')} GB)",
        "",
        f"Prune options: `{' '.join(result['prune_args'])}`. fp32 weights {result['fp32_weights_gb']} GB; GB = 10^9 "
        "bytes. Peak RSS is the process's high-water mark (ru_maxrss, file pages it mapped included); a hard limit "
        "is a memory cgroup around the process (page cache included, no swap), from a dropped page cache.",
        "",
        "| run | loading | hard limit | exit | wall s | peak RSS GB | x weights | estimate GB | cgroup peak GB | "
        "sparsity | weights digest |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, r in result["runs"].items():
        m = r.get("measured") or {}
        cg = r.get("cgroup") or {}
        limit = f"{cg['limit_bytes'] / 1e9:g} GB" if cg else "—"
        peak = f"{cg['peak_bytes'] / 1e9:.2f}" if cg.get("peak_bytes") else "—"
        lines.append(
            f"| {label} | {m.get('loading', '—')} | {limit} | {r.get('exit_code', '—')} | "
            f"{r.get('wall_seconds', '—')} | "
            f"{m.get('peak_rss_gb', '—')} | {m.get('peak_over_weights', '—')} | {m.get('estimate_gb', '—')} | {peak} | "
            f"{m.get('global_sparsity', '—')} | `{r.get('weights_digest', '—')}` |"
        )
    lines += ["", "Seconds per phase:", ""]
    names = sorted({k for r in result["runs"].values() for k in ((r.get("measured") or {}).get("timings_s") or {})})
    lines += ["| run | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, r in result["runs"].items():
        t = (r.get("measured") or {}).get("timings_s") or {}
        lines.append(f"| {label} | " + " | ".join(str(t.get(n, "—")) for n in names) + " |")
    for label, r in result["runs"].items():
        if r.get("error"):
            lines += ["", f"{label}: {r['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prune_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Asset name or Hugging Face folder.")
    ap.add_argument("--run", action="append", required=True, help="LABEL, optionally @SIZE (a hard limit).")
    ap.add_argument("--out", required=True, type=Path, help="Result stem (writes .json and .md).")
    args = ap.parse_args(argv)
    try:
        shape = memory.model_shape(resolve_model(args.model))
        if shape is None:
            raise OwlError(f"{args.model}: not a safetensors model folder")
        runs = [(text, *parse_run(text)) for text in args.run]
        if "--out" in prune_args or "--max-memory" in prune_args or "--model" in prune_args:
            raise OwlError("the prune options after -- must not set --model, --out or --max-memory (the script does)")
    except OwlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = {
        "model": args.model,
        "prune_args": prune_args,
        "fp32_weights_gb": round(shape.fp32_bytes / 1e9, 2),
        "hardware": hardware_info(measure_bandwidth=False, deepsparse_view=False),
        "versions": versions_info(),
        "load_average_before": list(os.getloadavg()),
        "runs": {},
    }
    for text, _label, limit in runs:

        def measured(scratch: Path) -> dict:
            report = json.loads((scratch / "pruned" / "sparsity.json").read_text())
            return {"measured": describe(report, shape), "weights_digest": weights_digest(scratch / "pruned")}

        def run(scratch: Path, limit=limit) -> dict:
            return run_prune(args.model, limit, scratch / "pruned", prune_args)

        result["runs"][text] = run_in_scratch(f"{text}: pruning", run, measured)
    finish(args.out, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
