"""The stages of ``owl-deploy run``: what each computes, from which recipe keys and upstream stages.

Each stage is a small adapter over one stage module's Python API (``_prune`` calls
``owl_deploy.prune.run_prune`` ...): it receives a :class:`StageContext` (the recipe, a temporary output
folder, the completed upstream stages) and returns a small JSON-able ``result`` that ``pipeline.py``
stores in done.json and downstream stages and the summary read. ``STAGES`` is the registry, in order.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl_deploy.errors import OwlError
from owl_deploy.io import write_json
from owl_deploy.memory import Limit
from owl_deploy.recipe import Recipe

DONE = "done.json"


# ---------------------------------------------------------------- stage registry
@dataclass
class Done:
    """A completed stage: its folder and done.json."""

    stage: str
    key: str
    path: Path
    record: dict[str, Any]

    @property
    def result(self) -> dict[str, Any]:
        return self.record.get("result", {})

    def file(self, name: str) -> Path:
        """A path recorded in the result (relative to the stage folder, or absolute for external inputs)."""
        return self.path / self.result[name]


@dataclass
class StageContext:
    recipe: Recipe
    stage: str
    key: str
    out: Path  # the temporary folder to write into; renamed to ``final`` on success
    final: Path
    upstream: dict[str, Done]
    log: Callable[[str], None]
    max_memory: Limit = None  # memory.parse_limit: checked by prune, recover and export before they load


StageFn = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    fields: tuple[str, ...]  # dotted recipe keys whose values go into the cache key
    upstream: tuple[str, ...]
    version: str  # bump when the stage's output changes for the same inputs
    run: StageFn
    fingerprint: Callable[[Recipe], Any] | None = None  # external files the stage reads (model, texts)
    libraries: tuple[str, ...] = ()  # distributions whose versions shape the output
    still_valid: Callable[[Done], bool] | None = None  # a complete stage whose output lives elsewhere


# ---------------------------------------------------------------- fingerprints of inputs outside the cache
def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def model_fingerprint(spec: str) -> dict[str, Any]:
    """An asset is pinned by its registry sha256s; a folder or .gguf by its files' sizes and mtimes."""
    from owl_deploy import assets

    if spec in assets.MODELS:
        return {"asset": spec, "sha256": [d.sha256 for d in assets.ASSETS[spec].downloads]}
    path = Path(spec)
    if path.is_file():
        return {"file": path.name, "stamp": _file_stamp(path)}
    if path.is_dir():
        return {
            "folder": {str(p.relative_to(path)): _file_stamp(p) for p in sorted(path.rglob("*")) if p.is_file()},
        }
    return {"missing": spec}


def text_fingerprint(spec: str) -> list[Any]:
    """Text assets are pinned by their registry sha256s; a file by the sha256 of its content."""
    from owl_deploy import assets

    out: list[Any] = []
    for part in (p.strip() for p in spec.split("+")):
        if part in assets.TEXTS:
            out.append({"asset": part, "sha256": [d.sha256 for d in assets.ASSETS[part].downloads]})
        else:
            path = Path(part)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            out.append({"file": path.name, "sha256": digest})
    return out


# ---------------------------------------------------------------- stage adapters (one per stage)
def _fetch(ctx: StageContext) -> dict[str, Any]:
    """The model as a Hugging Face folder: an asset or a folder is used in place; a .gguf is dequantized."""
    from owl_deploy import assets

    spec = ctx.recipe.model
    if spec in assets.MODELS:
        path = assets.ensure(spec)
        return {"model": str(path), "source": "asset", "spec": spec}
    from owl_deploy.model import save_model
    from owl_deploy.specs import load_model, resolve_model

    path = resolve_model(spec)
    if path.is_dir():
        return {"model": str(path), "source": "folder", "spec": spec}
    model, tokenizer = load_model(path)
    model.config.use_cache = True
    save_model(model, tokenizer, ctx.out / "model")
    return {"model": "model", "source": "gguf", "spec": spec}


def _tune(ctx: StageContext) -> dict[str, Any]:
    """OWL's (M, λ) chosen on held-out calibration text, or uniform when no OWL setting beats it (tune.py);
    skipped (the recipe's own settings) with ``owl.tune: false`` or an allocation other than OWL."""
    r = ctx.recipe
    if not (r.owl.tune and r.prune.allocation == "owl"):
        why = "owl.tune is false" if not r.owl.tune else f"allocation is {r.prune.allocation}"
        choice = {"allocation": r.prune.allocation, "m": r.owl.m, "lambda": r.owl.lambda_}
        return {"tuned": False, "reason": f"not tuned: {why}", "choice": choice}
    from owl_deploy.data import calibration_windows, heldout_tokens
    from owl_deploy.specs import load_model
    from owl_deploy.tune import tune_owl

    c = r.calibration
    model, tokenizer = load_model(ctx.upstream["fetch"].file("model"))
    ids = calibration_windows(tokenizer, c.text, c.nsamples, c.seqlen, c.seed)
    held = heldout_tokens(tokenizer, c.text, r.tune.heldout_tokens, r.tune.seqlen)
    result = tune_owl(model, ids, held, r.prune, r.owl, r.tune)
    write_json(ctx.out / "tune.json", result)
    ctx.log(f"  {result['reason']} ({result['seconds']['total']:.0f} s)")
    keep = ("choice", "owl_wins", "reason", "seconds")
    return {"tuned": True, "tune_json": "tune.json", **{k: result[k] for k in keep}}


