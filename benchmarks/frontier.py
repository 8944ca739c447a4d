#!/usr/bin/env python
"""The speed/quality frontier: which deployment of a model is the fastest at the quality a user accepts?

For one model: dense fp32 and int8, and Wanda at each ``--sparsities`` × {pruned, recovered} ×
{fp32, int8} (``--precisions`` adds int8-keepN: int8 with the N projections int8 hurts most kept fp32,
dense and sparse), pruned as the pipeline does by default (``owl-deploy tune`` chooses OWL's M and λ on held-out
calibration text, or uniform when no OWL setting beats it; ``--allocation owl|uniform`` forces one), each
measured as it deploys:

* quality of the **exported graph** (ONNX Runtime: exact for fp32 and the reference for int8, whose
  DeepSparse kernels round differently): perplexity on the first ``--eval-tokens`` of ``wiki`` and
  LAMBADA-style accuracy (``lambada_wiki``, lm-evaluation-harness, ``--limit`` items);
* decode tok/s at batch 1 in **one** interleaved ``owl-deploy bench`` run: DeepSparse on every deployment,
  ONNX Runtime on dense fp32 (the reference) and dense int8, and the peers users run instead
  (``--peer``, e.g. llama.cpp Q8_0 / Q4_K_M prepared by benchmarks/peers.py; their perplexity is read
  from ``benchmarks/results/peers-<model>.json`` when it was scored on the same tokens).  A recovered
  model holds exactly its pruned model's zeros in the same graph, so it decodes at the pruned one's
  speed: the bench times the pruned deployments and the recovered ones share that figure (said so in
  the table), which halves the sessions held in memory.

Every step is an ``owl-deploy`` command in its own process (what a user runs; memory returned between
steps), skipped when its output exists — each command writes atomically, so a killed run resumes.
``--pruned 0.7=DIR`` / ``--recovered 0.7=DIR`` / ``--deployment NAME=ODIR`` reuse models and deployments
made elsewhere (e.g. the main job's prune), as long as they were made with the same settings.

    .venv/bin/python benchmarks/frontier.py --model smollm2-135m --work out/frontier/smollm2-135m \\
        --peer llama.cpp/q8_0=out/peers/smollm2-135m/llama.cpp-q8_0 \\
        --peer llama.cpp/q4_k_m=out/peers/smollm2-135m/llama.cpp-q4_k_m

Writes benchmarks/results/frontier-<model>.{json,md,png} (``--out-stem`` renames them) and, per model, the
one-line answer: the fastest deployment within +10% / +25% perplexity of dense fp32, against dense fp32 and
dense int8 ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owl_deploy.bench.machine import hardware_info, versions_info  # noqa: E402
from owl_deploy.cli_options import arg_list, positive_int  # noqa: E402
from owl_deploy.configs import OwlConfig  # noqa: E402
from owl_deploy.io import atomic_file, write_json, write_report  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_report import alloc_label, answers, markdown, plot, versus_dense_int8  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CLI = [str(Path(sys.executable).with_name("owl-deploy"))]


def sh(args: list[str], log: Path | None = None) -> str:
    """Run one owl-deploy command; its stdout, or exit with its last error line."""
    print("+ owl-deploy " + " ".join(args), file=sys.stderr, flush=True)
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1"}
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"owl-deploy {args[0]} failed (exit {proc.returncode}): {last}")
    return proc.stdout


PRECISIONS = ("fp32", "int8")
KEEP = re.compile(r"int8-keep([1-9][0-9]*)")  # int8 with the N projections int8 hurts most kept fp32


def export_args(precision: str) -> list[str]:
    """``owl-deploy export`` options of a precision: fp32, int8 or int8-keepN (``--keep-fp32-worst N``)."""
    if precision == "fp32":
        return []
    keep = KEEP.fullmatch(precision)
    return ["--quantize", "int8", *(["--keep-fp32-worst", keep[1]] if keep else [])]


def plan(sparsities: list[float], recover: bool, precisions: tuple[str, ...] = PRECISIONS) -> list[dict]:
    """The deployments: name, source model key, precision, sparsity, whether recovered.

    Dense fp32 and int8 are always built: every ratio divides by their ONNX Runtime runs. ``precisions``
    narrows only the sparse rows (a 1.5B model's sparse fp32 exports cost ~8 min each, and their DeepSparse
    engines do not fit in 23 GB beside the rest of the bench); an int8-keepN precision adds its dense row too
    (on Qwen2.5-Coder-1.5B, dense int8 with 8 projections fp32 was the fastest deployment within +10%)."""
    dense = (*PRECISIONS, *(p for p in precisions if p not in PRECISIONS))
    rows = [
        {"name": f"dense-{p}", "source": "dense", "precision": p, "sparsity": 0.0, "recovered": False} for p in dense
    ]
    for s in sparsities:
        for rec in (False, True) if recover else (False,):
            for p in precisions:
                src = f"{'recovered' if rec else 'pruned'}-{round(s * 100)}"
                rows.append({"name": f"{src}-{p}", "source": src, "precision": p, "sparsity": s, "recovered": rec})
    return rows


def _precisions(spec: str) -> tuple[str, ...]:
    """``"int8"`` / ``"fp32,int8,int8-keep8"`` -> a tuple in the canonical order (fp32, int8, then int8-keepN by
    N); anything else is a one-line error."""
    asked = list(dict.fromkeys(x.strip() for x in spec.split(",") if x.strip()))
    bad = [x for x in asked if x not in PRECISIONS and not KEEP.fullmatch(x)]
    if bad or not asked:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(PRECISIONS)} or int8-keepN (N >= 1), got {spec!r}"
        )
    keeps = sorted((x for x in asked if x not in PRECISIONS), key=lambda x: int(KEEP.fullmatch(x)[1]))
    return (*(p for p in PRECISIONS if p in asked), *keeps)


def _reuse(items: list[str], what: str) -> dict[str, Path]:
    """``["0.7=DIR", ...]`` -> {"0.7": DIR}, refusing a missing folder with one line."""
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"--{what} {item!r}: expected KEY=FOLDER with an existing folder")
        out[key] = Path(path)
    return out


def allocation_for(a: argparse.Namespace, work: Path, s: float) -> dict:
    """The allocation a prune at ``s`` uses: the tune stage's choice (cached), or the one forced."""
    if a.allocation != "tuned":  # prune's own OWL defaults
        owl = OwlConfig()
        return {
            "allocation": a.allocation,
            "m": owl.m,
            "lambda": owl.lambda_,
            "reason": f"forced: --allocation {a.allocation}",
        }
    cache = work / "tune" / f"tune-{round(s * 100)}.json"
    if not cache.exists():
        out = sh(["tune", "--model", a.model, "--sparsity", str(s), "--json"], work / "logs" / f"{cache.stem}.log")
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache) as fh:
            fh.write(out)
    res = json.loads(cache.read_text())
    return {**res["choice"], "reason": res.get("reason"), "seconds": res.get("seconds", {}).get("total")}


