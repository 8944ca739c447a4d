#!/usr/bin/env python
"""OWL + Wanda sparsity sweep: DeepSparse decode speedup over dense ONNX Runtime, on this machine.

One command, end to end (prune -> export -> benchmark -> report):

    .venv/bin/python benchmarks/sweep.py            # 0/50/60/70/80/90 %, the recorded run (run it alone!)
    .venv/bin/python benchmarks/sweep.py --quick    # 0 and 70 %, small calibration, a few rounds (smoke)

    .venv/bin/python benchmarks/sweep.py --ray --prepare-only   # prune + export every point as Ray jobs

The preparation can run on Ray (``--ray``: an embedded local Ray; ``--ray-address ADDR:PORT``: a cluster whose
nodes share this checkout, the assets and ``--work``): one job per point (its prune, then its export), each
child with this process's torch threads, so every folder is the one a serial sweep makes; a failing point is
reported and the others are kept (a re-run resumes). The timing never runs there: it runs here, alone.

For every sparsity it prunes the model with ``owl-deploy prune --method wanda --allocation owl`` and
exports it with ``owl-deploy export`` (both through the CLI, in subprocesses; folders are reused when
the same command made them), then benchmarks all of them in one process with ``owl_deploy.bench``:
DeepSparse on every sparsity, ONNX Runtime on the dense model (the reference) and, as a control, on
the 70 % model — interleaved round by round, warm-up excluded, median and p10/p90, noise-checked.

It then times one decode step layer by layer (DeepSparse's ``debug_analysis`` engine at 0 % and 70 %,
ONNX Runtime's profiler on the dense model) and computes the bytes-per-token ceiling of each sparsity
(fp32 values + a 1-bit mask: ``nnz x 4 + numel / 8`` bytes per weight matrix, plus the KV cache).

Writes ``benchmarks/results/sweep-<model>.{json,md,png}`` (``-quick`` suffix with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from layer_profile import deepsparse_layer_breakdown, ort_layer_breakdown  # noqa: E402

from owl_deploy import commands  # noqa: E402
from owl_deploy.bench import EXIT_NOISY, NoisyMachine, run_benchmark  # noqa: E402
from owl_deploy.bench.measure import REFERENCE, run_key  # noqa: E402
from owl_deploy.bench.report import machine_markdown, megabytes  # noqa: E402
from owl_deploy.bench.weights import load_model_info  # noqa: E402
from owl_deploy.cli_options import positive_int  # noqa: E402
from owl_deploy.configs import BenchConfig  # noqa: E402
from owl_deploy.contract import MODEL_ONNX  # noqa: E402
from owl_deploy.errors import OwlError  # noqa: E402
from owl_deploy.io import atomic_file, write_json  # noqa: E402

SCHEMA = "owl_deploy.sweep/1"
DEFAULT_SPARSITIES = "0,50,60,70,80,90"
BREAKDOWN_AT = (0, 70)
CONTROL_AT = 70


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="asset name or Hugging Face folder [smollm2-135m]")
    p.add_argument("--sparsities", default=DEFAULT_SPARSITIES, help=f"percent, comma list [{DEFAULT_SPARSITIES}]")
    p.add_argument("--method", default="wanda", help="pruning method [wanda]")
    p.add_argument("--allocation", default="owl", help="layerwise allocation [owl]")
    p.add_argument(
        "--nsamples", type=positive_int, default=None, help="calibration windows [prune's default; quick: 8]"
    )
    p.add_argument(
        "--seqlen", type=positive_int, default=None, help="calibration window length [prune's default; quick: 128]"
    )
    p.add_argument("--prune-arg", action="append", default=[], help="extra option for `owl-deploy prune` (repeatable)")
    p.add_argument(
        "--export-arg", action="append", default=[], help="extra option for `owl-deploy export` (repeatable)"
    )
    p.add_argument("--work", type=Path, default=ROOT / "out" / "sweep", help="pruned and exported models [out/sweep]")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="report folder")
    p.add_argument("--context", type=positive_int, default=None, help="cached tokens [128; quick: 32]")
    p.add_argument("--steps", type=positive_int, default=None, help="decode steps per round [32; quick: 8]")
    p.add_argument("--rounds", type=positive_int, default=None, help="timed rounds [5; quick: 2]")
    p.add_argument("--threads", type=positive_int, default=None, help="cores per engine [all]")
    p.add_argument("--kv-cache", choices=["internal", "external"], default=None, help="DeepSparse KV cache [internal]")
    p.add_argument(
        "--breakdown-iterations", type=positive_int, default=None, help="per-layer timing iterations [50; quick: 5]"
    )
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-layer time breakdown")
    p.add_argument("--strict", action="store_true", help="exit 4 without writing when the machine is noisy")
    p.add_argument("--prepare-only", action="store_true", help="prune and export every point, time nothing")
    p.add_argument("--ray", action="store_true", help="prepare the points as jobs on an embedded local Ray")
    p.add_argument("--ray-address", default=None, help="prepare them on a Ray cluster (ADDR:PORT; shared --work)")
    p.add_argument("--ray-workers", type=positive_int, default=None, help="Ray workers [the cluster's CPUs]")
    p.add_argument("--quick", action="store_true", help="0 and 70 %%, small calibration, short timing (smoke)")
    a = p.parse_args(argv)
    q = a.quick
    if q and a.sparsities == DEFAULT_SPARSITIES:
        a.sparsities = "0,70"
    a.nsamples = a.nsamples or (8 if q else None)
    a.seqlen = a.seqlen or (128 if q else None)
    a.context = a.context or (32 if q else 128)
    a.steps = a.steps or (8 if q else 32)
    a.rounds = a.rounds or (2 if q else 5)
    a.breakdown_iterations = a.breakdown_iterations or (5 if q else 50)
    try:
        a.sparsity_list = sorted({int(s) for s in a.sparsities.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sparsities must be integers (percent), got {a.sparsities!r}")
    if not a.sparsity_list or a.sparsity_list[0] != 0 or a.sparsity_list[-1] >= 100:
        p.error("--sparsities must include 0 (the dense model) and stay below 100")
    return a


def log(msg: str) -> None:
    commands.log(msg, "sweep")


def owl(args: list[str], capture: bool = False) -> dict:
    """Run one ``owl-deploy`` command from this checkout (wall time, the child's peak RSS, stdout when
    ``capture``); stop the sweep on failure."""
    try:
        return commands.run(args, cwd=ROOT, capture=capture)
    except OwlError as exc:
        sys.exit(f"sweep: {exc}")


def run_once(folder: Path, marker: str, args: list[str]) -> dict | None:
    """``owl_deploy.commands.run_once`` from this checkout; stop the sweep on failure."""
    try:
        return commands.run_once(folder, marker, args, cwd=ROOT)
    except OwlError as exc:
        sys.exit(f"sweep: {exc}")


def base_model(spec: str) -> str:
    """An asset name becomes its prepared folder (fetched on first use); anything else is used as is."""
    if Path(spec).exists():
        return str(Path(spec).resolve())
    from owl_deploy import assets

    return str(assets.ensure(spec))


def steps(a: argparse.Namespace, sparsity: int, model_dir: str) -> list[commands.Step]:
    """The commands that make one point: prune (unless 0 %) then export; (folder, marker, arguments) each."""
    out: list[commands.Step] = []
    src = model_dir
    if sparsity:
        pdir = a.work / f"prune-{a.method}-{a.allocation}-s{sparsity}"
        pargs = ["prune", "--model", model_dir, "--method", a.method, "--allocation", a.allocation]
        pargs += ["--sparsity", f"{sparsity / 100:.2f}"]
        if a.nsamples:
            pargs += ["--nsamples", str(a.nsamples)]
        if a.seqlen:
            pargs += ["--seqlen", str(a.seqlen)]
        pargs += [*a.prune_arg, "--out", str(pdir)]
        out.append((str(pdir), "sparsity.json", pargs))
        src = str(pdir)
    odir = a.work / (f"onnx-{a.method}-{a.allocation}-s{sparsity}" if sparsity else "onnx-dense")
    out.append((str(odir), MODEL_ONNX, ["export", "--model", src, *a.export_arg, "--out", str(odir)]))
    return out


def prepared(point: list[commands.Step]) -> tuple[Path, dict | None]:
    """(export folder, the pruner's sparsity.json) of a point whose steps have run."""
    report = None
    for folder, marker, _ in point:
        if marker == "sparsity.json":
            report = json.loads((Path(folder) / marker).read_text())
    return Path(point[-1][0]), report


def prepare(a: argparse.Namespace, sparsity: int, model_dir: str) -> tuple[Path, dict | None]:
    """Prune (unless 0 %) and export one point here; returns (export folder, the pruner's sparsity.json)."""
    a.work.mkdir(parents=True, exist_ok=True)
    point = steps(a, sparsity, model_dir)
    for folder, marker, args in point:
        run_once(Path(folder), marker, args)
    return prepared(point)


def prepare_on_ray(a: argparse.Namespace, model_dir: str) -> dict[int, str]:
    """Every point's prune and export as one Ray job each (a local Ray, or the cluster at ``--ray-address``);
    the errors of the points that failed (the others are made and stamped, so a re-run resumes)."""
    import torch

    from owl_deploy.cluster import Job, run_jobs

    a.work.mkdir(parents=True, exist_ok=True)
    # each child prunes with this process's torch threads (a Ray worker has 1): the same bits as a serial sweep
    threads = torch.get_num_threads()
    jobs = [
        Job(label(s), commands.Workdir(str(ROOT)), commands.run_steps, (steps(a, s, model_dir), threads))
        for s in a.sparsity_list
    ]
    failed: dict[int, str] = {}

    def keep(job: Job, _result: object, error: str | None) -> None:
        s = next(s for s in a.sparsity_list if label(s) == job.key)
        log(f"{job.key}: {'failed: ' + error if error else 'prepared'}")
        if error:
            failed[s] = error

    counts = run_jobs(jobs, keep, a.ray_address, threads=1, actors=a.ray_workers)
    log(f"Ray ({a.ray_address or 'local'}): {counts['done']} points prepared, {counts['failed']} failed, "
        f"{counts['actors']} workers")  # fmt: skip
    return failed


def label(sparsity: int) -> str:
    return "dense" if sparsity == 0 else f"s{sparsity}"


def summarize_sweep(res: dict, sparsities: list[int], prune_reports: dict[int, dict | None]) -> dict:
    """The paper's table on this machine: one row per sparsity, from the benchmark results."""
    runs, models = res["runs"], res["models"]
    ref = runs[run_key(*REFERENCE)]
    ref_bytes = models["dense"]["bytes_per_token"]["dense"]
    ds0 = runs[run_key("deepsparse", "dense")]["decode_tokens_per_s"]["median"]
    bw = (res["hardware"].get("memory_read_gb_per_s") or {}).get("all_cores")
    points = []
    for s in sparsities:
        key = run_key("deepsparse", label(s))
        r, m = runs[key], models[label(s)]
        bpt = m["bytes_per_token"]["bitmask"]
        rep = prune_reports.get(s) or {}
        points.append(
            {
                "target_sparsity": s / 100,
                "pruned_global_sparsity": rep.get("global_sparsity"),
                "onnx_sparsity_excluding_lm_head": m["weights"].get("sparsity_excluding_lm_head"),
                "onnx_sparsity_all_matmuls": m["weights"].get("sparsity"),
                "deepsparse_decode_tokens_per_s": r["decode_tokens_per_s"],
                "speedup_vs_dense_ort": r["speedup_vs_dense_ort"],
                "speedup_vs_dense_ort_by_round": r["speedup_by_round"],
                "speedup_vs_dense_deepsparse": round(r["decode_tokens_per_s"]["median"] / ds0, 4) if ds0 else None,
                "bytes_per_token_bitmask": bpt,
                "ceiling_tokens_per_s": round(bw * 1e9 / bpt, 2) if bw else None,
                "ceiling_speedup_vs_dense_ort": round(ref_bytes / bpt, 3),
                "fraction_of_ceiling": r["fraction_of_ceiling"],
            }
        )
    return {
        "reference": {
            "run": run_key(*REFERENCE),
            "decode_tokens_per_s": ref["decode_tokens_per_s"],
            "bytes_per_token": ref_bytes,
            "ceiling_tokens_per_s": ref["ceiling_tokens_per_s"],
        },
        "points": points,
        "controls": {
            k: {"decode_tokens_per_s": v["decode_tokens_per_s"], "speedup_vs_dense_ort": v["speedup_vs_dense_ort"]}
            for k, v in runs.items()
            if v["engine"] == "onnxruntime" and k != run_key(*REFERENCE)
        },
    }


def render_md(out: dict) -> str:
    res, pts = out["bench"], out["points"]
    noise, st = res["noise"], res["settings"]
    lines = [f"# Sparsity sweep: {out['model']} ({out['method']} + {out['allocation']})", ""]
    if noise["noisy"]:
        lines += ["> **NOISY RUN** — not trustworthy:", ">"] + [f"> - {r}" for r in noise["reasons"]] + [""]
    lines += [
        f"Decode speedup of DeepSparse on the pruned model over ONNX Runtime on the dense model "
        f"({out['reference']['decode_tokens_per_s']['median']:.2f} tok/s), batch 1, cache filled to "
        f"{st['context']} of {st['sequence_length']} tokens, {st['steps']} steps x {st['rounds']} rounds, "
        "interleaved; median (p10–p90 of the per-round ratio).",
        "",
        "| sparsity | " + " | ".join(f"{p['target_sparsity']:.0%}" for p in pts) + " |",
        "|---|" + "---|" * len(pts),
        "| speedup vs dense ORT | " + " | ".join(f"**{p['speedup_vs_dense_ort']:.2f}x**" for p in pts) + " |",
        "| speedup vs dense DeepSparse | " + " | ".join(f"{p['speedup_vs_dense_deepsparse']:.2f}x" for p in pts) + " |",
        "| bytes/token ceiling vs dense ORT | "
        + " | ".join(f"{p['ceiling_speedup_vs_dense_ort']:.2f}x" for p in pts)
        + " |",
        "",
        "| target | ONNX sparsity (blocks) | DeepSparse tok/s | vs dense ORT (p10–p90) | bytes/token | "
        "ceiling tok/s | of ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pts:
        d, sp = p["deepsparse_decode_tokens_per_s"], p["speedup_vs_dense_ort_by_round"]
        osp = p["onnx_sparsity_excluding_lm_head"]
        ceil = f"{p['ceiling_tokens_per_s']:.0f}" if p["ceiling_tokens_per_s"] else "-"
        frac = f"{p['fraction_of_ceiling']:.0%}" if p["fraction_of_ceiling"] else "-"
        lines.append(
            f"| {p['target_sparsity']:.0%} | {osp:.1%} | {d['median']:.2f} ({d['p10']:.2f}–{d['p90']:.2f}) | "
            f"{p['speedup_vs_dense_ort']:.2f}x ({sp['p10']:.2f}–{sp['p90']:.2f}) | "
            f"{megabytes(p['bytes_per_token_bitmask'])} | {ceil} | {frac} |"
        )
    for k, v in out["controls"].items():
        lines += [
            "",
            f"Control {k}: {v['decode_tokens_per_s']['median']:.2f} tok/s = "
            f"{v['speedup_vs_dense_ort']:.2f}x dense ORT (ONNX Runtime has no sparse kernels: expect ~1.00x; "
            "far from it means noise).",
        ]
    bd = out.get("layer_breakdown") or {}
    if bd:
        roles = sorted(
            {r for b in bd.values() for r in b["by_role_ms"]},
            key=lambda r: -max(b["by_role_ms"].get(r, 0) for b in bd.values()),
        )
        lines += ["", "## One decode step, layer by layer (ms)", "", "| | " + " | ".join(bd) + " |"]
        lines += ["|---|" + "---|" * len(bd)]
        for r in roles:
            lines.append(f"| {r} | " + " | ".join(f"{b['by_role_ms'].get(r, 0.0):.2f}" for b in bd.values()) + " |")
        lines.append("| **sum** | " + " | ".join(f"**{b['summed_layer_ms']:.2f}**" for b in bd.values()) + " |")
        for k, b in bd.items():
            top = ", ".join(f"{n} {ms:.2f}" for n, ms in list(b["by_kernel_ms"].items())[:6])
            lines.append(f"\n- {k} by kernel: {top}")
            if b.get("detected_kernel_sparsity_by_role"):
                det = ", ".join(f"{r} {v:.0%}" for r, v in b["detected_kernel_sparsity_by_role"].items())
                lines.append(f"  - kernel sparsity DeepSparse detected: {det}")
    lines += [
        *machine_markdown(res),
        f"- command: `{out['command']}`",
        "",
    ]
    return "\n".join(lines)


def render_png(out: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pts = out["points"]
    xs = [100 * p["target_sparsity"] for p in pts]
    bd = out.get("layer_breakdown") or {}
    fig, axes = plt.subplots(1, 2 if bd else 1, figsize=(12 if bd else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    med = [p["speedup_vs_dense_ort"] for p in pts]
    lo = [p["speedup_vs_dense_ort_by_round"]["p10"] for p in pts]
    hi = [p["speedup_vs_dense_ort_by_round"]["p90"] for p in pts]
    ax.fill_between(xs, lo, hi, color="#d62728", alpha=0.2, label="p10–p90 of per-round ratio")
    ax.plot(xs, med, "o-", color="#d62728", label="DeepSparse vs dense ORT")
    ax.plot(
        xs,
        [p["speedup_vs_dense_deepsparse"] for p in pts],
        "s--",
        color="#ff7f0e",
        ms=4,
        label="DeepSparse vs dense DeepSparse",
    )
    ax.plot(xs, [p["ceiling_speedup_vs_dense_ort"] for p in pts], "k:", label="bytes/token ceiling vs dense ORT")
    ax.axhline(1.0, color="#1f77b4", lw=1, label="dense ONNX Runtime")
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel("decode speedup")
    ax.set_title(f"{out['model']}: {out['method']} + {out['allocation']}, batch 1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if bd:
        ax2 = axes[0][1]
        roles = sorted({r for b in bd.values() for r in b["by_role_ms"]})
        bottom = np.zeros(len(bd))
        cmap = plt.get_cmap("tab20")
        for i, r in enumerate(roles):
            vals = np.array([b["by_role_ms"].get(r, 0.0) for b in bd.values()])
            ax2.bar(range(len(bd)), vals, bottom=bottom, label=r, color=cmap(i % 20))
            bottom += vals
        ax2.set_xticks(range(len(bd)), [k.replace("/", "\n") for k in bd], fontsize=8)
        ax2.set_ylabel("ms per decode step (summed layer times)")
        ax2.set_title("where a decode step goes")
        ax2.legend(fontsize=7, ncol=2)
    hw = out["bench"]["hardware"]
    title = f"{hw['cpu_model']}, {hw['physical_cores']} cores"
    noisy = out["bench"]["noise"]["noisy"]
    fig.suptitle(("NOISY RUN — " if noisy else "") + title, fontsize=10, color="red" if noisy else "black")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    model_dir = base_model(a.model)
    models, reports = {}, {}
    if a.ray or a.ray_address:
        failed = prepare_on_ray(a, model_dir)
        if failed:
            for s, error in sorted(failed.items()):
                print(f"error: {label(s)}: {error}", file=sys.stderr)
            print(f"sweep: {len(failed)} of {len(a.sparsity_list)} points failed; the others are kept (re-run to "
                  "resume)", file=sys.stderr)  # fmt: skip
            return 1
        for s in a.sparsity_list:
            models[label(s)], reports[s] = prepared(steps(a, s, model_dir))
    else:
        for s in a.sparsity_list:
            models[label(s)], reports[s] = prepare(a, s, model_dir)
    if a.prepare_only:
        log(f"prepared {len(models)} points under {a.work} (--prepare-only: nothing timed)")
        return 0
    runs = [REFERENCE] + [("deepsparse", label(s)) for s in a.sparsity_list]
    if CONTROL_AT in a.sparsity_list:
        runs.append(("onnxruntime", label(CONTROL_AT)))
    headline = ("deepsparse", label(CONTROL_AT)) if CONTROL_AT in a.sparsity_list else None
    cfg = BenchConfig(
        context=a.context, steps=a.steps, rounds=a.rounds, warmup_rounds=1, threads=a.threads, kv_cache=a.kv_cache
    )
    try:
        res = run_benchmark(models, runs, cfg, headline=headline, strict=a.strict)
    except NoisyMachine as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOISY
    except OwlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if a.strict and res["noise"]["noisy"]:
        print("error: machine was noisy (--strict): " + "; ".join(res["noise"]["reasons"]), file=sys.stderr)
        return EXIT_NOISY
    breakdown = {}
    if not a.no_breakdown:
        for s in BREAKDOWN_AT:
            if s in a.sparsity_list:
                log(f"per-layer time, DeepSparse at {s}%...")
                info = load_model_info(models[label(s)], label(s), with_weights=False)
                breakdown[f"deepsparse/{label(s)}"] = deepsparse_layer_breakdown(
                    info, a.context, a.threads, iterations=a.breakdown_iterations, warmup=5
                )
        log("per-layer time, ONNX Runtime on the dense model...")
        info = load_model_info(models["dense"], "dense", with_weights=False)
        breakdown["onnxruntime/dense"] = ort_layer_breakdown(
            info, a.context, a.threads, iterations=a.breakdown_iterations
        )
    name = Path(a.model).name if Path(a.model).exists() else a.model
    out = {
        "schema": SCHEMA,
        "model": name,
        "method": a.method,
        "allocation": a.allocation,
        "quick": a.quick,
        "command": " ".join(shlex.quote(x) for x in [Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "sparsities": [s / 100 for s in a.sparsity_list],
        **summarize_sweep(res, a.sparsity_list, reports),
        "layer_breakdown": breakdown,
        "bench": res,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    a.results.mkdir(parents=True, exist_ok=True)
    stem = a.results / f"sweep-{name}{'-quick' if a.quick else ''}"
    write_json(stem.parent / f"{stem.name}.json", out)
    with atomic_file(stem.parent / f"{stem.name}.md") as fh:
        fh.write(render_md(out))
    with atomic_file(stem.parent / f"{stem.name}.png", "wb") as fh:
        render_png(out, fh)
    for p in out["points"]:
        log(
            f"{p['target_sparsity']:4.0%}: {p['deepsparse_decode_tokens_per_s']['median']:7.2f} tok/s, "
            f"{p['speedup_vs_dense_ort']:.2f}x dense ORT (ceiling {p['ceiling_speedup_vs_dense_ort']:.2f}x)"
        )
    if res["noise"]["noisy"]:
        log("warning: NOISY RUN: " + "; ".join(res["noise"]["reasons"]))
    log(f"wrote {stem}.json/.md/.png in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