def _prune(ctx: StageContext) -> dict[str, Any]:
    from owl_deploy.prune import run_prune
    from owl_deploy.tune import chosen

    r = ctx.recipe
    prune, owl = chosen(r.prune, r.owl, ctx.upstream["tune"].result)
    decision = {k: ctx.upstream["tune"].result.get(k) for k in ("tuned", "choice", "owl_wins", "reason")}
    model = str(ctx.upstream["fetch"].file("model"))
    report = run_prune(model, ctx.out / "model", prune, owl, r.calibration, decision, max_memory=ctx.max_memory)
    keep = ("method", "allocation", "granularity", "target_sparsity", "nm", "global_sparsity", "mean_block_sparsity")
    return {
        "model": "model",
        "sparsity_json": "model/sparsity.json",
        **{k: report.get(k) for k in keep},
        "block_sparsity": [b["sparsity"] for b in report.get("blocks", [])],
        "clipped_blocks": report.get("owl", {}).get("clipped_blocks", []),
        "owl_m": owl.m,
        "owl_lambda": owl.lambda_,
        "seconds": report.get("timings", {}).get("total"),
    }


def _recover(ctx: StageContext) -> dict[str, Any]:
    """The short masked fine-tune (recover.py) when ``recover.enabled``; otherwise the pruned model as it is."""
    r = ctx.recipe
    pruned = ctx.upstream["prune"].file("model")
    if not r.recover.enabled:
        # relative to this stage's folder: an absolute path breaks when out/ moves, one relative to the
        # working directory breaks as soon as it is joined to the stage folder
        return {"model": os.path.relpath(pruned.resolve(), ctx.final.resolve()), "recovered": False}
    from owl_deploy.recover import run_recover

    teacher = str(ctx.upstream["fetch"].file("model")) if r.recover.distill > 0 else None
    report = run_recover(str(pruned), ctx.out / "model", r.recover, r.calibration, None, teacher, ctx.max_memory)
    ppl = report["perplexity"]
    ctx.log(
        f"  held-out perplexity {ppl['pruned']:.2f} -> {ppl['merged_remasked']:.2f} (unmerged {ppl['adapter']:.2f}); "
        f"zeros identical: {report['zeros']['identical_mask']}"
    )
    keep = ("perplexity", "zeros", "best", "stopped_early", "steps_run", "wall_seconds")
    return {"model": "model", "recovered": True, "recover_json": "model/recover.json", **{k: report[k] for k in keep}}


def _evaluate_at(model_dir: Path, ctx: StageContext) -> dict[str, Any]:
    from owl_deploy.evaluate import evaluate_model

    e = ctx.recipe.evaluate
    result = evaluate_model(str(model_dir), e)
    write_json(ctx.out / "perplexity.json", {"model": str(model_dir), "text": e.text, **result.to_json(full=True)})
    return {"perplexity_json": "perplexity.json", "text": e.text, **result.to_json()}


def _evaluate_dense(ctx: StageContext) -> dict[str, Any]:
    return _evaluate_at(ctx.upstream["fetch"].file("model"), ctx)


def _evaluate(ctx: StageContext) -> dict[str, Any]:
    return _evaluate_at(ctx.upstream["recover"].file("model"), ctx)


def _export_at(model_dir: Path, ctx: StageContext, quantized: bool = False) -> dict[str, Any]:
    """``export.export_model``: model.onnx + config/tokenizer + export.json (zeros and logits verified);
    int8 when ``quantized`` and the recipe's ``quantize.scheme`` asks for it."""
    from owl_deploy.configs import QuantizeConfig
    from owl_deploy.export import export_model

    r = ctx.recipe
    report = export_model(
        str(model_dir),
        ctx.out / "model",
        r.export,
        r.quantize if quantized else QuantizeConfig(),
        r.calibration,
        log=ctx.log,
        max_memory=ctx.max_memory,
    )
    if r.export.require_ok and not report.get("ok", False):
        problems = "; ".join(report.get("problems") or ["unknown"])
        raise OwlError(f"the export's verification failed ({problems}); set export.require_ok: false to keep it")
    engine_sparsity = report.get("engine_sparsity") or {}
    return {
        "model": "model",
        "export_json": "model/export.json",
        "ok": report.get("ok"),
        "problems": report.get("problems"),
        "zeros_preserved": report.get("zeros_preserved"),
        "onnx_sparsity": (report.get("zeros") or {}).get("overall_sparsity"),
        "deepsparse_sparse_kernels": engine_sparsity.get("num_sparse_kernels"),
        "sequence_length": report.get("sequence_length"),
        "quantize": "int8" if report.get("int8") else None,
        "timings_s": report.get("timings_s"),
    }