def build(a: argparse.Namespace, work: Path, rows: list[dict]) -> tuple[dict[str, Path], dict[str, dict]]:
    """Prune, recover and export every deployment of ``rows`` (skipping what exists or is reused).

    Returns name -> deployment folder, and per sparsity the allocation used (tune's choice)."""
    pruned_given, recovered_given = _reuse(a.pruned, "pruned"), _reuse(a.recovered, "recovered")
    deploy_given = _reuse(a.deployment, "deployment")
    sources: dict[str, str] = {"dense": a.model}
    allocations: dict[str, dict] = {}
    for s in a.sparsities:
        pct = round(s * 100)
        pruned = pruned_given.get(f"{s:g}") or work / "models" / f"pruned-{pct}"
        tuned = work / "tune" / f"tune-{pct}.json"
        if pruned.exists() and tuned.exists() and a.allocation == "tuned":  # pruned here, with that choice
            allocations[f"{s:g}"] = allocation_for(a, work, s)
        elif pruned.exists():
            meta = json.loads((pruned / "sparsity.json").read_text())
            tune = meta.get("tune") or {}
            owl = meta.get("owl") or {}
            choice = tune.get("choice") or {
                "allocation": meta.get("allocation"),
                "m": owl.get("m"),
                "lambda": owl.get("lambda"),
            }
            allocations[f"{s:g}"] = {**choice, "reason": tune.get("reason", "reused: " + str(pruned))}
        else:
            choice = allocation_for(a, work, s)
            allocations[f"{s:g}"] = choice
            owl = ["--owl-m", str(choice["m"]), "--owl-lambda", str(choice["lambda"])]
            sh(
                [
                    "prune",
                    "--model",
                    a.model,
                    "--method",
                    "wanda",
                    "--allocation",
                    choice["allocation"],
                    *owl,
                    "--sparsity",
                    str(s),
                    "--nsamples",
                    str(a.nsamples),
                    "--out",
                    str(pruned),
                ],
                work / "logs" / f"pruned-{pct}.log",
            )
        sources[f"pruned-{pct}"] = str(pruned)
        if a.recover:
            rec = recovered_given.get(f"{s:g}") or work / "models" / f"recovered-{pct}"
            if not rec.exists():
                sh(
                    [
                        "recover",
                        "--model",
                        str(pruned),
                        "--out",
                        str(rec),
                        "--eval-tokens",
                        str(a.eval_tokens),
                        *a.recover_args.split(),
                    ],
                    work / "logs" / f"recovered-{pct}.log",
                )
            sources[f"recovered-{pct}"] = str(rec)
    folders = {}
    for r in rows:
        odir = deploy_given.get(r["name"]) or work / "deploy" / r["name"]
        if not odir.exists():
            try:
                sh(
                    [
                        "export",
                        "--model",
                        sources[r["source"]],
                        "--out",
                        str(odir),
                        "--sequence-length",
                        str(a.sequence_length),
                        *export_args(r["precision"]),
                    ],
                    work / "logs" / f"export-{r['name']}.log",
                )
            except SystemExit:
                if not (odir / "export.json").is_file():  # not a verification that ran and failed: stop
                    raise
        folders[r["name"]] = odir
    return folders, allocations


