#!/usr/bin/env python
"""Does an advantage before recovery survive it?  Paired comparison of recovered models' recover.json.

Each folder is an ``owl-deploy recover`` output (its recover.json holds the per-window NLL of the pruned and
of the merged, re-masked model on the same evaluation windows; its sparsity.json says how it was pruned).
Every folder is compared with the first, window by window, before and after recovery:

    .venv/bin/python benchmarks/recovery_compare.py --out-stem recovery-allocation-smollm2-135m-60 \\
        uniform=out/frontier/smollm2-135m/models/recovered-60 owl=out/recovery/smollm2-owl-60

Writes benchmarks/results/<stem>.{json,md}; the verdict needs 2 standard errors of the paired difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owl_deploy.configs import ADAPTER_METHODS  # noqa: E402
from owl_deploy.evaluate import paired_nll, verdict  # noqa: E402
from owl_deploy.io import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load(item: str) -> dict:
    """``LABEL=FOLDER`` -> its recover.json and how it was pruned; one-line exit on anything else."""
    label, sep, folder = item.partition("=")
    path = Path(folder) / "recover.json"
    if not sep or not label or not path.is_file():
        raise SystemExit(f"{item!r}: expected LABEL=FOLDER of an owl-deploy recover output (with recover.json)")
    rec = json.loads(path.read_text())
    meta_path = Path(folder) / "sparsity.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    keys = ("method", "allocation", "target_sparsity", "global_sparsity", "owl", "calibration")
    pruned = {k: meta.get(k) for k in keys}
    return {"label": label, "folder": folder, "recover": rec, "pruned_with": pruned}


def compare(runs: list[dict]) -> list[dict]:
    """Every run against the first: perplexities and the paired NLL difference, pruned and recovered."""
    base = runs[0]["recover"]
    rows = []
    for run in runs:
        rec = run["recover"]
        if len(rec["window_nll"]["pruned"]) != len(base["window_nll"]["pruned"]):
            raise SystemExit(f"{run['label']}: scored on other windows than {runs[0]['label']}; not comparable")
        row = {"label": run["label"], "folder": run["folder"], "pruned_with": run["pruned_with"],
               "settings": rec["settings"], "wall_seconds": rec["wall_seconds"]}  # fmt: skip
        for stage in ("pruned", "merged_remasked"):
            d, se = paired_nll(rec["window_nll"][stage], base["window_nll"][stage])
            row[stage] = {"perplexity": rec["perplexity"][stage], "delta_nll": d, "delta_se": se,
                          "verdict": verdict(d, se) if run is not runs[0] else "reference"}  # fmt: skip
        rows.append(row)
    return rows


def pruned_how(pw: dict) -> str:
    """'wanda, owl M=5.0 λ=0.08, 128×512' — the method, the allocation, OWL's setting and the calibration tokens,
    what is known."""
    owl = pw.get("owl") or {}
    allocation = pw.get("allocation") or "?"
    how = f"{pw.get('method') or '?'}, {allocation}"
    if allocation == "owl" and owl:
        how += f" M={owl.get('m')} λ={owl.get('lambda')}"
    calib = pw.get("calibration") or {}
    if calib.get("nsamples") and calib.get("seqlen"):
        how += f", {calib['nsamples']}×{calib['seqlen']}"
    return how


def recovered_how(settings: dict) -> str:
    """'lora r64 α128, lr 0.0002, 120 steps of 4×256' from recover.json's settings; '?' for what it does not
    record (the windows per step and their length are named when recorded: runs differ in them)."""
    method = settings.get("method", "?")
    lora = method in ADAPTER_METHODS and "rank" in settings
    adapter = f" r{settings['rank']} α{settings['alpha']:g}" if lora else ""
    shape = f" of {settings['batch_size']}×{settings['seqlen']}" if {"batch_size", "seqlen"} <= settings.keys() else ""
    mix = f", {settings['mix']} mix" if settings.get("mix", "length") != "length" else ""
    norms = " + norms and biases" if settings.get("norms") else ""
    return f"{method}{adapter}{norms}, lr {settings.get('lr', '?')}, {settings.get('steps', '?')} steps{shape}{mix}"


def markdown(res: dict) -> str:
    ref = res["rows"][0]["label"]
    lines = [
        f"# Before and after recovery, against {ref}", "",
        f"Perplexity on `{res['text']}` ({res['windows']} windows of the evaluation text); Δ = mean per-window NLL "
        f"minus {ref}'s on the same windows ± its standard error (negative: better than {ref}).", "",
        "| model | pruned with | recovered with | ppl pruned | Δ NLL pruned | ppl recovered (merged, re-masked) "
        "| Δ NLL recovered | recover wall |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in res["rows"]:
        cells = []
        for stage in ("pruned", "merged_remasked"):
            s = r[stage]
            ref_row = s["verdict"] == "reference"
            delta = "—" if ref_row else f"{s['delta_nll']:+.4f} ± {s['delta_se']:.4f} ({s['verdict']})"
            cells += [f"{s['perplexity']:.2f}", delta]
        how = f"{pruned_how(r['pruned_with'])} | {recovered_how(r['settings'])}"
        lines.append(f"| {r['label']} | {how} | " + " | ".join(cells) + f" | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=FOLDER", help="recover outputs; the first is the reference")
    p.add_argument("--out-stem", required=True, help="file stem under benchmarks/results")
    a = p.parse_args(argv)
    if len(a.runs) < 2:
        p.error("give at least two recover outputs")
    runs = [load(item) for item in a.runs]
    rows = compare(runs)
    base = runs[0]["recover"]
    res = {"rows": rows, "text": base.get("perplexity_text"), "windows": len(base["window_nll"]["pruned"]),
           "argv": sys.argv[1:]}  # fmt: skip
    md = markdown(res)
    write_report(RESULTS / a.out_stem, res, md)
    print(md)


if __name__ == "__main__":
    main()
