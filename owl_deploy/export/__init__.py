"""Export a (pruned) Hugging Face causal LM to a deployment folder DeepSparse runs unchanged.

``export_model(model, out)`` writes, atomically (a failed export leaves nothing behind and an
existing folder untouched)::

    out/
      model.onnx              KV-cache decoder graph in DeepSparse's contract (see export/graph.py)
      model.data              external weights, only when they pass ~1.8 GB (protobuf caps at 2 GiB)
      model.ort-s8.data/.json int8 with external weights on a VNNI CPU: ONNX Runtime's re-signed copy of them
                              (written by the verification's ONNX Runtime session, ``ort_int8.companion``)
      config.json, generation_config.json, tokenizer files   what deepsparse.TextGeneration loads
      sparsity.json           copied from the source folder when present
      export.json             the proof: zeros per pruned linear, engine sparsity, logits diffs, timings

The verification in ``export.json`` is always run: zeros counted in torch and in the ONNX file, the
graph compiled in ONNX Runtime and DeepSparse (multi-token prefill + single-token decode with a KV
cache) and compared with torch on real prompts, and DeepSparse's debug analysis read for the
sparsity its kernels detected.  A verification that runs but fails (zeros lost, logits off) still
writes the folder, with ``"ok": false`` in export.json and the reasons in ``"problems"``.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from owl_deploy import memory
from owl_deploy.configs import CalibrationConfig, ExportConfig, QuantizeConfig
from owl_deploy.contract import MODEL_ONNX
from owl_deploy.errors import OwlError
from owl_deploy.export.graph import OPSET, check_sequence_length, export_onnx, graph_spec
from owl_deploy.versions import package_versions, python_version

__all__ = ["export_model"]


def export_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ExportConfig | None = None,
    quantize: QuantizeConfig | None = None,
    calibration: CalibrationConfig | None = None,
    engines: tuple[str, ...] = ("onnxruntime", "deepsparse"),
    log: Callable[[str], None] | None = None,
    max_memory: memory.Limit = None,
) -> dict:
    """Export ``model`` (asset name, HF folder or .gguf) to the deployment folder ``out``; return export.json.

    The verification runs torch and the engines with ``cfg.threads`` threads (default 1): correctness
    does not depend on it, and on a shared 2-core machine two threads that synchronise at every op
    (DeepSparse pins them to cores; OpenMP spins) stall for up to seconds per token while another
    process holds a core.

    ``quantize.scheme="int8"`` (see export/int8.py): activation ranges from ``calibration.text`` (seed
    ``calibration.seed``), SmoothQuant folded into the torch model (same function), projections rewritten
    to the MatMulInteger pattern.  The engines are then checked against each other on the same int8 graph
    (DeepSparse vs ONNX Runtime); their distance to the fp32 torch model is the quantization error,
    recorded, not a failure.
    """
    from owl_deploy import runtime
    from owl_deploy.configs import ENGINES
    from owl_deploy.export import verify
    from owl_deploy.io import atomic_dir, write_json
    from owl_deploy.specs import load_model, resolve_model

    cfg = cfg or ExportConfig()
    quantize = quantize or QuantizeConfig()
    calibration = calibration or CalibrationConfig()
    int8 = quantize.scheme == "int8"
    say = log or (lambda _msg: None)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise OwlError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    out = Path(out).expanduser()
    source = resolve_model(model)
    if out.resolve() == Path(source).resolve() or Path(source).resolve() in out.resolve().parents:
        raise OwlError(f"--out {out} must not be the model folder or inside it")
    sequence_length, threads = cfg.sequence_length, cfg.threads
    prefill = cfg.prefill_length if cfg.prefill_length < sequence_length else 1
    # DeepSparse's prefill and decode graphs each hold the weights: where both do not fit (fp32), check them
    # one at a time, each on what it can run alone (see _deepsparse_one_graph_at_a_time)
    separate = False
    shape = memory.model_shape(source)
    if shape is not None:
        graphs = len(runtime.prefill_cascade(prefill)) if "deepsparse" in engines else 1
        full = memory.export_estimate(shape, int8, graphs)
        one = memory.export_estimate(shape, int8, 1)
        separate = graphs > 1 and not int8 and not memory.fits(full, max_memory) and memory.fits(one, max_memory)
        memory.check(one if separate else full, max_memory)
        if separate:
            say(f"memory: checking DeepSparse's graphs one at a time (all at once: about {full.describe()})")

    timings: dict[str, float] = {}
    phases = memory.Phases()
    start = time.perf_counter()
    hf_model, tokenizer = load_model(source)
    timings["load_model"] = time.perf_counter() - start
    phases.mark("load_model")
    spec, _ = graph_spec(hf_model)
    check_sequence_length(spec, sequence_length)
    if int8:
        _check_int8_targets(hf_model, quantize)

    # torch's references come first: the int8 rewrite folds SmoothQuant into the norms of hf_model
    t = time.perf_counter()
    prompts = [_encode(tokenizer, p, sequence_length) for p in verify.PROMPTS]
    prompts = [p for p in prompts if p]
    n_greedy = max(0, min(cfg.greedy_tokens, sequence_length - len(prompts[0]) - 1))
    with verify.torch_threads(threads):
        refs = [verify.torch_logits(hf_model, ids) for ids in prompts]
        greedy_ref = verify.torch_greedy(hf_model, prompts[0], n_greedy) if n_greedy else []
    timings["torch_reference"] = time.perf_counter() - t
    phases.mark("torch_reference")

    rewrite, int8_choice = None, {}
    if int8:
        t = time.perf_counter()
        say(f"int8: calibrating activation ranges on {quantize.nsamples}x{quantize.seqlen} tokens")
        rewrite, int8_choice = _int8_rewrite(hf_model, tokenizer, quantize, calibration)
        timings["int8_calibration"] = time.perf_counter() - t
        phases.mark("int8_calibration")

    with atomic_dir(out) as tmp:
        say(f"exporting {source} → {out} (sequence length {sequence_length}, {cfg.attention} attention)")
        t = time.perf_counter()
        info = export_onnx(hf_model, tmp, sequence_length, cfg.attention, cfg.external_data_threshold, rewrite=rewrite)
        timings["export_onnx"] = time.perf_counter() - t
        phases.mark("export_onnx")
        t = time.perf_counter()
        _write_side_files(hf_model, tokenizer, source, tmp)
        timings["write_side_files"] = time.perf_counter() - t
        extra = " + external data" if info["external_data"] else ""
        say(f"  wrote {MODEL_ONNX}{extra} in {timings['export_onnx']:.1f} s")

        t = time.perf_counter()
        zeros = verify.zeros_report(hf_model, tmp / MODEL_ONNX, info["weights"])
        timings["zeros_check"] = time.perf_counter() - t
        phases.mark("zeros_check")
        say(
            f"  zeros preserved: {zeros['zeros_preserved']} ({zeros['total_onnx_zeros']}/{zeros['total_torch_zeros']}"
            f" in {zeros['num_tensors']} linears, sparsity {zeros['overall_sparsity']:.1%})"
        )

        # from here on only the engines run, each holding its own copy of the weights: release torch's
        # so that the export never holds more than one extra copy (7 GB each for a 1.5B model in fp32)
        model_type = hf_model.config.model_type
        del hf_model
        gc.collect()
        logits: dict = {"tolerance": verify.LOGITS_TOLERANCE, "prompts": list(verify.PROMPTS), "engines": {}}
        greedy: dict = {"prompt": verify.PROMPTS[0], "num_tokens": n_greedy, "torch": greedy_ref, "engines": {}}
        engine_refs = None  # int8: the first engine's logits are the reference of the others
        for engine in engines:
            t = time.perf_counter()
            if engine == "deepsparse" and separate:
                res, tokens, timings["compile_deepsparse"] = _deepsparse_one_graph_at_a_time(
                    tmp, prompts, refs, sequence_length, prefill, threads, n_greedy
                )
            else:
                session = runtime.compile(
                    tmp, engine, sequence_length=sequence_length, prefill_length=prefill, threads=threads
                )
                timings[f"compile_{engine}"] = session.compile_seconds
                got = verify.engine_prompt_logits(session, prompts)
                if not int8:
                    res = verify.compare_logits(got, refs)
                else:
                    decode = verify.engine_prompt_logits(session, prompts, decode_only=True)
                    res = verify.int8_engine_check(got, decode, refs, engine_refs)
                    engine_refs = engine_refs or (got, decode)
                res |= {"sequence_length": session.sequence_length, "prefill_length": session.prefill_length}
                res["kv_cache"] = session.kv_cache
                tokens = list(session.generate(prompts[0], n_greedy)) if n_greedy else []
                del session
                gc.collect()  # the engine's weights go before the next engine (or the analysis) compiles
            logits["engines"][engine], greedy["engines"][engine] = res, tokens
            timings[f"verify_{engine}"] = time.perf_counter() - t
            phases.mark(f"verify_{engine}")
            diff = res["max_abs_diff"] if "max_abs_diff" in res else res["vs_torch_fp32"]["max_abs_diff"]
            vs_fp32 = ""
            if int8 and "with_prefill" in res:
                vs_fp32 = (
                    f" (decode graph vs the first engine; with prefill {res['with_prefill']['max_abs_diff']:.2e}; "
                    f"vs fp32 torch {res['vs_torch_fp32']['max_abs_diff']:.2e})"
                )
            elif int8:
                vs_fp32 = " (vs fp32 torch: the quantization error)"
            mode = " (one graph at a time)" if "one_graph_at_a_time" in res else ""
            say(
                f"  {engine}{mode}: compiled in {timings[f'compile_{engine}']:.1f} s, max |Δlogits| {diff:.2e}"
                + vs_fp32
                + f", greedy {n_greedy} tokens {'identical' if tokens == greedy_ref else 'DIFFER'}"
            )
        logits["ok"] = all(e["ok"] for e in logits["engines"].values())
        greedy["identical"] = all(toks == greedy_ref for toks in greedy["engines"].values())
        if int8:
            runs = list(greedy["engines"].values())
            greedy["engines_identical"] = all(toks == runs[0] for toks in runs)
            greedy["matching_prefix_vs_torch"] = {
                e: next((i for i, (a, b) in enumerate(zip(toks, greedy_ref, strict=False)) if a != b), len(toks))
                for e, toks in greedy["engines"].items()
            }

        sparsity = None
        if "deepsparse" in engines:
            t = time.perf_counter()
            sparsity = verify.engine_sparsity(tmp, sequence_length, threads=threads)
            timings["engine_sparsity"] = time.perf_counter() - t
            phases.mark("engine_sparsity")
            say(
                f"  deepsparse kernels: {sparsity['num_sparse_kernels']}/{sparsity['num_layers_reported']} "
                f"sparse, mean detected sparsity {sparsity['mean_detected_sparsity']}"
            )
        timings["total"] = time.perf_counter() - start
        if "compile_deepsparse" in timings:
            timings["export_plus_deepsparse_compile"] = timings["export_onnx"] + timings["compile_deepsparse"]

        problems = []
        if not zeros["zeros_preserved"]:
            bad = [k for k, v in zeros["tensors"].items() if not v["preserved"]]
            problems.append(f"zeros not preserved in {len(bad)} linears (e.g. {bad[0]})")
        for engine, res in logits["engines"].items():
            if not res["ok"]:
                what = "the first engine (same int8 graph)" if int8 else "torch"
                problems.append(f"{engine} logits differ from {what} by {res['max_abs_diff']:.2e}")
        if not greedy["identical"] and not int8:
            problems.append("greedy tokens differ between torch and an engine")
        report = {
            "ok": not problems,
            "problems": problems,
            "source": str(source),  # no "out": a deployment folder may be moved (the pipeline renames it)
            "model_type": model_type,
            "sequence_length": sequence_length,
            "max_sequence_length": info["meta"]["max_sequence_length"],
            "prefill_length": prefill,
            "verify_threads": threads,
            "attention": cfg.attention,
            "quantize": quantize.scheme,
            "int8": None
            if not int8
            else {
                **quantize.to_json(),
                "calibration": {"text": calibration.text, "seed": calibration.seed},
                **int8_choice,
                "layers": info["rewrite"],
            },
            "opset": OPSET,
            "external_data": info["external_data"],
            "external_data_threshold": cfg.external_data_threshold,
            "weight_bytes": info["weight_bytes"],
            "files": sorted([*(p.name for p in tmp.iterdir()), "export.json"]),
            "contract": info["contract"],
            "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
            "zeros": zeros,
            "zeros_preserved": zeros["zeros_preserved"],
            "engine_sparsity": sparsity,
            "logits": logits,
            "greedy": greedy,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "memory_mb": phases.record,
            "peak_rss_mb": round(memory.peak_rss_mb()),
            "versions": {"python": python_version(), **package_versions(_VERSIONED)},
        }
        write_json(tmp / "export.json", report)
    return report


#: calibration windows that rank the projections for ``keep_fp32_worst`` (4 x 512 tokens by default)
ERROR_WINDOWS = 4
_VERSIONED = ("torch", "transformers", "onnx", "onnxruntime", "deepsparse")


def _deepsparse_one_graph_at_a_time(
    folder: Path, prompts: list[list[int]], refs: list, total: int, prefill: int, threads: int | None, n_greedy: int
) -> tuple[dict, list[int], float]:
    """The fp32 DeepSparse check with one compiled graph in memory at a time: each multi-token graph alone on
    every whole chunk of each prompt (from an empty cache), then the decode graph alone on every position
    (one token per call, its own cache filling up) and the greedy tokens. What it does not run is the
    hand-over of a cache from the prefill graph to the decode graph. Returns (logits check, greedy, compile s)."""
    from owl_deploy import runtime
    from owl_deploy.export import verify

    got, want, seconds, chunks = [], [], 0.0, {}
    for n in runtime.prefill_cascade(prefill)[1:]:
        session = runtime.compile(folder, "deepsparse", total, prefill_length=n, threads=threads, lengths=(n,))
        seconds += session.compile_seconds
        for ids, ref in zip(prompts, refs, strict=True):
            whole = len(ids) // n * n
            if whole:
                session.reset()
                got.append(session.forward(ids[:whole]))
                want.append(ref[:whole])
                chunks[n] = chunks.get(n, 0) + whole // n
        del session
        gc.collect()
    session = runtime.compile(folder, "deepsparse", total, prefill_length=1, threads=threads, lengths=(1,))
    seconds += session.compile_seconds
    decode = verify.engine_prompt_logits(session, prompts, decode_only=True)
    tokens = list(session.generate(prompts[0], n_greedy)) if n_greedy else []
    kv_cache = session.kv_cache
    del session
    gc.collect()
    res = verify.compare_logits([*decode, *got], [*refs, *want])
    res |= {"sequence_length": total, "prefill_length": prefill, "kv_cache": kv_cache}
    res["one_graph_at_a_time"] = {"chunks_checked": {str(n): c for n, c in chunks.items()}}
    return res, tokens, seconds


def _check_int8_targets(hf_model, cfg: QuantizeConfig) -> None:
    """Fail before any work when ``keep_fp32_worst`` would leave nothing int8."""
    from owl_deploy.export import int8 as q

    n = len(q.quantize_targets(hf_model, cfg))
    if cfg.keep_fp32_worst >= n:
        raise OwlError(f"--keep-fp32-worst {cfg.keep_fp32_worst} would keep every one of the {n} int8 projections "
                       "fp32; export without --quantize instead")  # fmt: skip


def _int8_rewrite(hf_model, tokenizer, cfg: QuantizeConfig, calibration: CalibrationConfig) -> tuple[Callable, dict]:
    """Calibrate activation ranges; return the graph rewrite for export_onnx and what it chose (for export.json).
    With SmoothQuant the norms and biases of ``hf_model`` are folded in place, its projection weights are not:
    until the rewrite scales them in the graph, ``hf_model`` is not the model any more (take torch's references
    before)."""
    from owl_deploy.data import calibration_windows
    from owl_deploy.export import int8 as q
    from owl_deploy.export import verify

    windows = calibration_windows(tokenizer, calibration.text, cfg.nsamples, cfg.seqlen, calibration.seed)
    targets = q.quantize_targets(hf_model, cfg)
    report: dict = {}
    with verify.torch_threads(None):
        absmax = q.activation_absmax(hf_model, windows)
        plan = None
        if cfg.smooth_alpha is not None:
            # norms and biases folded in torch; each projection weight scaled as the rewrite reads it (never a
            # second copy of the weights). The ranking runs the model as it is, so then the norms fold after it.
            plan = q.smoothing_plan(hf_model, absmax, cfg.smooth_alpha, fold=not cfg.keep_fp32_worst)
        ranges = {name: float((plan.ranges if plan else absmax)[name].max()) for name in targets}
        if cfg.keep_fp32_worst:
            errors = q.int8_errors(hf_model, windows[:ERROR_WINDOWS], plan, ranges)
            kept = q.worst(errors, cfg.keep_fp32_worst)
            ranges = {name: r for name, r in ranges.items() if name not in kept}
            report = {"kept_fp32_worst": kept, "relative_errors": {n: round(e, 6) for n, e in errors.items()},
                      "error_windows": len(windows[:ERROR_WINDOWS])}  # fmt: skip
            if plan is not None:
                plan = q.smoothing_plan(hf_model, absmax, cfg.smooth_alpha)
    scales = plan.weights if plan is not None else None
    return (lambda proto, weights, base_dir: q.quantize_graph(proto, ranges, weights, base_dir, scales)), report


def _write_side_files(hf_model, tokenizer, source: Path, dest: Path) -> None:
    """config.json, generation_config.json, tokenizer files (what DeepSparse's pipeline loads)."""
    import contextlib
    import io

    config = hf_model.config
    use_cache = config.use_cache
    config.use_cache = True  # load_model turns it off for scoring; a deployment uses the cache
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            config.save_pretrained(dest)
            gen = getattr(hf_model, "generation_config", None)
            if gen is not None:
                with contextlib.suppress(Exception):
                    gen.save_pretrained(dest)
            tokenizer.save_pretrained(dest)
    except Exception as exc:
        raise OwlError(f"cannot write config/tokenizer files to {dest}: {exc}") from exc
    finally:
        config.use_cache = use_cache
    folder = source.parent if source.is_file() else source
    if (folder / "sparsity.json").is_file():
        shutil.copy2(folder / "sparsity.json", dest / "sparsity.json")


def _encode(tokenizer, text: str, sequence_length: int) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids[: max(1, sequence_length // 2)]