def verification(odir: Path) -> dict:
    """The export's own verdict (export.json): a deployment whose check failed stays on the frontier, flagged
    with the reasons, since the same folder is what a user would get."""
    meta = json.loads((odir / "export.json").read_text())
    return {"verified": bool(meta.get("ok")), "problems": meta.get("problems") or [], **kernels(meta)}


def kernels(meta: dict) -> dict:
    """How many of the graph's linear layers DeepSparse runs with a sparse kernel (export.json's debug-analysis
    tally): the engine picks per layer, and below ~40% sparsity it keeps dense kernels — a pruned model with
    few sparse kernels decodes at dense speed whatever its sparsity."""
    es = meta.get("engine_sparsity") or {}
    if es.get("num_sparse_kernels") is None or not es.get("num_layers_reported"):
        return {}
    return {"sparse_kernels": es["num_sparse_kernels"], "kernel_layers": es["num_layers_reported"]}


def quality(a: argparse.Namespace, work: Path, name: str, odir: Path) -> dict:
    """Perplexity and accuracy of the exported graph in ONNX Runtime (cached as JSON)."""
    cache = work / "quality" / f"{name}.json"
    if cache.exists():  # reused only when scored on the same tokens and items
        res = json.loads(cache.read_text())
        if res["perplexity"]["tokens"] == a.eval_tokens and res["tasks"]["lambada_wiki"]["items"] == a.limit:
            return res
    ppl = json.loads(
        sh(["eval", "--model", str(odir), "--engine", "onnxruntime", "--max-tokens", str(a.eval_tokens), "--json"])
    )
    acc = json.loads(sh(["eval", "--model", str(odir), "--tasks", "lambada_wiki", "--limit", str(a.limit), "--json"]))
    res = {"perplexity": ppl, "tasks": acc["tasks"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, res)
    return res


ANCHORS = ("ort/dense", "ort/dense-int8", "ds/dense-int8")  # in every group: what each ratio divides by


def groups_of(items: list[str], n: int) -> list[list[str]]:
    """``items`` cut into ``n`` contiguous, balanced groups (none empty): ``[a, b, c], 2 -> [[a, b], [c]]``."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, i = [], 0
    for g in range(n):
        k = size + (g < extra)
        out.append(items[i : i + k])
        i += k
    return out


def references(runs: dict) -> dict:
    """What one interleaved run's ratios divide by: dense fp32 and int8 in ONNX Runtime, dense int8 in DeepSparse."""

    def median(key: str) -> float | None:
        return runs[key]["decode_tokens_per_s"]["median"] if key in runs else None

    return {"ort": median("onnxruntime/dense"), "ort8": median("onnxruntime/dense-int8"),
            "ds8": median("deepsparse/dense-int8")}  # fmt: skip


def merge_groups(results: list[dict]) -> dict:
    """One bench result from several interleaved runs that each timed the anchors: a run keeps the figures of
    its own group's references (``refs``), so every ratio is still taken within one interleaved run."""
    runs, peers, refs = {}, {}, {}
    for res in results:
        r = res["runs"]
        ref = references(r)
        for key, run in r.items():
            if key not in runs:  # an anchor keeps the first group's figure; the others appear once
                runs[key] = run
                refs[key] = ref
        peers.update(res.get("peers") or {})
    noise = [res["noise"] for res in results]
    return {
        "runs": runs,
        "peers": peers,
        "refs": refs,
        "groups": len(results),
        "noise": {
            "noisy": any(n["noisy"] for n in noise),
            "other_cpu_mean": max(n.get("other_cpu_mean", 0.0) for n in noise),
            "loadavg_before": noise[0]["loadavg_before"],
        },
    }


def bench(a: argparse.Namespace, work: Path, folders: dict[str, Path]) -> dict:
    """Interleaved decode runs: DeepSparse on the dense and pruned deployments, ONNX Runtime on dense fp32/int8.

    One run by default; ``--bench-groups N`` splits the DeepSparse runs and the peers into N runs (one after
    the other, each also timing the anchors), for a machine that cannot hold every engine of a model at once."""
    timed = [n for n in folders if n.startswith(("dense", "pruned"))]
    engines = ["ort/dense", "ort/dense-int8", "ds/dense", *(f"ds/{n}" for n in timed if n != "dense-fp32")]
    engines = [e for e in engines if e not in a.bench_skip]
    others = [e for e in engines if e not in ANCHORS] + [f"peer:{p}" for p in a.peer]
    chunks = groups_of(others, a.bench_groups)
    results = []
    for i, chunk in enumerate(chunks):
        out = work / "bench" if len(chunks) == 1 else work / "bench" / f"group-{i + 1}-of-{len(chunks)}"
        if not (out / "results.json").exists():
            group = [e for e in engines if e in ANCHORS or e in chunk]
            args = ["bench", "--dense", str(folders["dense-fp32"]), "--out", str(out), "--rounds", str(a.rounds)]
            for n in dict.fromkeys(e.split("/", 1)[1] for e in group):  # each model once, in order
                if n not in ("dense", "dense-fp32"):
                    args += ["--model", f"{n}={folders[n]}"]
            args += ["--engines", ",".join(group)]
            for p in chunk:
                if p.startswith("peer:"):
                    args += ["--peer", p.removeprefix("peer:")]
            sh(args, work / "logs" / f"{out.name}.log")
        results.append(json.loads((out / "results.json").read_text()))
    return results[0] if len(results) == 1 else merge_groups(results)


def points(
    rows: list[dict],
    qual: dict,
    res: dict,
    peers_quality: dict,
    allocations: dict | None = None,
    checks: dict | None = None,
) -> list[dict]:
    """One point per deployment (and peer): perplexity, accuracy, decode tok/s and the two ratios."""
    allocations, checks = allocations or {}, checks or {}
    runs = res["runs"]
    one_run = references(runs)
    refs = res.get("refs") or {}  # --bench-groups: each run against its own group's references

    def speed(key: str) -> dict:
        tok, own = runs[key]["decode_tokens_per_s"]["median"], refs.get(key, one_run)
        out = {"decode_tokens_per_s": tok, "decode_p10_p90": _spread(runs[key]), "timed_as": key,
               "vs_dense_fp32_ort": tok / own["ort"], "vs_dense_int8_ort": tok / own["ort8"]}  # fmt: skip
        if own["ds8"]:
            out["vs_dense_int8_ds"] = tok / own["ds8"]
        return out

    def scored(name: str) -> dict:
        q, task = qual[name], qual[name]["tasks"]["lambada_wiki"]
        return {"perplexity": q["perplexity"]["perplexity"], "accuracy": task["acc"],
                "accuracy_stderr": task["acc_stderr"]}  # fmt: skip

    pts = []
    for r in rows:
        key = _ds_run(r["name"])
        if key not in runs:  # left out of the bench (--bench-skip): quality only, see untimed()
            continue
        alloc = allocations.get(f"{r['sparsity']:g}", {})
        pts.append({**r, **checks.get(r["name"], {}), "allocation": alloc_label(alloc), "engine": "deepsparse",
                    **scored(r["name"]), **speed(key)})  # fmt: skip
    dense = {"source": "dense", "sparsity": 0.0, "recovered": False, "engine": "onnxruntime"}
    for name, key in (("dense-fp32", "onnxruntime/dense"), ("dense-int8", "onnxruntime/dense-int8")):
        pts.append({**dense, "name": f"{name} (ort)", "precision": name.split("-")[1], **scored(name), **speed(key)})
    for key in res.get("peers") or {}:
        engine, label = key.split("/")
        pts.append({"name": key, "source": "peer", "precision": label, "sparsity": 0.0, "recovered": False,
                    "engine": engine, "perplexity": (peers_quality.get(key) or {}).get("perplexity"),
                    "accuracy": None, "accuracy_stderr": None, **speed(key)})  # fmt: skip
    return pts


def _ds_run(name: str) -> str:
    """The bench run that times a deployment in DeepSparse: a recovered model shares its pruned twin's."""
    timed_as = name.replace("recovered", "pruned")
    return "deepsparse/dense" if timed_as == "dense-fp32" else f"deepsparse/{timed_as}"


def untimed(rows: list[dict], qual: dict, res: dict) -> list[dict]:
    """Deployments scored but not timed in DeepSparse (``--bench-skip``, e.g. when the machine cannot hold
    every engine of a large model at once): their quality, so the report still shows them."""
    out = []
    for r in rows:
        if _ds_run(r["name"]) not in res["runs"]:
            q = qual[r["name"]]
            out.append({"name": r["name"], "engine": "deepsparse", "perplexity": q["perplexity"]["perplexity"],
                        "accuracy": q["tasks"]["lambada_wiki"]["acc"]})  # fmt: skip
    return out


def _spread(run: dict) -> list[float]:
    d = run["decode_tokens_per_s"]
    return [round(d["p10"], 1), round(d["p90"], 1)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", type=Path, default=None, help="work folder (default out/frontier/<model>)")
    p.add_argument("--sparsities", default="0.5,0.6,0.7", type=arg_list(float, least=0))
    p.add_argument("--no-recover", dest="recover", action="store_false")
    p.add_argument(
        "--precisions",
        default="fp32,int8",
        type=_precisions,
        help="precisions of the sparse deployments: fp32, int8, int8-keepN (int8 with --keep-fp32-worst N; adds "
        "its dense row); dense fp32 and int8 are always built: the references",
    )
    p.add_argument("--recover-args", default="", help="extra options for owl-deploy recover (quoted)")
    p.add_argument(
        "--allocation",
        choices=("tuned", "owl", "uniform"),
        default="tuned",
        help="tuned: the pipeline default (owl-deploy tune's choice per sparsity)",
    )
    p.add_argument("--pruned", action="append", default=[], metavar="S=DIR", help="reuse a pruned model at S")
    p.add_argument("--recovered", action="append", default=[], metavar="S=DIR", help="reuse a recovered model at S")
    p.add_argument("--deployment", action="append", default=[], metavar="NAME=ODIR", help="reuse a deployment")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows of the prune")
    p.add_argument("--sequence-length", type=positive_int, default=512)
    p.add_argument("--eval-tokens", type=positive_int, default=16384)
    p.add_argument("--limit", type=positive_int, default=200, help="lambada_wiki items (≈0.4 s each in ONNX Runtime)")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--peer", action="append", default=[], metavar="ENGINE/LABEL=PATH")
    p.add_argument(
        "--peers-quality",
        type=Path,
        default=None,
        help="benchmarks/peers.py's JSON with the peers' perplexity [benchmarks/results/peers-<model>.json]",
    )
    p.add_argument(
        "--bench-skip",
        action="append",
        default=[],
        metavar="ENGINE/NAME",
        help="leave a run out of the bench (e.g. ds/dense when the machine cannot hold every engine at once)",
    )
    p.add_argument(
        "--bench-groups",
        type=positive_int,
        default=1,
        metavar="N",
        help="split the DeepSparse runs and peers into N interleaved runs, each with the ONNX Runtime references "
        "and DeepSparse dense int8 (fewer engines in memory at once; ratios stay within a run)",
    )
    p.add_argument("--out-stem", default=None, help="results stem [frontier-<model>]")
    a = p.parse_args(argv)
    if not all(0 < x < 1 for x in a.sparsities):
        p.error(f"--sparsities: each must be between 0 and 1 (exclusive), got {a.sparsities}")
    name = Path(a.model).name
    work = a.work or ROOT / "out" / "frontier" / name
    t0 = time.perf_counter()
    rows = plan(a.sparsities, a.recover, a.precisions)
    skippable = {"ds/dense", *(f"ds/{r['name']}" for r in rows if r["source"].startswith("pruned"))}
    bad = [e for e in a.bench_skip if e not in skippable]
    if bad:  # the two ONNX Runtime references are what every ratio divides by
        raise SystemExit(f"--bench-skip {bad[0]}: not a DeepSparse run of this frontier; use one of "
                         f"{', '.join(sorted(skippable))}")  # fmt: skip
    folders, allocations = build(a, work, rows)
    qual = {n: quality(a, work, n, f) for n, f in folders.items()}
    res_bench = bench(a, work, folders)
    peers_file = a.peers_quality or RESULTS / f"peers-{name}.json"
    if a.peers_quality is not None and not peers_file.is_file():  # read last: it may be made while this runs
        raise SystemExit(f"--peers-quality {peers_file}: no such file (every step done is kept; re-run)")
    peers_quality = {}
    if peers_file.exists():
        pq = json.loads(peers_file.read_text())
        if pq.get("eval_tokens") == a.eval_tokens and pq.get("seqlen") == 512:
            peers_quality = pq["quality"]
    checks = {n: verification(f) for n, f in folders.items()}
    pts = points(rows, qual, res_bench, peers_quality, allocations, checks)
    stem = a.out_stem or f"frontier-{name}"
    res = {
        "model": name,
        "stem": stem,
        "sparsities": a.sparsities,
        "precisions": list(a.precisions),
        "eval_tokens": a.eval_tokens,
        "limit": a.limit,
        "points": pts,
        "untimed": untimed(rows, qual, res_bench),
        "answers": answers(pts),
        "versus_dense_int8": versus_dense_int8(pts),
        "allocations": allocations,
        "bench_groups": res_bench.get("groups", 1),
        "bench_noisy": res_bench["noise"]["noisy"],
        "bench_other_cpu": res_bench["noise"].get("other_cpu_mean", 0.0),
        "loadavg_before": res_bench["noise"]["loadavg_before"],
        "minutes": (time.perf_counter() - t0) / 60,
        "argv": sys.argv[1:],
        "hardware": hardware_info(measure_bandwidth=False),
        "versions": versions_info(),
    }
    md = markdown(res)
    write_report(RESULTS / stem, res, md)
    plot(res, RESULTS / f"{stem}.png")
    print(md)


if __name__ == "__main__":
    main()
