"""Wall time and peak RSS of the prune stage: Wanda, OWL+Wanda, SparseGPT, OWL+SparseGPT.

Each configuration runs `owl-deploy prune` in its own process (so each peak RSS is its own) on the
same model and calibration (default: SmolLM2-135M, 128 x 512 tokens, 70% sparsity) and reads the
phase timings from its sparsity.json. Writes JSON + Markdown (default benchmarks/results/).

    .venv/bin/python benchmarks/prune_speed.py                      # the issue's setting (~tens of minutes on 2 cores)
    .venv/bin/python benchmarks/prune_speed.py --nsamples 16 --configs wanda,owl+wanda
    .venv/bin/python benchmarks/prune_speed.py --configs owl+wanda --compute-dtypes float32,bfloat16 \
        --eval-tokens 16384 --stem-suffix -epyc          # bf16 calibration forwards against fp32, paired

With ``--eval-tokens N`` every pruned model is scored on the first N tokens of ``wiki`` (windows of 512) and
each bfloat16 run is paired with the float32 run of the same config: the per-window NLL difference with its
standard error, and the fraction of the mask that differs.

Targets (issue 3): OWL+Wanda <= 60 s, OWL overhead (its dense-pass + allocation time) <= 5% of Wanda's
time, peak RSS <= 2.5 GB. The load average is recorded: the machine is shared, and time is only
comparable between runs on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "wanda": ("wanda", "uniform"),
    "owl+wanda": ("wanda", "owl"),
    "sparsegpt": ("sparsegpt", "uniform"),
    "owl+sparsegpt": ("sparsegpt", "owl"),
}
TARGETS = {"owl_wanda_seconds": 60.0, "owl_overhead_fraction": 0.05, "peak_rss_mb": 2500.0}


def run_one(name: str, dtype: str, args: argparse.Namespace, workdir: Path) -> dict:
    method, allocation = CONFIGS[name]
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{name.replace('+', '_')}-{dtype}"
    cmd = [
        sys.executable,
        "-m",
        "owl_deploy",
        "prune",
        "--model",
        args.model,
        "--method",
        method,
        "--allocation",
        allocation,
        "--sparsity",
        str(args.sparsity),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--seed",
        str(args.seed),
        "--compute-dtype",
        dtype,
        "--out",
        str(out),
    ]
    if allocation != "uniform":
        cmd += ["--owl-nsamples", str(args.owl_nsamples)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    env = os.environ | ({"OWL_DEPLOY_TOKEN_CACHE": "0"} if args.token_cache == "cold" else {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr}")
    report = json.loads((out / "sparsity.json").read_text())
    return {
        "name": name,
        "compute_dtype": dtype,
        "folder": str(out),
        "method": method,
        "allocation": allocation,
        "wall_seconds": wall,  # includes interpreter start-up and imports
        "timings": report["timings"],
        "peak_rss_mb": report["peak_rss_mb"],
        "global_sparsity": report["global_sparsity"],
        "owl_nsamples": report["owl"]["nsamples"],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def score(runs: list[dict], args: argparse.Namespace) -> None:
    """Perplexity of every pruned model on the same windows; each bfloat16 run paired with its float32 twin."""
    import torch

    from owl_deploy.data import eval_tokens
    from owl_deploy.evaluate import paired_nll, perplexity, torch_logits_fn, verdict
    from owl_deploy.model import load_causal_lm, load_tokenizer
    from owl_deploy.recover import masks_of

    tokens = eval_tokens(load_tokenizer(Path(runs[0]["folder"])), "wiki", args.eval_tokens)
    masks: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for r in runs:
        model = load_causal_lm(Path(r["folder"]))
        ppl = perplexity(torch_logits_fn(model), tokens, 512, progress=False)
        r.update(perplexity=ppl.perplexity, mean_nll=ppl.mean_nll, window_nll=ppl.window_nll)
        masks[(r["name"], r["compute_dtype"])] = masks_of(model)
        del model
    for r in runs:
        twin = next((f for f in runs if f["name"] == r["name"] and f["compute_dtype"] == "float32"), None)
        if r["compute_dtype"] == "float32" or twin is None:
            continue
        d, se = paired_nll(r["window_nll"], twin["window_nll"])
        a, b = masks[(r["name"], r["compute_dtype"])], masks[(r["name"], "float32")]
        differs = sum(int((a[k] != b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
        r["vs_float32"] = {"delta_nll": d, "delta_se": se, "verdict": verdict(d, se), "mask_differs": differs}


def median_total(run: dict) -> float:
    """The median total of a config's repeats (records made before --repeats: its one total)."""
    return statistics.median(run.get("repeat_totals") or [run["timings"]["total"]])


