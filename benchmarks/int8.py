#!/usr/bin/env python
"""Sparse int8 in DeepSparse vs dense fp32 and dense int8 in ONNX Runtime: speed and quality, measured.

One command, end to end (run it alone on the machine):

    .venv/bin/python benchmarks/int8.py                # SmolLM2-135M, OWL+Wanda 70 %
    .venv/bin/python benchmarks/int8.py --quick        # small calibration, short evaluation and timing

1. prunes the model with OWL + Wanda (or takes ``--sparse HF_FOLDER``),
2. exports four deployments with ``owl-deploy export``: dense and sparse, each in fp32 and in int8
   (``--quantize int8``: MatMulInteger pattern, SmoothQuant, static activation scales from the
   calibration text; folders are reused when the same command made them),
3. scores every deployment's perplexity on the *exported ONNX graph* (ONNX Runtime; DeepSparse too
   for the int8 ones, on a shorter slice), and reads the 32 greedy tokens of each export's check,
4. benchmarks decode in one interleaved run: sparse int8 and sparse fp32 in DeepSparse, dense fp32 and
   dense int8 in ONNX Runtime (plus dense int8 in DeepSparse), with the bytes-per-token ceilings.

Writes ``benchmarks/results/int8-<model>.{json,md}`` and the benchmark's own folder
``benchmarks/results/int8-<model>/`` (results.json, results.md, decode.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep  # noqa: E402  (its owl-deploy runner and reuse stamps)

from owl_deploy.bench import run_benchmark  # noqa: E402
from owl_deploy.bench.report import write_results  # noqa: E402
from owl_deploy.cli_options import positive_int  # noqa: E402
from owl_deploy.configs import BenchConfig, EvalConfig  # noqa: E402
from owl_deploy.contract import MODEL_ONNX  # noqa: E402
from owl_deploy.io import atomic_file, write_json  # noqa: E402

VARIANTS = ("dense-fp32", "dense-int8", "sparse-fp32", "sparse-int8")
#: benchmark label of each deployment (bench's reference is ort/dense, its headline ds/sparse)
LABELS = {"dense-fp32": "dense", "dense-int8": "dense-int8", "sparse-fp32": "sparse-fp32", "sparse-int8": "sparse"}
RUNS = [
    ("onnxruntime", "dense"),
    ("onnxruntime", "dense-int8"),
    ("deepsparse", "sparse"),
    ("deepsparse", "sparse-fp32"),
    ("deepsparse", "dense-int8"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="asset name or Hugging Face folder [smollm2-135m]")
    p.add_argument("--sparse", default=None, help="pruned HF folder to use instead of pruning here")
    p.add_argument("--sparsity", type=float, default=0.7, help="OWL+Wanda target when pruning here [0.7]")
    p.add_argument("--nsamples", type=positive_int, default=None, help="pruning calibration windows [prune's default]")
    p.add_argument("--export-arg", action="append", default=[], help="extra option for the int8 exports")
    p.add_argument(
        "--eval-tokens", type=positive_int, default=16384, help="first N tokens of wiki for perplexity [16384]"
    )
    p.add_argument("--ds-eval-tokens", type=positive_int, default=4096, help="same, scored by DeepSparse [4096]")
    p.add_argument("--seqlen", type=positive_int, default=512, help="perplexity window [512]")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--steps", type=positive_int, default=32)
    p.add_argument("--context", type=positive_int, default=128)
    p.add_argument("--no-kv-compare", action="store_true", help="skip the DeepSparse internal/external KV-cache runs")
    p.add_argument("--prompt", default="The capital of France is", help="prompt of the per-deployment compile check")
    p.add_argument("--work", type=Path, default=None, help="pruned and exported models [out/int8[-MODEL]]")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 calibration windows, 1024 eval tokens, 2 rounds")
    a = p.parse_args(argv)
    if a.work is None:
        a.work = ROOT / "out" / ("int8" if a.model == "smollm2-135m" else f"int8-{Path(a.model).name}")
    if a.quick:
        a.nsamples = a.nsamples or 8
        a.eval_tokens, a.ds_eval_tokens, a.rounds, a.steps = 1024, 512, 2, 8
    return a


def prepare(a: argparse.Namespace) -> tuple[dict[str, Path], dict]:
    """The pruned model and the four exports (reused when the same command made them), with the
    wall time and peak RSS of each prune/export command."""
    stages: dict = {"prune": None, "export": {}}
    a.work.mkdir(parents=True, exist_ok=True)
    dense_src = sweep.base_model(a.model)
    if a.sparse:
        sparse_src = str(Path(a.sparse).resolve())
    else:
        pdir = a.work / f"prune-owl-wanda-s{round(a.sparsity * 100)}"
        pargs = ["prune", "--model", dense_src, "--method", "wanda", "--allocation", "owl"]
        pargs += ["--sparsity", f"{a.sparsity:.2f}", "--out", str(pdir)]
        if a.nsamples:
            pargs[-2:-2] = ["--nsamples", str(a.nsamples)]
        stages["prune"] = sweep.run_once(pdir, "sparsity.json", pargs)
        sparse_src = str(pdir)
    out = {}
    for variant in VARIANTS:
        src = dense_src if variant.startswith("dense") else sparse_src
        odir = a.work / variant
        eargs = ["export", "--model", src, "--out", str(odir)]
        if variant.endswith("int8"):
            eargs[-2:-2] = ["--quantize", "int8", *a.export_arg]
        stages["export"][variant] = sweep.run_once(odir, MODEL_ONNX, eargs)
        out[variant] = odir
    return out, stages


def compile_checks(a: argparse.Namespace, folders: dict[str, Path]) -> dict:
    """Each deployment compiled on its own in a fresh process (``owl-deploy generate``, 16 tokens):
    wall time and peak RSS of load + compile + generate, and the text it produced."""
    out = {}
    for variant, odir in folders.items():
        for engine in ("deepsparse", "onnxruntime") if variant.startswith("dense") else ("deepsparse",):
            args = ["generate", "--model", str(odir), "--engine", engine, "--prompt", a.prompt]
            r = sweep.owl([*args, "--max-new-tokens", "16", "--no-stats"], capture=True)
            out[f"{engine}/{variant}"] = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "text": r["stdout"]}
    return out


def quality(a: argparse.Namespace, folders: dict[str, Path]) -> dict:
    from owl_deploy.evaluate import evaluate_model

    out = {}
    for variant, odir in folders.items():
        entry = {}
        for engine, tokens in (("onnxruntime", a.eval_tokens), ("deepsparse", a.ds_eval_tokens)):
            if (engine == "deepsparse" and not variant.endswith("int8")) or not tokens:
                continue
            sweep.log(f"perplexity of {variant} in {engine} on {tokens} tokens")
            ppl = evaluate_model(str(odir), EvalConfig(text="wiki", seqlen=a.seqlen, max_tokens=tokens), engine=engine)
            entry[engine] = ppl.to_json()
        report = json.loads((odir / "export.json").read_text())
        entry["greedy"] = report["greedy"]
        entry["zeros"] = {k: report["zeros"][k] for k in ("zeros_preserved", "total_torch_zeros", "total_onnx_zeros")}
        entry["zeros"]["extra_onnx_zeros"] = report["zeros"].get("extra_onnx_zeros")
        entry["int8"] = (
            None if report.get("int8") is None else {k: v for k, v in report["int8"].items() if k != "layers"}
        )
        entry["export_ok"] = report["ok"]
        entry["logits"] = report["logits"]["engines"]
        out[variant] = entry
    return out


def decode_text(model_dir: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(ids)


def markdown(res: dict) -> str:
    q, head, runs = res["quality"], res["bench"]["headline"], res["bench"]["runs"]
    rel = res["relative_ppl_int8"]
    lines = [
        f"# Sparse int8: {res['model']}",
        "",
        f"Generated by `benchmarks/int8.py` in {res['wall_seconds'] / 60:.1f} min. Sparse = OWL+Wanda "
        f"{res['sparsity']:.0%}. int8 = MatMulInteger pattern, SmoothQuant α={res['int8']['smooth_alpha']}, "
        f"lm_head {'int8' if res['int8']['lm_head'] else 'fp32'}, fp32 kept: {res['int8']['keep_fp32'] or 'none'}; "
        f"activation scales from {res['int8']['calibration']['nsamples']}×{res['int8']['calibration']['seqlen']} "
        f"tokens of `{res['int8']['calibration']['text']}`.",
        "",
        "## Decode speed (one interleaved run)",
        "",
        f"**{head['run']}: {head['decode_tokens_per_s']:.1f} tok/s = {head['speedup_vs_dense_ort']:.2f}x dense fp32 "
        f"ONNX Runtime** (bytes-per-token ceiling {head['ceiling_speedup_bytes']:.2f}x) and "
        f"**{head.get('speedup_vs_second_reference') or float('nan'):.2f}x dense int8 ONNX Runtime** "
        f"(ceiling {head.get('ceiling_speedup_bytes_vs_second_reference') or float('nan'):.2f}x).",
        "",
        "| run | decode tok/s median (p10–p90) | vs dense fp32 ORT | ceiling tok/s |",
        "|---|---:|---:|---:|",
    ]
    for key, r in runs.items():
        d = r["decode_tokens_per_s"]
        ceil = f"{r['ceiling_tokens_per_s']:.0f}" if r.get("ceiling_tokens_per_s") else "—"
        lines.append(
            f"| {key} | {d['median']:.1f} ({d['p10']:.1f}–{d['p90']:.1f}) | {r['speedup_vs_dense_ort']:.2f}x | {ceil} |"
        )
    kv = res["kv_cache_comparison"]
    if kv:
        lines += ["", "DeepSparse KV cache, sparse int8, two short runs each against dense fp32 ORT:", ""]
    for mode, r in kv.items():
        d = r["decode_tokens_per_s"]
        lines.append(
            f"- {mode}: {d['median']:.1f} tok/s ({d['p10']:.1f}–{d['p90']:.1f}), "
            f"{r['speedup_vs_dense_ort']:.2f}x dense fp32 ORT{' (noisy)' if r['noise'] else ''}"
        )
    lines += [
        "",
        f"## Perplexity of the exported ONNX graphs (`wiki`, windows of {res['seqlen']})",
        "",
        "| deployment | ONNX Runtime | DeepSparse | int8 vs fp32 (ORT) | greedy tokens = torch fp32 (first n) |",
        "|---|---:|---:|---:|---|",
    ]
    for v in VARIANTS:
        e = q[v]
        ds = e.get("deepsparse")
        ds_txt = f"{ds['perplexity']:.2f} ({ds['tokens']} tok)" if ds else "—"
        r = f"{rel[v.split('-')[0]]:+.1%}" if v.endswith("int8") else ""
        g = e["greedy"]
        match = g.get("matching_prefix_vs_torch") or {
            k: (g["num_tokens"] if t == g["torch"] else "differ") for k, t in g["engines"].items()
        }
        lines.append(
            f"| {v} | {e['onnxruntime']['perplexity']:.2f} ({e['onnxruntime']['tokens']} tok) | {ds_txt} | {r} | "
            + ", ".join(f"{k}: {n}" for k, n in match.items())
            + " |"
        )
    lines += ["", "## Greedy continuations of “The capital of France is” (32 tokens)", ""]
    for v in VARIANTS:
        g = res["greedy_text"][v]
        for k, text in g.items():
            lines.append(f"- {v} / {k}: `{text!r}`")
    lines += stage_markdown(res.get("stages"))
    lines += ["", f"Benchmark details: `{res['bench_dir']}/results.md`.", ""]
    return "\n".join(lines)


def stage_markdown(stages: dict | None) -> list[str]:
    """Wall time and peak RSS of each command that made or compiled a deployment."""
    if not stages:
        return []
    rows = [("prune (OWL+Wanda)", stages.get("prune"))]
    rows += [(f"export {v}", s) for v, s in stages.get("export", {}).items()]
    rows += [(f"compile + 16-token generate: {k}", s) for k, s in stages.get("compile", {}).items()]
    lines = ["", "## Cost of each stage (one process each: wall time, peak RSS)", "", "| stage | wall | peak RSS |"]
    lines.append("|---|---:|---:|")
    for name, s in rows:
        cell = f"{s['seconds']:.0f} s | {s['peak_rss_mb'] / 1024:.1f} GB" if s else "not recorded (reused) | —"
        lines.append(f"| {name} | {cell} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    folders, stages = prepare(a)
    stages["compile"] = compile_checks(a, folders)
    qual = quality(a, folders)
    labels = {LABELS[v]: folders[v] for v in VARIANTS}
    res_bench = run_benchmark(labels, RUNS, BenchConfig(context=a.context, steps=a.steps, rounds=a.rounds))
    name = Path(a.model).name if Path(a.model).exists() else a.model
    bench_dir = a.results / f"int8-{name}{'-quick' if a.quick else ''}"
    write_results(res_bench, bench_dir)
    # DeepSparse's internal KV cache (the runtime's default) against feeding the cache in and out
    kv = {}
    for mode in () if a.no_kv_compare else ("external", "internal"):
        sweep.log(f"KV-cache comparison: DeepSparse {mode}")
        one = run_benchmark(
            {"sparse": folders["sparse-int8"], "dense": folders["dense-fp32"]},
            [("onnxruntime", "dense"), ("deepsparse", "sparse")],
            BenchConfig(context=a.context, steps=a.steps, rounds=max(2, a.rounds // 2), kv_cache=mode),
        )
        r = one["runs"]["deepsparse/sparse"]
        kv[mode] = {
            "decode_tokens_per_s": r["decode_tokens_per_s"],
            "speedup_vs_dense_ort": r["speedup_vs_dense_ort"],
            "kv_cache": r["kv_cache"],
            "noise": one["noise"]["noisy"],
        }
    greedy_text = {}
    for v in VARIANTS:
        g = qual[v]["greedy"]
        greedy_text[v] = {"torch": decode_text(folders[v], g["torch"])} | {
            k: decode_text(folders[v], t) for k, t in g["engines"].items()
        }
    rel = {
        kind: qual[f"{kind}-int8"]["onnxruntime"]["perplexity"] / qual[f"{kind}-fp32"]["onnxruntime"]["perplexity"] - 1
        for kind in ("dense", "sparse")
    }
    res = {
        "model": name,
        "sparsity": a.sparsity,
        "seqlen": a.seqlen,
        "argv": sys.argv[1:],
        "wall_seconds": time.perf_counter() - t0,
        "int8": qual["sparse-int8"]["int8"],
        "quality": qual,
        "relative_ppl_int8": rel,
        "greedy_text": greedy_text,
        "bench_dir": str(bench_dir.relative_to(ROOT)) if bench_dir.is_relative_to(ROOT) else str(bench_dir),
        "bench": {k: res_bench[k] for k in ("headline", "runs", "noise", "hardware", "versions", "settings")},
        "kv_cache_comparison": kv,
        "stages": stages,
    }
    stem = a.results / f"int8-{name}{'-quick' if a.quick else ''}"
    write_json(stem.parent / f"{stem.name}.json", res)
    with atomic_file(stem.parent / f"{stem.name}.md") as fh:
        fh.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
