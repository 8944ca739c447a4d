"""The paper's quality table on a real model: does OWL beat uniform allocation here?

Dense; magnitude, Wanda and SparseGPT with uniform and OWL allocation (and OWL-inverse for Wanda) at
50-80% unstructured; Wanda ± OWL at 2:4 and 4:8; then (M, λ) tuned on held-out *calibration* text and
the tuned OWL re-scored on the evaluation text. Evaluation on ``wiki``, calibration on the default
mix — never the evaluation text. Writes ``benchmarks/results/quality-<model>.{json,md}`` and PNGs.

    .venv/bin/python benchmarks/quality.py --nsamples 32 --eval-tokens 8192   # the recorded SmolLM2-135M run
    .venv/bin/python benchmarks/quality.py --quick         # a 2-minute smoke run
    .venv/bin/python benchmarks/quality.py --model qwen2.5-coder-1.5b --methods wanda,sparsegpt \
        --only sparsegpt=0.7 --allocations uniform,owl --sparsities 0.5,0.6,0.7 --nm '' --nsamples 8 \
        --calib-seqlen 256 --eval-tokens 4096 --tune-ms 3,5 --tune-lambdas 0.08,0.15 --tune-tokens 1024 \
        --tuned-sparsities 0.7 --tuned-methods wanda
                                                           # the recorded Qwen2.5-Coder-1.5B run

Every configuration is a job on Ray (owl_deploy.cluster): an embedded local Ray by default, ``--ray-address
HOST:PORT`` for a cluster (every node needs this checkout's environment and the model's assets), ``--serial``
for none. Each worker loads the model once and runs jobs with this process's torch thread count, so the table
is the serial one (tests/test_cluster.py); each worker holds its own copy of the model, and the dense weights it
restores before every prune are mapped from the checkpoint (page cache the workers of one machine share).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from quality_report import label, markdown, plots
from tqdm import tqdm

from owl_deploy.bench.machine import hardware_info
from owl_deploy.calibrate import resolve_dtype
from owl_deploy.cli_options import positive_int
from owl_deploy.configs import (
    ALLOCATIONS,
    COMPUTE_DTYPES,
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    METHODS,
    OwlConfig,
    PruneConfig,
    TuneConfig,
    build,
    replace,
)
from owl_deploy.data import calibration_windows, eval_tokens, heldout_tokens
from owl_deploy.evaluate import Perplexity, paired_nll, verdict
from owl_deploy.io import atomic_file, write_report
from owl_deploy.memory import peak_rss_mb
from owl_deploy.specs import load_model, load_tokenizer, resolve_model
from owl_deploy.study import Checkpoint, Study, StudySpec, run_config, score_dense, tune_grid
from owl_deploy.study import tune as tune_job
from owl_deploy.tune import chosen, tune_owl

RESULTS = Path(__file__).parent / "results"
Config = tuple[PruneConfig, OwlConfig]
CHECKPOINT_KEYS = ("model", "eval_text", "calib", "eval_tokens", "seqlen", "nsamples", "calib_seqlen", "seed")


def prune_cfg(args, **fields) -> PruneConfig:
    """A study row's prune settings, in the study's compute dtype (resolved: a row's key names the dtype it ran)."""
    return build(PruneConfig, {**fields, "compute_dtype": args.compute_dtype})


def configs(args) -> list[Config]:
    owl = OwlConfig()
    out = []
    for s in args.sparsities:
        for method in args.methods:
            if s not in args.only.get(method, [s]):
                continue
            # OWL-inverse is the paper's ablation; it is run for Wanda only
            allocations = [a for a in args.allocations if a != "owl-inverse" or method == "wanda"]
            out += [(prune_cfg(args, method=method, allocation=a, sparsity=s), owl) for a in allocations]
    for n, m in args.nm:
        for a in ("uniform", "owl"):
            # the reference's N:M λ is a count per group; λ=0.08 could never move an integer N (see owl_nm)
            prune = prune_cfg(args, method="wanda", allocation=a, nm=f"{n}:{m}")
            out.append((prune, replace(owl, lambda_=args.nm_lambda)))
    return out


def default_grid(args) -> TuneConfig:
    """The tune stage's grid as the pipeline runs it (the 'pipeline default' rows)."""
    return build(
        TuneConfig,
        {
            "m": args.default_grid_m,
            "lambda_": args.default_grid_lambda,
            "heldout_tokens": args.default_tune_tokens,
            "seqlen": min(args.seqlen, args.calib_seqlen),
            "nsamples": args.default_tune_nsamples,
        },
    )


def default_tunes(args) -> list[tuple[str, float, PruneConfig, str]]:
    """(method, sparsity, the OWL prune to tune, the tune result's key) of every 'pipeline default' row."""
    grid = default_grid(args)
    out = []
    for method in args.default_methods:
        for s in args.sparsities:
            if s in args.only.get(method, [s]):
                prune = prune_cfg(args, method=method, allocation="owl", sparsity=s)
                out.append((method, s, prune, f"tune {method} {s} {grid.model_dump()}"))
    return out


def held_configs(tune_cfg: PruneConfig, owl_grid: list[OwlConfig]) -> list[Config]:
    """What ``tune_grid`` scores on the held-out text, in its order: uniform, then OWL at each (M, λ)."""
    first = [(replace(tune_cfg, allocation="uniform"), owl_grid[0] if owl_grid else OwlConfig())]
    return first + [(replace(tune_cfg, allocation="owl"), owl) for owl in owl_grid]


def tuned_configs(args, tune_cfg: PruneConfig, best: dict) -> list[Config]:
    """The tuned OWL re-scored on the evaluation text (none when the grid's best is the default M, λ)."""
    default = OwlConfig()
    if (best["m"], best["lambda"]) == (default.m, default.lambda_):
        return []
    tuned = build(OwlConfig, {"m": best["m"], "lambda_": best["lambda"]})
    return [
        (replace(tune_cfg, method=method, sparsity=s, allocation="owl"), tuned)
        for method in (m for m in args.tuned_methods if m in args.methods)
        for s in args.tuned_sparsities
    ]


def pipeline_defaults(args, study: Study | None, tok, rows: list[dict], done: Checkpoint) -> dict:
    """A 'pipeline default' row per method x sparsity: the tune stage (tune.py) on held-out calibration text,
    then the sequential prune with its choice, scored on the evaluation text; paired against uniform and set
    against the gain of OWL with the grid-tuned (M, λ) where that row exists."""
    grid = default_grid(args)
    held = heldout_tokens(tok, args.calib, grid.heldout_tokens, grid.seqlen)
    out = []
    for method, s, prune, key in default_tunes(args):
        if key not in done.rows:
            assert study is not None, f"internal: {key} was not computed by the workers"
            study.restore()
            done.rows[key] = tune_owl(study.model, study.calib_ids, held, prune, OwlConfig(), grid, dense=study.dense)
            done.save()
        result = done.rows[key]
        p, o = chosen(prune, OwlConfig(), result)
        row = done.run(study, (p, o))
        rows.append({**row, "config": {**row["config"], "pipeline_default": True}, "tune": result})
        uniform = _row(rows, method, s, "uniform")
        tuned = _row(rows, method, s, "owl", tuned=True)
        d, se = paired_nll(row["window_nll"], uniform["window_nll"])
        gain_tuned = None if tuned is None else uniform["mean_nll"] - tuned["mean_nll"]
        kept = (uniform["mean_nll"] - row["mean_nll"]) / gain_tuned if gain_tuned and gain_tuned > 0 else None
        prune_s = row["seconds"]["prune"] + row["seconds"]["owl_ratios"]
        c = result["choice"]
        pick = f"OWL M={c['m']:g} λ={c['lambda']:g}" if result["owl_wins"] else "uniform"
        best = result["best"]
        out.append(
            {
                "method": method,
                "sparsity": s,
                "choice": f"{pick} ({best['delta_nll_vs_uniform']:+.3f} ± {best['delta_se']:.3f})",
                "owl_wins": result["owl_wins"],
                "ppl_uniform": uniform["perplexity"],
                "ppl_default": row["perplexity"],
                "delta_nll": d,
                "delta_se": se,
                "verdict": verdict(d, se),
                "ppl_tuned": None if tuned is None else tuned["perplexity"],
                "kept_of_tuned_gain": kept,
                "tune_seconds": result["seconds"]["total"],
                "tune_fraction_of_prune": result["seconds"]["total"] / prune_s if prune_s else None,
            }
        )
        tqdm.write(f"pipeline default {method} {s:.0%}: {pick}, ppl {row['perplexity']:.2f} ({out[-1]['verdict']})")
    return {"grid": {**grid.to_json(), "heldout_tokens": int(held.numel())}, "rows": out}


def _row(rows: list[dict], method: str, sparsity: float, allocation: str, tuned: bool = False) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["config"]["method"] == method
            and r["config"]["sparsity"] == sparsity
            and r["config"]["allocation"] == allocation
            and not r["config"]["nm"]
            and bool(r["config"].get("tuned")) == tuned
            and not r["config"].get("pipeline_default")
        ),
        None,
    )