def targets_of(runs: list[dict], dtypes: list[str]) -> dict:
    """The issue's targets, one set per compute dtype (named after it when there are several)."""
    targets: dict = {}
    for dtype in dtypes:
        by = {r["name"]: r for r in runs if r.get("compute_dtype", "float32") == dtype}  # older records: float32
        tag = f" ({dtype})" if len(dtypes) > 1 else ""
        if "owl+wanda" in by:
            v = median_total(by["owl+wanda"])
            targets["owl_wanda_seconds" + tag] = {"value": v, "limit": TARGETS["owl_wanda_seconds"]}
        if "owl+wanda" in by and "wanda" in by:
            v = by["owl+wanda"]["timings"]["owl_ratios"] / by["wanda"]["timings"]["total"]
            targets["owl_overhead_fraction" + tag] = {"value": v, "limit": TARGETS["owl_overhead_fraction"]}
    if runs:
        v = max(r["peak_rss_mb"] for r in runs)
        targets["peak_rss_mb"] = {"value": v, "limit": TARGETS["peak_rss_mb"]}
    for check in targets.values():
        check["met"] = check["value"] <= check["limit"]
    return targets


def cache_note(mode: str | None) -> str:
    return {
        "warm": "read from the token cache (as every prune after the first one on a text)",
        "cold": "tokenized in every run (token cache off)",
    }.get(mode or "", "tokenized in every run (recorded before the token cache)")


def phase(run: dict, key: str) -> float:
    """A phase's seconds: the median over the repeats when they were recorded, else the one run's."""
    every = [t[key] for t in run.get("repeat_timings") or [] if key in t]
    return statistics.median(every) if every else run["timings"][key]


def total_cell(run: dict) -> str:
    totals = run.get("repeat_totals") or []
    if len(totals) < 2:
        return f"{run['timings']['total']:.1f}"
    return f"{statistics.median(totals):.1f} [{min(totals):.1f}–{max(totals):.1f}]"


