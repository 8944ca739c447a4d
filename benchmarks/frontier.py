#!/usr/bin/env python
"""The speed/quality frontier: which deployment of a model is the fastest at the quality a user accepts?

For one model: dense fp32 and int8, and OWL+Wanda at each ``--sparsities`` × {pruned, recovered} ×
{fp32, int8}, each measured as it deploys:

* quality of the **exported graph** (ONNX Runtime: exact for fp32 and the reference for int8, whose
  multi-token DeepSparse kernels are inexact): perplexity on the first ``--eval-tokens`` of ``wiki`` and
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

    .venv/bin/python benchmarks/frontier.py --model smollm2-135m --work out/frontier/smollm2-135m \\
        --peer llama.cpp/q8_0=out/peers/smollm2-135m/llama.cpp-q8_0 \\
        --peer llama.cpp/q4_k_m=out/peers/smollm2-135m/llama.cpp-q4_k_m

Writes benchmarks/results/frontier-<model>.{json,md,png} and, per model, the one-line answer: the fastest
deployment within +10% / +25% perplexity of dense fp32, against dense fp32 and dense int8 ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owl_deploy.bench.machine import hardware_info, versions_info  # noqa: E402
from owl_deploy.io import atomic_file, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CLI = [str(Path(sys.executable).with_name("owl-deploy"))]
BUDGETS = (0.10, 0.25)


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


def plan(sparsities: list[float], recover: bool) -> list[dict]:
    """The deployments: name, source model key, precision, sparsity, whether recovered."""
    rows = [{"name": f"dense-{p}", "source": "dense", "precision": p, "sparsity": 0.0, "recovered": False}
            for p in ("fp32", "int8")]  # fmt: skip
    for s in sparsities:
        for rec in (False, True) if recover else (False,):
            for p in ("fp32", "int8"):
                src = f"{'recovered' if rec else 'pruned'}-{round(s * 100)}"
                rows.append({"name": f"{src}-{p}", "source": src, "precision": p, "sparsity": s, "recovered": rec})
    return rows


def build(a: argparse.Namespace, work: Path, rows: list[dict]) -> dict[str, Path]:
    """Prune, recover and export every deployment of ``rows`` (skipping what exists); name -> folder."""
    sources: dict[str, str] = {"dense": a.model}
    for s in a.sparsities:
        pruned = work / "models" / f"pruned-{round(s * 100)}"
        if not pruned.exists():
            sh(["prune", "--model", a.model, "--method", "wanda", "--allocation", "owl", "--sparsity", str(s),
                "--nsamples", str(a.nsamples), "--out", str(pruned)], work / "logs" / f"{pruned.name}.log")  # fmt: skip
        sources[pruned.name] = str(pruned)
        if a.recover:
            rec = work / "models" / f"recovered-{round(s * 100)}"
            if not rec.exists():
                sh(["recover", "--model", str(pruned), "--teacher", a.model, "--out", str(rec),
                    "--eval-tokens", str(a.eval_tokens), *a.recover_args.split()],
                   work / "logs" / f"{rec.name}.log")  # fmt: skip
            sources[rec.name] = str(rec)
    folders = {}
    for r in rows:
        odir = work / "deploy" / r["name"]
        if not odir.exists():
            quant = ["--quantize", "int8"] if r["precision"] == "int8" else []
            sh(["export", "--model", sources[r["source"]], "--out", str(odir), "--sequence-length",
                str(a.sequence_length), *quant], work / "logs" / f"export-{r['name']}.log")  # fmt: skip
        folders[r["name"]] = odir
    return folders


def quality(a: argparse.Namespace, work: Path, name: str, odir: Path) -> dict:
    """Perplexity and accuracy of the exported graph in ONNX Runtime (cached as JSON)."""
    cache = work / "quality" / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    ppl = json.loads(sh(["eval", "--model", str(odir), "--engine", "onnxruntime", "--max-tokens",
                         str(a.eval_tokens), "--json"]))  # fmt: skip
    acc = json.loads(sh(["eval", "--model", str(odir), "--tasks", "lambada_wiki", "--limit", str(a.limit), "--json"]))
    res = {"perplexity": ppl, "tasks": acc["tasks"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache) as fh:
        fh.write(json.dumps(res, sort_keys=True))
    return res


def bench(a: argparse.Namespace, work: Path, folders: dict[str, Path]) -> dict:
    """One interleaved run: DeepSparse on the dense and pruned deployments, ONNX Runtime on dense fp32/int8."""
    out = work / "bench"
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    timed = [n for n in folders if n.startswith(("dense", "pruned"))]
    args = ["bench", "--dense", str(folders["dense-fp32"]), "--out", str(out), "--rounds", str(a.rounds)]
    for n in timed:
        if n != "dense-fp32":
            args += ["--model", f"{n}={folders[n]}"]
    engines = ["ort/dense", "ort/dense-int8", "ds/dense", *(f"ds/{n}" for n in timed if n != "dense-fp32")]
    args += ["--engines", ",".join(engines)]
    for p in a.peer:
        args += ["--peer", p]
    sh(args, work / "logs" / "bench.log")
    return json.loads((out / "results.json").read_text())


def points(rows: list[dict], qual: dict, res: dict, peers_quality: dict) -> list[dict]:
    """One point per deployment (and peer): perplexity, accuracy, decode tok/s and the two ratios."""
    runs = res["runs"]
    ref = runs["onnxruntime/dense"]["decode_tokens_per_s"]["median"]
    ref8 = runs["onnxruntime/dense-int8"]["decode_tokens_per_s"]["median"]
    pts = []
    for r in rows:
        timed_as = r["name"].replace("recovered", "pruned")
        key = "deepsparse/dense" if timed_as == "dense-fp32" else f"deepsparse/{timed_as}"
        tok = runs[key]["decode_tokens_per_s"]["median"]
        q = qual[r["name"]]
        task = q["tasks"]["lambada_wiki"]
        pts.append({**r, "engine": "deepsparse", "perplexity": q["perplexity"]["perplexity"],
                    "accuracy": task["acc"], "accuracy_stderr": task["acc_stderr"], "decode_tokens_per_s": tok,
                    "timed_as": key, "vs_dense_fp32_ort": tok / ref, "vs_dense_int8_ort": tok / ref8})  # fmt: skip
    for name, key, label in (
        ("dense-fp32", "onnxruntime/dense", "ort"),
        ("dense-int8", "onnxruntime/dense-int8", "ort"),
    ):
        tok = runs[key]["decode_tokens_per_s"]["median"]
        q = qual[name]
        pts.append({"name": f"{name} ({label})", "source": "dense", "precision": name.split("-")[1], "sparsity": 0.0,
                    "recovered": False, "engine": "onnxruntime", "perplexity": q["perplexity"]["perplexity"],
                    "accuracy": q["tasks"]["lambada_wiki"]["acc"],
                    "accuracy_stderr": q["tasks"]["lambada_wiki"]["acc_stderr"], "decode_tokens_per_s": tok,
                    "timed_as": key, "vs_dense_fp32_ort": tok / ref, "vs_dense_int8_ort": tok / ref8})  # fmt: skip
    for key in res.get("peers") or {}:
        tok = runs[key]["decode_tokens_per_s"]["median"]
        pts.append({"name": key, "source": "peer", "precision": key.split("/")[1], "sparsity": 0.0, "recovered": False,
                    "engine": key.split("/")[0], "perplexity": (peers_quality.get(key) or {}).get("perplexity"),
                    "accuracy": None, "accuracy_stderr": None, "decode_tokens_per_s": tok, "timed_as": key,
                    "vs_dense_fp32_ort": tok / ref, "vs_dense_int8_ort": tok / ref8})  # fmt: skip
    return pts


def answers(pts: list[dict]) -> list[str]:
    """The fastest deployment within each perplexity budget over dense fp32 (ours, and any peer)."""
    base = next(p["perplexity"] for p in pts if p["name"] == "dense-fp32 (ort)")
    out = []
    for budget in BUDGETS:
        ok = [p for p in pts if p["perplexity"] is not None and p["perplexity"] <= base * (1 + budget)]
        ours = [p for p in ok if p["source"] != "peer"]
        best, overall = (
            max(ours, key=lambda p: p["decode_tokens_per_s"]),
            max(ok, key=lambda p: p["decode_tokens_per_s"]),
        )
        line = (f"within +{budget:.0%} perplexity of dense fp32 ({base:.2f}): the fastest deployment is {best['name']} "
                f"in {best['engine']} (ppl {best['perplexity']:.2f}, {best['decode_tokens_per_s']:.1f} tok/s), at "
                f"{best['vs_dense_fp32_ort']:.2f}x dense fp32 ONNX Runtime and {best['vs_dense_int8_ort']:.2f}x dense "
                "int8 ONNX Runtime")  # fmt: skip
        if overall is not best:
            line += (f"; a peer is faster: {overall['name']} ({overall['decode_tokens_per_s']:.1f} tok/s, "
                     f"ppl {overall['perplexity']:.2f})")  # fmt: skip
        out.append(line)
    return out


def markdown(res: dict) -> str:
    hw = res["hardware"]
    lines = [f"# Frontier: {res['model']}", "",
             f"Generated by `benchmarks/frontier.py` ({res['minutes']:.0f} min) on {hw['cpu_model']} "
             f"({hw['physical_cores']} cores); bench noise: {'NOISY' if res['bench_noisy'] else 'quiet'}, load "
             f"average before {res['loadavg_before']}. Perplexity: the exported graph in ONNX Runtime on the first "
             f"{res['eval_tokens']} tokens of `wiki`; accuracy: `lambada_wiki`, {res['limit']} items; decode: batch "
             "1, median tok/s of one interleaved `owl-deploy bench` run (recovered deployments share their pruned "
             "twin's timing: same zeros, same graph).", ""]  # fmt: skip
    lines += [f"- **{a}**" for a in res["answers"]] + [""]
    lines += ["| deployment | engine | ppl | lambada acc | decode tok/s | vs dense fp32 ORT | vs dense int8 ORT |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in sorted(res["points"], key=lambda p: -p["decode_tokens_per_s"]):
        ppl = f"{p['perplexity']:.2f}" if p["perplexity"] is not None else "—"
        acc = f"{p['accuracy']:.3f} ± {p['accuracy_stderr']:.3f}" if p["accuracy"] is not None else "—"
        lines.append(f"| {p['name']} | {p['engine']} | {ppl} | {acc} | {p['decode_tokens_per_s']:.1f} | "
                     f"{p['vs_dense_fp32_ort']:.2f}x | {p['vs_dense_int8_ort']:.2f}x |")  # fmt: skip
    lines += ["", f"![frontier](frontier-{res['model']}.png)", ""]
    return "\n".join(lines)


def plot(res: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    style = {"deepsparse": ("o", "#d62728"), "onnxruntime": ("s", "#1f77b4"), "llama.cpp": ("^", "#2ca02c")}
    for p in res["points"]:
        if p["perplexity"] is None:
            continue
        marker, color = style.get(p["engine"], ("x", "#7f7f7f"))
        ax.scatter(p["decode_tokens_per_s"], p["perplexity"], marker=marker, color=color,
                   facecolors="none" if p["recovered"] else color)  # fmt: skip
        ax.annotate(p["name"], (p["decode_tokens_per_s"], p["perplexity"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s (batch 1)")
    ax.set_ylabel("perplexity of the exported graph (log)")
    ax.set_title(f"{res['model']} on {res['hardware']['cpu_model']}: up and left is worse", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", type=Path, default=None, help="work folder (default out/frontier/<model>)")
    p.add_argument("--sparsities", default="0.5,0.6,0.7", type=lambda s: [float(x) for x in s.split(",") if x])
    p.add_argument("--no-recover", dest="recover", action="store_false")
    p.add_argument("--recover-args", default="", help="extra options for owl-deploy recover (quoted)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows of the prune")
    p.add_argument("--sequence-length", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--limit", type=int, default=500, help="lambada_wiki items")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peer", action="append", default=[], metavar="ENGINE/LABEL=PATH")
    a = p.parse_args(argv)
    name = Path(a.model).name
    work = a.work or ROOT / "out" / "frontier" / name
    t0 = time.perf_counter()
    rows = plan(a.sparsities, a.recover)
    folders = build(a, work, rows)
    qual = {n: quality(a, work, n, f) for n, f in folders.items()}
    loadavg = [round(x, 2) for x in os.getloadavg()]
    res_bench = bench(a, work, folders)
    peers_file = RESULTS / f"peers-{name}.json"
    peers_quality = {}
    if peers_file.exists():
        pq = json.loads(peers_file.read_text())
        if pq.get("eval_tokens") == a.eval_tokens and pq.get("seqlen") == 512:
            peers_quality = pq["quality"]
    pts = points(rows, qual, res_bench, peers_quality)
    res = {"model": name, "sparsities": a.sparsities, "eval_tokens": a.eval_tokens, "limit": a.limit,
           "points": pts, "answers": answers(pts), "bench_noisy": res_bench["noise"]["noisy"],
           "loadavg_before": loadavg, "minutes": (time.perf_counter() - t0) / 60, "argv": sys.argv[1:],
           "hardware": hardware_info(measure_bandwidth=False), "versions": versions_info()}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"frontier-{name}.json", res)
    with atomic_file(RESULTS / f"frontier-{name}.md") as fh:
        fh.write(markdown(res))
    plot(res, RESULTS / f"frontier-{name}.png")
    print(markdown(res))


if __name__ == "__main__":
    main()