def on_ray(args, spec: StudySpec, done: Checkpoint, todo: list[Config], tune_cfg, owl_grid) -> dict:
    """Compute every row of the study as Ray jobs, in two waves (the second needs the first's results: the
    tuned (M, λ) and the tune stage's choices); the table is then assembled from ``done`` exactly as a serial
    run assembles it. A failed job stops the study after its wave with every finished row saved."""
    from dataclasses import replace as with_

    from owl_deploy.cluster import Job

    held_spec = with_(spec, score_text=args.calib, score_tokens=args.tune_tokens, heldout=True)
    tune_spec = with_(spec, score_text=args.calib, score_tokens=default_grid(args).heldout_tokens, heldout=True)
    threads = torch.get_num_threads()
    first = [Job("dense", spec, score_dense)] + [Job(repr(c), spec, run_config, c) for c in todo]
    if owl_grid is not None:
        first += [Job("held-out " + repr(c), held_spec, run_config, c) for c in held_configs(tune_cfg, owl_grid)]
    grid = default_grid(args)
    first += [Job(key, tune_spec, tune_job, (prune, OwlConfig(), grid)) for _m, _s, prune, key in default_tunes(args)]
    info = {"address": args.ray_address or "local", "threads_per_worker": threads, "waves": []}

    def wave(jobs: list) -> None:
        t0 = time.perf_counter()
        tqdm.write(f"Ray: {len(jobs)} jobs ({sum(j.key not in done.rows for j in jobs)} to compute) ...")
        counts = done.fill(jobs, args.ray_address, threads, args.ray_workers)
        info["waves"].append({**counts, "jobs": len(jobs), "seconds": round(time.perf_counter() - t0, 1)})
        if done.failed:
            for key, error in done.failed.items():
                print(f"failed: {key}: {error}", file=sys.stderr)
            raise SystemExit(
                f"error: {len(done.failed)} of the study's jobs failed (above); the {len(done.rows)} finished are "
                f"saved in {done.path} and a re-run computes only the rest"
            )

    wave(first)
    second = []
    if owl_grid is not None:
        best = tune_grid(None, tune_cfg, owl_grid, run=lambda p, o: done.rows["held-out " + repr((p, o))])["best"]
        second += [Job(repr(c), spec, run_config, c) for c in tuned_configs(args, tune_cfg, best)]
    for _m, _s, prune, key in default_tunes(args):
        cfg = chosen(prune, OwlConfig(), done.rows[key])
        second.append(Job(repr(cfg), spec, run_config, cfg))
    wave(second)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval-text", default=DEFAULT_EVAL)
    p.add_argument("--calib", default=DEFAULT_CALIB)
    p.add_argument("--eval-tokens", type=positive_int, default=16384, help="first N tokens of the evaluation text")
    p.add_argument("--seqlen", type=positive_int, default=512, help="evaluation window")
    p.add_argument("--nsamples", type=positive_int, default=128)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compute-dtype",
        choices=("auto", *COMPUTE_DTYPES),
        default="auto",
        help="calibration forwards (auto: bfloat16 where the CPU has native bf16, as `prune` does; the recorded "
        "tables before 2026-12-01 ran float32)",
    )
    p.add_argument("--sparsities", type=_floats, default=[0.5, 0.6, 0.7, 0.8])
    p.add_argument("--methods", type=_names(METHODS), default=list(METHODS))
    p.add_argument("--allocations", type=_names(ALLOCATIONS), default=list(ALLOCATIONS))
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="METHOD=S1,S2",
        help="run METHOD at these sparsities only (e.g. sparsegpt=0.7: its Hessians dominate on a 1.5B model)",
    )
    p.add_argument(
        "--nm",
        type=lambda s: [tuple(int(v) for v in x.split(":")) for x in s.split(",") if x],
        default=[(2, 4), (4, 8)],
    )
    p.add_argument("--nm-lambda", type=float, default=0.25, help="OWL λ for N:M (0.25 = the reference's 2 of 8)")
    p.add_argument("--tune-ms", type=_floats, default=[3.0, 5.0, 8.0])
    p.add_argument("--tune-lambdas", type=_floats, default=[0.04, 0.08, 0.15])
    p.add_argument("--tune-sparsity", type=float, default=0.7, help="Wanda sparsity the grid is scored at")
    p.add_argument(
        "--tuned-methods",
        type=_names(METHODS),
        default=["wanda", "sparsegpt"],
        help="methods re-scored with the tuned OWL",
    )
    p.add_argument(
        "--tuned-sparsities",
        type=_floats,
        default=None,
        help="sparsities the tuned OWL is re-scored at for Wanda and SparseGPT [those ≥ --tune-sparsity]",
    )
    p.add_argument("--tune-tokens", type=positive_int, default=8192, help="held-out calibration tokens for tuning")
    p.add_argument(
        "--default-methods",
        type=_names(METHODS, empty=True),
        default=["wanda"],
        help="methods given a 'pipeline default' row per sparsity (the tune stage's choice, guard included); "
        "'' for none",
    )
    default_tune = TuneConfig()
    p.add_argument("--default-grid-m", type=_floats, default=default_tune.m, help="the tune stage's M grid")
    p.add_argument("--default-grid-lambda", type=_floats, default=default_tune.lambda_, help="its λ grid")
    p.add_argument("--default-tune-tokens", type=positive_int, default=default_tune.heldout_tokens)
    p.add_argument("--default-tune-nsamples", type=positive_int, default=default_tune.nsamples)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny calibration/eval, one sparsity, no tuning")
    p.add_argument("--out-stem", default=None, help="file stem under benchmarks/results (default quality-<model>)")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the recorded JSON, no run")
    p.add_argument("--serial", action="store_true", help="run every configuration in this process (no Ray)")
    p.add_argument("--ray-address", default=None, help="a Ray cluster (ADDR:PORT); default: an embedded local Ray")
    p.add_argument(
        "--ray-workers", type=positive_int, default=None, help="Ray workers (default: the cluster's CPUs / threads)"
    )
    args = p.parse_args()
    if args.render_only:
        stem = args.out_stem or f"quality-{args.model}"
        res = json.loads((RESULTS / f"{stem}.json").read_text())
        with atomic_file(RESULTS / f"{stem}.md") as fh:
            fh.write(markdown(res))
        return
    try:
        args.only = {m: _floats(v) for m, v in (x.split("=", 1) for x in args.only)}
    except ValueError:
        p.error("--only takes METHOD=S1,S2 (e.g. sparsegpt=0.7)")
    if set(args.only) - set(args.methods):
        p.error(f"--only names a method not in --methods: {', '.join(sorted(set(args.only) - set(args.methods)))}")
    if "owl" not in args.allocations or "uniform" not in args.allocations:
        p.error("--allocations must include uniform and owl (the table compares them)")
    if args.tuned_sparsities is None:
        args.tuned_sparsities = [s for s in args.sparsities if s >= args.tune_sparsity]
    args.compute_dtype = resolve_dtype(args.compute_dtype)
    if args.quick:
        args.nsamples, args.eval_tokens, args.sparsities, args.nm = 8, 2048, [0.7], [(2, 4)]
        args.tune_ms, args.tune_lambdas, args.tune_tokens = [5.0], [0.08], 1024
    stem = args.out_stem or f"quality-{args.model}" + ("-quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    spec = StudySpec(
        args.model,
        args.calib,
        args.nsamples,
        args.calib_seqlen,
        args.seed,
        args.eval_text,
        args.eval_tokens,
        args.seqlen,
    )
    done = checkpoint(RESULTS / f".{stem}.partial.json", args)
    todo = configs(args)
    tune_cfg = prune_cfg(args, method="wanda", sparsity=args.tune_sparsity)
    tuning = args.tune_sparsity in args.sparsities and args.tune_ms and args.tune_lambdas
    owl_grid = [build(OwlConfig, {"m": m, "lambda_": lam}) for m in args.tune_ms for lam in args.tune_lambdas]
    ray_info = None
    if args.serial:
        model, tok = load_model(args.model)
        calib_ids = calibration_windows(tok, args.calib, args.nsamples, args.calib_seqlen, args.seed)
        study: Study | None = Study(
            model, tok, calib_ids, eval_tokens(tok, args.eval_text, args.eval_tokens), args.seqlen,
            checkpoint=resolve_model(args.model),
        )  # fmt: skip
        dense = study.score(progress=True)
    else:
        tok, study = load_tokenizer(args.model), None
        ray_info = on_ray(args, spec, done, todo, tune_cfg, owl_grid if tuning else None)
        dense = Perplexity(**done.rows["dense"])
    rows = []
    for cfg in tqdm(todo, desc="prune + eval", unit="cfg", disable=study is None):
        rows.append(done.run(study, cfg))
        prune = cfg[0]
        tqdm.write(
            f"{label(rows[-1]['config']):28s} {prune.target_sparsity:.0%} {prune.nm or ''} "
            f"ppl {rows[-1]['perplexity']:.2f}"
        )

    # tune (M, λ) on held-out calibration text, then re-score the tuned OWL on the evaluation text
    tune = None
    if tuning:
        held_tokens = heldout_tokens(tok, args.calib, args.tune_tokens, args.seqlen)  # the study scores these windows
        held = study.on(held_tokens) if study is not None else None  # the model holds the last row's prune
        grid = tune_grid(held, tune_cfg, owl_grid, run=lambda p, o: done.run(held, (p, o), "held-out "))
        tune = {
            "method": "wanda",
            "sparsity": args.tune_sparsity,
            "tokens": len(held_tokens),
            "ms": args.tune_ms,
            "lambdas": args.tune_lambdas,
            **grid,
        }
        for cfg in tuned_configs(args, tune_cfg, grid["best"]):
            row = done.run(study, cfg)
            row["config"]["tuned"] = True
            rows.append(row)

    comparisons = []
    for r in rows:
        c = r["config"]
        if c["allocation"] != "owl" or c.get("pipeline_default"):
            continue
        base = next(
            u
            for u in rows
            if u["config"]["allocation"] == "uniform"
            and u["config"]["method"] == c["method"]
            and u["config"]["sparsity"] == c["sparsity"]
            and u["config"]["nm"] == c["nm"]
        )
        d, se = paired_nll(r["window_nll"], base["window_nll"])
        name = f"{label(c)} vs {c['method']}" + (f" {c['nm']}" if c["nm"] else "")
        comparisons.append(
            {
                "name": name,
                "sparsity": c["sparsity"],
                "ppl_uniform": base["perplexity"],
                "ppl_owl": r["perplexity"],
                "delta_nll": d,
                "delta_se": se,
            }
        )

    defaults = pipeline_defaults(args, study, tok, rows, done)

    import transformers

    res = {
        "meta": {
            "model": args.model,
            "eval_text": args.eval_text,
            "calib": args.calib,
            "eval_tokens": dense.tokens,
            "windows": dense.windows,
            "seqlen": args.seqlen,
            "nsamples": args.nsamples,
            "calib_seqlen": args.calib_seqlen,
            "seed": args.seed,
            "owl_m": 5.0,
            "owl_lambda": 0.08,
            "nm_lambda": args.nm_lambda,
            "date": time.strftime("%Y-%m-%d"),
            "wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            "cpu": _cpu_model(),
            "hardware": hardware_info(measure_bandwidth=False, deepsparse_view=False),  # the name hides AMX or not
            "threads": torch.get_num_threads(),
            "compute_dtype": args.compute_dtype,
            "ray": ray_info,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()),
            "argv": sys.argv[1:],
            "model_note": _model_note(args.model),
        },
        "dense": dense.to_json(full=True),
        "rows": rows,
        "comparisons": comparisons,
        "tune": tune,
        "pipeline_default": defaults,
    }
    res["plots"] = plots(res, stem, RESULTS)
    md = markdown(res)
    write_report(RESULTS / stem, res, md)
    done.remove()
    print(md)


def checkpoint(path: Path, args: argparse.Namespace) -> Checkpoint:
    """The study's resumable results: reused only by a run of the same model, texts, sizes and seed."""
    return Checkpoint(path, {k: getattr(args, k) for k in CHECKPOINT_KEYS}, say=tqdm.write)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _names(allowed: tuple[str, ...], empty: bool = False):
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        bad = [x for x in names if x not in allowed]
        if bad or not (names or empty):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {text!r})")
        return names

    return parse


def _model_note(spec: str) -> str:
    """What the model's asset record says about its weights (e.g. they were 4-bit before we saw them)."""
    from owl_deploy import assets

    folder = assets.ensure(spec) if spec in assets.MODELS else Path(spec)
    info = folder / "asset.json"
    if info.is_file():
        return json.loads(info.read_text()).get("note", "")
    return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