def cpu_line(machine: dict) -> str:
    """The CPU's name, its matrix ISA and what ``--compute-dtype auto`` picks on it (older results: the name)."""
    from owl_deploy.versions import isa_label

    isa = isa_label(machine.get("flags") or {})
    auto = f"; `auto` computes in {machine['auto_compute_dtype']} here" if machine.get("auto_compute_dtype") else ""
    return f"{machine.get('cpu_model', '?')}" + (f", {isa}" if isa else "") + auto


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "# Prune speed",
        "",
        f"Model `{a['model']}`, calibration {a['nsamples']} x {a['seqlen']} tokens, sparsity {a['sparsity']}, "
        f"seed {a['seed']}; {result['machine']['cpus']} CPUs, torch threads {result['machine']['torch_threads']}, "
        f"load average (1 min) {result['machine']['loadavg_start'][0]:.2f} before the runs and "
        f"{result['machine']['loadavg_end'][0]:.2f} after (2 cores: above ~1 the machine is shared).",
        "",
        f"CPU: {cpu_line(result['machine'])}.",
        "",
        f"Calibration tokens: {cache_note(a.get('token_cache'))}. "
        f"Runs per config: {a.get('repeats', 1)} (interleaved); every time is the median "
        "(`total s` with its range when there are several); wall s and peak RSS are the first run's.",
        "",
        "| config | compute | wall s | total s | load s | calib data s | OWL ratios s | prune s | save s "
        "| peak RSS MB | global sparsity | perplexity | vs float32: Δ NLL ± s.e. | mask differs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        pair = r.get("vs_float32")
        vs = f"{pair['delta_nll']:+.4f} ± {pair['delta_se']:.4f} ({pair['verdict']})" if pair else "—"
        differs = f"{pair['mask_differs']:.2%}" if pair else "—"
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") else "—"
        lines.append(
            f"| {r['name']} | {r.get('compute_dtype', 'float32')} | {r['wall_seconds']:.1f} | {total_cell(r)} | "
            f"{phase(r, 'load_model'):.1f} | {phase(r, 'calibration_data'):.1f} | {phase(r, 'owl_ratios'):.1f} | "
            f"{phase(r, 'prune'):.1f} | {phase(r, 'save'):.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['global_sparsity']:.4f} | {ppl} | {vs} | {differs} |"
        )
    split = [r for r in result["runs"] if "prune_forward" in r["timings"]]
    if split:
        lines += [
            "",
            "Where the pruning pass goes (seconds): block forwards (hooks excluded), the hooks' statistics, the masks, "
            "block reads/writes, and the rest (capturing block 0's inputs, bookkeeping).",
            "",
            "| config | compute | prune s | forwards | statistics | masks | block I/O | rest |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in split:
            keys = ("prune_forward", "prune_statistics", "prune_mask", "prune_io")
            every = r.get("repeat_timings") or [r["timings"]]
            rest = statistics.median(t["prune"] - sum(t[k] for k in keys) for t in every)  # per run, then median
            cells = " | ".join(f"{x:.1f}" for x in [phase(r, "prune"), *(phase(r, k) for k in keys), rest])
            lines.append(f"| {r['name']} | {r.get('compute_dtype', 'float32')} | {cells} |")
    lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
    for key, check in result["targets"].items():
        lines.append(f"| {key} | {check['value']:.4g} | {check['limit']:.4g} | {'yes' if check['met'] else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    from owl_deploy.cli_options import positive_int  # no torch: bad arguments fail before the slow imports

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=positive_int, default=128)
    p.add_argument("--seqlen", type=positive_int, default=512)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--owl-nsamples", default="8", help="windows of the dense OWL pass, or 'all' (default 8)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--compute-dtypes", default="float32", help="comma-separated: float32, bfloat16 (each config)")
    p.add_argument("--eval-tokens", type=int, default=0, help="score each pruned model on wiki's first N tokens")
    p.add_argument("--stem-suffix", default="", help="appended to the result's file stem (e.g. -epyc)")
    p.add_argument(
        "--repeats", type=positive_int, default=1, help="runs of every config (interleaved); median and range"
    )
    p.add_argument(
        "--token-cache",
        choices=("warm", "cold"),
        default="warm",
        help="warm: the calibration tokens are cached before the runs (every prune after a first); cold: none is",
    )
    p.add_argument("--render", type=Path, help="re-write the Markdown (and targets) of a recorded JSON; run nothing")
    args = p.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        dtypes = list(dict.fromkeys(r.get("compute_dtype", "float32") for r in result["runs"]))
        result["targets"] = targets_of(result["runs"], dtypes)
        args.render.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        args.render.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return
    dtypes = [d.strip() for d in args.compute_dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"float32", "bfloat16"}:
        raise SystemExit(f"--compute-dtypes: choose from float32, bfloat16 (got {args.compute_dtypes!r})")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs: {', '.join(sorted(unknown))}")

    import torch

    from owl_deploy.bench.machine import hardware_info
    from owl_deploy.calibrate import resolve_dtype

    hardware = hardware_info(measure_bandwidth=False, deepsparse_view=False)
    machine = {
        "cpu_model": hardware.get("cpu_model"),
        "flags": hardware["flags"],  # the CPU name hides whether bf16 runs on AMX, AVX512-BF16 or not natively
        "auto_compute_dtype": resolve_dtype("auto"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
    }
    if args.token_cache == "warm":  # what every prune after the first sees: the calibration text's tokens cached
        from owl_deploy.configs import DEFAULT_CALIB
        from owl_deploy.data import calibration_streams
        from owl_deploy.specs import load_tokenizer

        calibration_streams(load_tokenizer(args.model), DEFAULT_CALIB)
    runs = []
    with tempfile.TemporaryDirectory(prefix="prune_speed-") as tmp:
        for repeat in range(args.repeats):  # interleaved: every config once per round
            for i, (name, dtype) in enumerate((n, d) for n in names for d in dtypes):
                print(f"running {name} ({dtype}) {repeat + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
                run = run_one(name, dtype, args, Path(tmp) / f"r{repeat}")
                print(f"  {run['timings']['total']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB", file=sys.stderr)
                if repeat == 0:
                    run["repeat_totals"], run["repeat_walls"], run["repeat_timings"] = [], [], []
                    runs.append(run)
                else:
                    first = runs[i]
                    if run["global_sparsity"] != first["global_sparsity"]:
                        raise SystemExit(f"{name} ({dtype}): repeat {repeat} pruned differently (not deterministic)")
                    shutil.rmtree(run["folder"], ignore_errors=True)
                runs[i]["repeat_totals"].append(run["timings"]["total"])
                runs[i]["repeat_walls"].append(run["wall_seconds"])
                runs[i]["repeat_timings"].append(run["timings"])
        machine["loadavg_end"] = os.getloadavg()  # the timed part ends here; scoring follows
        if args.eval_tokens:
            score(runs, args)
        for r in runs:
            shutil.rmtree(r.pop("folder"), ignore_errors=True)
    targets = targets_of(runs, dtypes)
    result = {"args": vars(args) | {"out_dir": str(args.out_dir)}, "machine": machine, "runs": runs, "targets": targets}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"prune_speed_{args.nsamples}x{args.seqlen}"
    if names != list(CONFIGS):
        stem += "_" + "-".join(n.replace("+", "_") for n in names)
    if dtypes != ["float32"]:
        stem += "_" + "-".join(dtypes)
    stem += args.stem_suffix
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
