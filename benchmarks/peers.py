#!/usr/bin/env python
"""What users run instead of our deployments — llama.cpp on a GGUF and the standard ONNX Runtime export —
prepared from the same model, scored on the same text, and (optionally) timed beside our deployments.

    .venv/bin/pip install -e '.[peers]'                       # once: llama-cpp-python (source build), ...
    .venv/bin/python benchmarks/peers.py                      # SmolLM2-135M: prepare + perplexity
    .venv/bin/python benchmarks/peers.py --bench --dense ODIR --sparse ODIR --deployment dense-int8=ODIR
                                                              # + the interleaved benchmark (run it alone!)
    .venv/bin/python benchmarks/peers.py --quick --bench --dense ODIR   # smoke: 2048 tokens, a few steps

1. prepares the peers of ``--model`` (asset name or HF folder) under ``--work`` with ``owl_deploy.peers``:
   llama.cpp GGUF f32 (llama.cpp's converter), q8_0 and q4_k_m (``llama_model_quantize``); the standard
   ONNX Runtime export (optimum's text-generation-with-past contract + ONNX Runtime's transformer
   optimizer) in fp32 and int8 (``quantize_dynamic``).  Folders are reused while the model is unchanged.
2. scores the perplexity of the HF model in torch (fp32, the quality reference), of every peer, and of
   every deployment folder given (``--dense/--sparse/--deployment``, scored on its ONNX graph in ONNX
   Runtime) on the first ``--eval-tokens`` tokens of ``wiki`` in windows of ``--seqlen`` — the windows
   of ``owl-deploy eval --max-tokens N --seqlen 512``; each window from an empty cache in every engine.
3. with ``--bench``: one interleaved ``owl_deploy.bench`` run of the deployments and every peer, with the
   same protocol and threads; every ratio also against the strongest (fastest) peer.

Writes ``benchmarks/results/peers-<model>.{json,md}`` (``-quick`` with ``--quick``) and, with ``--bench``,
the benchmark folder ``benchmarks/results/peers-<model>-bench/`` (results.json, results.md, decode.png).
``--no-quality`` without ``--bench`` only prepares the peers and prints their folders: it writes no report,
so it never replaces a recorded one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owl_deploy import peers  # noqa: E402
from owl_deploy.bench.measure import REFERENCE, run_key  # noqa: E402
from owl_deploy.cli_options import positive_int  # noqa: E402
from owl_deploy.errors import OwlError  # noqa: E402
from owl_deploy.io import atomic_file, write_json  # noqa: E402

SCHEMA = "owl_deploy.peers/1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="asset name or Hugging Face folder [smollm2-135m]")
    p.add_argument("--peers", default=",".join(peers.DEFAULT_PEERS), help="comma list of ENGINE/VARIANT [all five]")
    p.add_argument("--work", type=Path, default=None, help="prepared peers [out/peers/<model>]")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="report folder")
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="first N tokens of wiki [16384; quick: 2048]")
    p.add_argument("--seqlen", type=positive_int, default=512, help="perplexity window [512]")
    p.add_argument("--text", default="wiki", help="evaluation text [wiki]")
    p.add_argument("--threads", type=positive_int, default=None, help="cores per engine [every physical core]")
    p.add_argument("--no-torch", action="store_true", help="skip the torch fp32 reference perplexity")
    p.add_argument(
        "--no-quality",
        action="store_true",
        help="skip every perplexity (prepare, and --bench only; without --bench no report is written)",
    )
    p.add_argument("--dense", default=None, help="our dense fp32 deployment folder (the benchmark's reference)")
    p.add_argument("--sparse", default=None, help="our sparse deployment folder (the benchmark's headline)")
    p.add_argument("--deployment", action="append", default=[], metavar="LABEL=ODIR", help="another deployment")
    p.add_argument("--bench", action="store_true", help="also run the interleaved decode benchmark (run it alone)")
    p.add_argument(
        "--engines",
        default=None,
        help="our runs to time, e.g. ds/sparse,ds/dense-int8,ort/dense [every deployment in ORT + DeepSparse on "
        "--sparse]; dense ORT, the reference, is always timed",
    )
    p.add_argument("--context", type=positive_int, default=None, help="cached tokens before timing [128; quick: 16]")
    p.add_argument("--steps", type=positive_int, default=None, help="decode steps per round [32; quick: 4]")
    p.add_argument("--rounds", type=positive_int, default=None, help="timed rounds [5; quick: 1]")
    p.add_argument("--strict", action="store_true", help="benchmark: exit 4 without writing when the machine is noisy")
    p.add_argument("--quick", action="store_true", help="smoke run: 2048 eval tokens; benchmark of a few steps")
    a = p.parse_args(argv)
    q = a.quick
    a.eval_tokens = a.eval_tokens or (2048 if q else 16384)
    a.context = a.context or (16 if q else 128)
    a.steps = a.steps or (4 if q else 32)
    a.rounds = a.rounds or (1 if q else 5)
    a.peer_list = [k.strip() for k in a.peers.split(",") if k.strip()]
    a.deployments = {}
    for label, folder in (("dense", a.dense), ("sparse", a.sparse)):
        if folder:
            a.deployments[label] = Path(folder)
    for item in a.deployment:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            p.error(f"--deployment {item!r}: expected LABEL=ODIR")
        a.deployments[label] = Path(folder)
    if a.bench and "dense" not in a.deployments:
        p.error("--bench needs --dense ODIR: every speedup is relative to dense fp32 ONNX Runtime on our graph")
    return a


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_name(spec: str) -> str:
    return Path(spec).name if ("/" in spec or Path(spec).exists()) else spec


def paired(nll: list[float], ref: list[float]) -> dict[str, float]:
    """Mean per-window NLL difference against the reference and its standard error (same windows)."""
    from owl_deploy.evaluate import paired_nll

    mean, se = paired_nll(nll, ref)
    return {"delta_nll": mean, "delta_nll_se": se}


def quality(a: argparse.Namespace, model_dir: Path, prepared: dict[str, Path]) -> dict[str, dict]:
    """Perplexity of torch fp32, every peer and every deployment on the same windows."""
    from owl_deploy.configs import EvalConfig
    from owl_deploy.data import eval_tokens
    from owl_deploy.evaluate import evaluate_model, perplexity, torch_logits_fn
    from owl_deploy.model import load_causal_lm, load_tokenizer

    tokens = eval_tokens(load_tokenizer(model_dir), a.text, a.eval_tokens)
    rows: dict[str, dict] = {}
    if not a.no_torch:
        log(f"torch fp32 on {len(tokens)} tokens of {a.text}")
        rows["torch/fp32"] = perplexity(torch_logits_fn(load_causal_lm(model_dir)), tokens, a.seqlen).to_json(full=True)
    for key, folder in prepared.items():
        engine, _ = peers.split_key(key)
        log(f"{key} on {len(tokens)} tokens of {a.text}")
        fn = peers.peer_logits_fn(engine, folder, a.seqlen, a.threads)
        rows[key] = perplexity(fn, tokens, a.seqlen).to_json(full=True)
        rows[key]["artifact_bytes"] = peers.artifact(folder).stat().st_size
        del fn
    for label, odir in a.deployments.items():
        log(f"our deployment {label} ({odir}) in ONNX Runtime")
        cfg = EvalConfig(text=a.text, seqlen=a.seqlen, max_tokens=a.eval_tokens)
        rows[f"onnxruntime/{label}"] = evaluate_model(str(odir), cfg, threads=a.threads).to_json(full=True)
    ref = rows.get("torch/fp32")
    for row in rows.values():
        if ref is not None and len(row["window_nll"]) == len(ref["window_nll"]):
            row.update(paired(row["window_nll"], ref["window_nll"]))
            row["relative_ppl_vs_torch_fp32"] = row["perplexity"] / ref["perplexity"] - 1.0
    return rows


def timed_runs(engines: str | None, deployments: dict[str, Path]) -> list[tuple[str, str]]:
    """Our (engine, deployment) runs: ``--engines`` (e.g. the int8 deployments in DeepSparse, where they are
    fast), else every deployment in ONNX Runtime and DeepSparse on the sparse one; dense ORT always."""
    from owl_deploy.bench.measure import parse_engines

    if engines:
        return parse_engines(engines, deployments)
    runs = parse_engines("ort", deployments)
    if "sparse" in deployments:
        runs.append(("deepsparse", "sparse"))
    return runs


def bench(a: argparse.Namespace, prepared: dict[str, Path], name: str) -> tuple[dict, Path]:
    from owl_deploy.bench import NoisyMachine, run_benchmark
    from owl_deploy.bench.peers import load_peers
    from owl_deploy.bench.report import summary_lines, write_results
    from owl_deploy.configs import BenchConfig

    cfg = BenchConfig(
        engines="ort",  # our graphs in ONNX Runtime; DeepSparse on the sparse model below
        context=a.context,
        steps=a.steps,
        rounds=a.rounds,
        threads=a.threads,
        strict=a.strict,
    )
    runs = timed_runs(a.engines, a.deployments)
    targets = load_peers(prepared, cfg)
    try:
        res = run_benchmark(a.deployments, runs, cfg, log=log, peers=targets)
    except NoisyMachine as exc:
        sys.exit(f"peers: {exc}")
    if a.strict and res["noise"]["noisy"]:
        sys.exit("peers: machine was noisy (--strict), results not written: " + "; ".join(res["noise"]["reasons"]))
    out = a.results / f"peers-{name}{'-quick' if a.quick else ''}-bench"
    write_results(res, out)
    for line in summary_lines(res):
        log(line)
    return res, out


def markdown(res: dict) -> str:
    q = res["quality"]
    lines = [
        f"# Peers: {res['model']}",
        "",
        f"Generated by `benchmarks/peers.py` in {res['wall_seconds'] / 60:.1f} min on {res['cpu']}. "
        + (
            f"Perplexity on the first {res['eval_tokens']} tokens of `{res['text']}` in {res['windows']} windows of "
            f"{res['seqlen']} (each from an empty cache; the windows of `owl-deploy eval`). Δ NLL is the mean "
            "per-window difference to torch fp32 ± its standard error."
            if q
            else "No perplexity in this run (--no-quality)."
        ),
        "",
        "| model / peer | perplexity | Δ ppl vs torch fp32 | Δ NLL (± se) | file | how it was made |",
        "|---|---:|---:|---:|---:|---|",
    ]
    order = sorted(q, key=lambda k: (not k.startswith("torch/"), not k.startswith("onnxruntime/"), k))
    for key in order:  # the reference, our graphs, then the peers
        row = q[key]
        prep = res["prepared"].get(key) or {}
        rel = row.get("relative_ppl_vs_torch_fp32")
        dn, se = row.get("delta_nll"), row.get("delta_nll_se")
        size = row.get("artifact_bytes") or prep.get("bytes")
        lines.append(
            f"| {key} | {row['perplexity']:.3f} | {f'{rel:+.2%}' if rel is not None else '—'} | "
            f"{f'{dn:+.5f} ± {se:.5f}' if dn is not None else '—'} | "
            f"{f'{size / 1e6:.1f} MB' if size else '—'} | {prep.get('tool', '—')} |"
        )
    for key, prep in res["prepared"].items():
        if prep.get("tensor_types"):
            kinds = ", ".join(f"{k} {n}" for k, n in prep["tensor_types"].items())
            note = f" ({prep['fallback']})" if prep.get("fallback") else ""
            lines += ["", f"{key} tensors by type: {kinds}{note}"]
    lines += [
        "",
        "The source model was dequantized from the asset's GGUF (its weights were 4-bit before we see them); the "
        "peers are requantized from that fp32 folder. optimum itself does not install beside transformers 5 "
        "(optimum-onnx 0.1.0 pins transformers<4.58); the standard export reproduces its contract (see "
        "`owl_deploy/peers.py`).",
    ]
    b = res.get("bench")
    if b:
        head = b.get("headline") or {}
        lines += ["", "## Decode benchmark (one interleaved run)", ""]
        if b["noise"]["noisy"]:
            lines += ["**NOISY RUN**: " + "; ".join(b["noise"]["reasons"]), ""]
        if b.get("strongest_peer"):
            lines += [f"Strongest peer: **{b['strongest_peer']}**.", ""]
        if head:
            lines += [
                f"{head['run']}: {head['speedup_vs_dense_ort']:.2f}x {head['reference']}"
                + (
                    f", {head['speedup_vs_strongest_peer']:.2f}x {head['strongest_peer']}"
                    if head.get("strongest_peer")
                    else ""
                ),
                "",
            ]
        lines += ["| run | decode tok/s | vs dense ORT | vs strongest peer | perplexity |", "|---|---:|---:|---:|---:|"]
        for key, r in b["runs"].items():
            ppl = (q.get(key) or {}).get("perplexity")
            vs = r.get("speedup_vs_strongest_peer")
            lines.append(
                f"| {key} | {r['decode_tokens_per_s']['median']:.2f} | {r['speedup_vs_dense_ort']:.3f}x | "
                f"{f'{vs:.3f}x' if vs is not None else '—'} | {f'{ppl:.3f}' if ppl else '—'} |"
            )
        lines += ["", f"Full report: `{res['bench_dir']}/results.md`."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    from owl_deploy.bench.machine import hardware_info, versions_info
    from owl_deploy.specs import resolve_model
    from owl_deploy.versions import package_versions

    try:
        model_dir = resolve_model(a.model)
        name = model_name(a.model)
        work = a.work or ROOT / "out" / "peers" / name
        prepared = peers.prepare_peers(model_dir, work, a.peer_list, threads=a.threads, log=log)
        qual = {} if a.no_quality else quality(a, model_dir, prepared)
        bench_res, bench_dir = bench(a, prepared, name) if a.bench else (None, None)
    except OwlError as exc:
        sys.exit(f"peers: {exc}")
    if not qual and bench_res is None:
        # --no-quality without --bench only prepares: a report with nothing measured must not replace a recorded one
        for key, folder in prepared.items():
            print(f"{key}: {folder}")
        return
    first = next(iter(qual.values()), {})
    res = {
        "schema": SCHEMA,
        "model": name,
        "source": str(model_dir),
        "text": a.text,
        "eval_tokens": first.get("tokens"),
        "seqlen": a.seqlen,
        "windows": first.get("windows"),
        "threads": a.threads,
        "argv": sys.argv[1:] if argv is None else argv,
        "wall_seconds": time.perf_counter() - t0,
        "cpu": hardware_info(measure_bandwidth=False, deepsparse_view=False)["cpu_model"],
        "prepared": {k: peers.read_peer_json(f) or {} for k, f in prepared.items()},
        "quality": qual,
        "versions": versions_info() | package_versions(("llama_cpp_python", "gguf", "onnxruntime")),
    }
    if bench_res is not None:
        res["bench_dir"] = str(bench_dir.relative_to(ROOT)) if bench_dir.is_relative_to(ROOT) else str(bench_dir)
        keep = ("headline", "runs", "peers", "strongest_peer", "peer_agreement", "noise", "hardware", "settings")
        res["bench"] = {k: bench_res.get(k) for k in keep}
    stem = a.results / f"peers-{name}{'-quick' if a.quick else ''}"
    write_json(stem.parent / f"{stem.name}.json", res)
    with atomic_file(stem.parent / f"{stem.name}.md") as fh:
        fh.write(markdown(res))
    print(markdown(res))
    reference = run_key(*REFERENCE)
    if bench_res is not None and reference not in bench_res["runs"]:
        sys.exit(f"peers: the reference run {reference} is missing from the benchmark")


if __name__ == "__main__":
    main()