def _export_dense(ctx: StageContext) -> dict[str, Any]:
    return _export_at(ctx.upstream["fetch"].file("model"), ctx)


def _export(ctx: StageContext) -> dict[str, Any]:
    return _export_at(ctx.upstream["recover"].file("model"), ctx, quantized=True)


def _compile(ctx: StageContext) -> dict[str, Any]:
    """Compile the deployment folder in the recipe's engine (``runtime.compile``) and generate greedily."""
    from owl_deploy import runtime

    c = ctx.recipe.compile
    model_dir = ctx.upstream["export"].file("model")
    session = runtime.compile(  # greedy decoding needs each prompt's last logits only
        model_dir, c.engine, sequence_length=c.sequence_length, threads=c.threads, last_logits=True
    )
    tokenizer = session.deployment.tokenizer()
    prompt_ids = tokenizer(c.prompt)["input_ids"]  # as `owl-deploy generate` encodes it
    t0 = time.perf_counter()
    tokens = list(session.generate(prompt_ids, c.max_new_tokens, eos_token_id=tokenizer.eos_token_id))
    seconds = time.perf_counter() - t0
    record = {
        "engine": c.engine,
        "model": str(model_dir),
        "sequence_length": session.sequence_length,
        "compile_seconds": round(session.compile_seconds, 3),
        "prompt": c.prompt,
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": tokens,
        "generated_text": tokenizer.decode(tokens, skip_special_tokens=True),
        "generate_seconds": round(seconds, 3),
    }
    write_json(ctx.out / "compile.json", record)
    return {"compile_json": "compile.json", **record}


def _bench(ctx: StageContext) -> dict[str, Any]:
    from owl_deploy.bench import bench_command

    res = bench_command(
        {"sparse": ctx.upstream["export"].file("model"), "dense": ctx.upstream["export_dense"].file("model")},
        ctx.out / "bench",
        ctx.recipe.bench,
        log=ctx.log,
    )
    return bench_result(res)


def bench_result(res: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a bench results.json the summary shows."""
    head = res.get("headline") or {}
    return {
        "results_json": "bench/results.json",
        "results_md": "bench/results.md",
        "speedup_vs_dense_ort": head.get("speedup_vs_dense_ort"),
        "run": head.get("run"),
        "reference": head.get("reference"),
        "decode_tokens_per_s": head.get("decode_tokens_per_s"),
        "reference_decode_tokens_per_s": head.get("reference_decode_tokens_per_s"),
        "runs": {k: r.get("speedup_vs_dense_ort") for k, r in (res.get("runs") or {}).items()},
        "noisy": bool((res.get("noise") or {}).get("noisy")),
        "noise_reasons": (res.get("noise") or {}).get("reasons", []),
    }


_TORCH = ("torch", "transformers")
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("fetch", "the model as a Hugging Face folder", ("model",), (), "1", _fetch,
              fingerprint=lambda r: model_fingerprint(r.model),
              still_valid=lambda d: (d.file("model") / "config.json").is_file()),  # an asset may be deleted
        Stage("tune", "choose OWL's M and lambda on held-out calibration text", ("calibration", "prune", "owl", "tune"),
              ("fetch",), "3", _tune,  # 3: held-out windows of every source in turn
              fingerprint=lambda r: text_fingerprint(r.calibration.text), libraries=_TORCH),
        Stage("prune", "prune the model", ("calibration", "prune", "owl"), ("fetch", "tune"), "2", _prune,
              fingerprint=lambda r: text_fingerprint(r.calibration.text), libraries=_TORCH),
        Stage("evaluate_dense", "perplexity of the dense model", ("evaluate",), ("fetch",), "1", _evaluate_dense,
              fingerprint=lambda r: text_fingerprint(r.evaluate.text), libraries=_TORCH),
        Stage("recover", "recover quality, keeping every zero (if recover.enabled)",
              ("recover", "calibration"), ("fetch", "prune"), "3", _recover,  # 3: held-out windows of every source
              fingerprint=lambda r: text_fingerprint(r.calibration.text), libraries=(*_TORCH, "peft")),
        Stage("evaluate", "perplexity of the pruned (and recovered) model", ("evaluate",), ("recover",), "1", _evaluate,
              fingerprint=lambda r: text_fingerprint(r.evaluate.text), libraries=_TORCH),
        Stage("export_dense", "ONNX export of the dense model", ("export",), ("fetch",), "1", _export_dense,
              libraries=(*_TORCH, "onnx")),
        Stage("export", "ONNX export of the pruned model (int8 if quantize.scheme)", ("export", "quantize"),
              ("recover",), "1", _export, libraries=(*_TORCH, "onnx")),  # int8 calibration: via prune's key
        Stage("compile", "compile the pruned export and generate", ("compile",), ("export",), "1", _compile,
              libraries=("deepsparse", "onnxruntime")),
        Stage("bench", "decode benchmark vs dense ONNX Runtime", ("bench",), ("export", "export_dense"), "1", _bench,
              libraries=("deepsparse", "onnxruntime")),
    )
}  # fmt: skip
