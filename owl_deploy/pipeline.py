"""``owl-deploy run RECIPE``: the whole chain as cached, resumable stages.

Stages (run in this order; each names the recipe keys and the upstream stages it depends on)::

    fetch           model                                   the model as a Hugging Face folder
    prune           calibration, prune, owl   <- fetch      pruned HF folder + sparsity.json
    evaluate_dense  evaluate                  <- fetch      perplexity of the dense model
    evaluate        evaluate                  <- prune      perplexity of the pruned model
    export_dense    export                    <- fetch      ONNX (KV cache) of the dense model: the reference
    export          export, quantize          <- prune      ONNX of the pruned model (int8 if quantize.scheme)
    compile         compile                   <- export     compile in DeepSparse + generate a few tokens
    bench           bench            <- export, export_dense decode tokens/s vs dense ONNX Runtime

Cache key of a stage = sha256 of (stage name, stage version, the values of its recipe keys, a fingerprint
of the files it reads from outside the cache — model folder, text files —, the versions of the libraries
that shape its output, and the keys of its upstream stages), cut to 16 hex digits. A key therefore
changes exactly when something the stage's output depends on changes, and a change propagates to every
stage downstream through the upstream keys — and to no other stage.

Layout under ``--out DIR``::

    DIR/<stage>/<key>/            the stage's artifact, written through io.atomic_dir (a temporary
                                  sibling renamed into place at the end), with done.json written last
    DIR/<stage>/.<key>.lock       flock held while the stage runs (two runs never compute one stage twice)
    DIR/summaries/<recipe>.json   what the last run of that recipe found (paths, numbers, stage keys)

A stage is complete iff ``DIR/<stage>/<key>/done.json`` exists. A run killed mid-stage leaves only a
``.<key>.tmp-*`` sibling, which the next run removes (under the lock) before it recomputes that stage;
the stages already complete are reused. Different recipes can share one DIR: a dense evaluation or
export is computed once for every recipe that prunes the same model.

The stage functions are small adapters over the stage modules' Python APIs (``_fetch``, ``_prune``, ...);
they receive a :class:`StageContext` (the recipe, a temporary output folder, the upstream stages) and
return a small JSON-able ``result`` stored in done.json, which downstream stages and the summary read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl_deploy.errors import OwlError
from owl_deploy.io import atomic_dir, write_json
from owl_deploy.recipe import Recipe

SCHEMA = "owl_deploy.pipeline/1"
DONE = "done.json"
KEY_CHARS = 16


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


def _library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- stage adapters (one per stage)
def _fetch(ctx: StageContext) -> dict[str, Any]:
    """The model as a Hugging Face folder: an asset or a folder is used in place; a .gguf is dequantized."""
    from owl_deploy import assets

    spec = ctx.recipe.model
    if spec in assets.MODELS:
        path = assets.ensure(spec)
        return {"model": str(path), "source": "asset", "spec": spec}
    from owl_deploy.model import resolve_model

    path = resolve_model(spec)
    if path.is_dir():
        return {"model": str(path), "source": "folder", "spec": spec}
    from owl_deploy.model import load_model, save_model

    model, tokenizer = load_model(path)
    model.config.use_cache = True
    save_model(model, tokenizer, ctx.out / "model")
    return {"model": "model", "source": "gguf", "spec": spec}


def prune_config(recipe: Recipe):
    """The recipe's ``owl_deploy.prune.PruneConfig`` (validated)."""
    from owl_deploy.prune import config_from_cli

    r = recipe
    return config_from_cli(
        sparsity=r.prune.sparsity,
        nm=r.prune.nm,
        method=r.prune.method,
        allocation=r.prune.allocation,
        granularity=r.prune.granularity,
        owl_m=r.owl.m,
        owl_lambda=r.owl.lambda_,
        owl_nsamples=r.owl.nsamples,
        nsamples=r.calibration.nsamples,
        seqlen=r.calibration.seqlen,
        seed=r.calibration.seed,
        batch_size=r.prune.batch_size,
    )


def _prune(ctx: StageContext) -> dict[str, Any]:
    from owl_deploy.prune import run_prune

    cfg = prune_config(ctx.recipe)
    report = run_prune(str(ctx.upstream["fetch"].file("model")), ctx.out / "model", cfg, ctx.recipe.calibration.text)
    keep = ("method", "allocation", "granularity", "target_sparsity", "nm", "global_sparsity", "mean_block_sparsity")
    return {
        "model": "model",
        "sparsity_json": "model/sparsity.json",
        **{k: report.get(k) for k in keep},
        "block_sparsity": [b["sparsity"] for b in report.get("blocks", [])],
        "seconds": report.get("timings", {}).get("total"),
    }


def _evaluate_at(model_dir: Path, ctx: StageContext) -> dict[str, Any]:
    from owl_deploy.evaluate import evaluate_model

    e = ctx.recipe.evaluate
    result = evaluate_model(str(model_dir), e.text, e.seqlen, e.max_tokens)
    write_json(ctx.out / "perplexity.json", {"model": str(model_dir), "text": e.text, **result.to_json(full=True)})
    return {"perplexity_json": "perplexity.json", "text": e.text, **result.to_json()}


def _evaluate_dense(ctx: StageContext) -> dict[str, Any]:
    return _evaluate_at(ctx.upstream["fetch"].file("model"), ctx)


def _evaluate(ctx: StageContext) -> dict[str, Any]:
    return _evaluate_at(ctx.upstream["prune"].file("model"), ctx)


def _export_at(model_dir: Path, ctx: StageContext, quantized: bool = False) -> dict[str, Any]:
    """``export.export_model``: model.onnx + config/tokenizer + export.json (zeros and logits verified);
    int8 when ``quantized`` and the recipe's ``quantize.scheme`` asks for it."""
    from owl_deploy.export import export_model
    from owl_deploy.export.int8 import Int8Config

    x, q, c = ctx.recipe.export, ctx.recipe.quantize, ctx.recipe.calibration
    int8 = quantized and q.scheme == "int8"
    cfg = Int8Config(
        smooth_alpha=q.smooth_alpha,
        lm_head=q.lm_head,
        keep_fp32=tuple(q.keep_fp32),
        calib=c.text,
        nsamples=q.nsamples,
        seqlen=q.seqlen,
        seed=c.seed,
    )
    report = export_model(
        str(model_dir),
        ctx.out / "model",
        sequence_length=x.sequence_length,
        attention=x.attention,
        log=ctx.log,
        quantize="int8" if int8 else None,
        int8=cfg if int8 else None,
    )
    if x.require_ok and not report.get("ok", False):
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
    return _export_at(ctx.upstream["prune"].file("model"), ctx, quantized=True)


def _compile(ctx: StageContext) -> dict[str, Any]:
    """Compile the deployment folder in the recipe's engine (``runtime.compile``) and generate greedily."""
    from owl_deploy import runtime

    c = ctx.recipe.compile
    model_dir = ctx.upstream["export"].file("model")
    session = runtime.compile(model_dir, engine=c.engine)
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
    from owl_deploy import bench

    b = ctx.recipe.bench
    settings = bench.BenchSettings(
        context=b.context,
        steps=b.steps,
        rounds=b.rounds,
        warmup_rounds=b.warmup_rounds,
        prefill_chunk=b.prefill_chunk,
        threads=b.threads,
    )
    res = bench.bench_command(
        ctx.upstream["export"].file("model"),
        ctx.upstream["export_dense"].file("model"),
        ctx.out / "bench",
        engines=b.engines,
        settings=settings,
        strict=b.strict,
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


def _jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON values (for the results of foreign APIs)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


_TORCH = ("torch", "transformers")
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("fetch", "the model as a Hugging Face folder", ("model",), (), "1", _fetch,
              fingerprint=lambda r: model_fingerprint(r.model),
              still_valid=lambda d: (d.file("model") / "config.json").is_file()),  # an asset may be deleted
        Stage("prune", "prune the model", ("calibration", "prune", "owl"), ("fetch",), "1", _prune,
              fingerprint=lambda r: text_fingerprint(r.calibration.text), libraries=_TORCH),
        Stage("evaluate_dense", "perplexity of the dense model", ("evaluate",), ("fetch",), "1", _evaluate_dense,
              fingerprint=lambda r: text_fingerprint(r.evaluate.text), libraries=_TORCH),
        Stage("evaluate", "perplexity of the pruned model", ("evaluate",), ("prune",), "1", _evaluate,
              fingerprint=lambda r: text_fingerprint(r.evaluate.text), libraries=_TORCH),
        Stage("export_dense", "ONNX export of the dense model", ("export",), ("fetch",), "1", _export_dense,
              libraries=(*_TORCH, "onnx")),
        Stage("export", "ONNX export of the pruned model (int8 if quantize.scheme)", ("export", "quantize"),
              ("prune",), "1", _export, libraries=(*_TORCH, "onnx")),  # int8 calibration: via prune's key
        Stage("compile", "compile the pruned export and generate", ("compile",), ("export",), "1", _compile,
              libraries=("deepsparse", "onnxruntime")),
        Stage("bench", "decode benchmark vs dense ONNX Runtime", ("bench",), ("export", "export_dense"), "1", _bench,
              libraries=("deepsparse", "onnxruntime")),
    )
}  # fmt: skip


# ---------------------------------------------------------------- planning
@dataclass
class Planned:
    stage: Stage
    key: str
    inputs: dict[str, Any]
    path: Path
    cached: bool


def stage_inputs(stage: Stage, recipe: Recipe, upstream_keys: dict[str, str]) -> dict[str, Any]:
    """Everything the stage's key is computed from (stored in done.json, so a key can be explained)."""
    return {
        "stage": stage.name,
        "version": stage.version,
        "config": {f: _portable(f, recipe.value(f)) for f in stage.fields},
        "fingerprint": stage.fingerprint(recipe) if stage.fingerprint else None,
        "libraries": _library_versions(stage.libraries),
        "upstream": {u: upstream_keys[u] for u in stage.upstream},
    }


def _portable(name: str, value: Any) -> Any:
    """Text files by their name only (their content is in the fingerprint), so that a cache restored in
    another checkout folder still matches."""
    if isinstance(value, dict) and isinstance(value.get("text"), str) and name in ("calibration", "evaluate"):
        parts = [Path(p).name if "/" in p else p for p in value["text"].split("+")]
        return {**value, "text": "+".join(parts)}
    return value


def cache_key(inputs: dict[str, Any]) -> str:
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def read_done(path: Path, key: str, stage: Stage | None = None) -> dict[str, Any] | None:
    """done.json of a complete stage folder, or None (missing, unreadable, for another key, or its
    output outside the cache is gone)."""
    try:
        record = json.loads((path / DONE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("key") == key):
        return None
    if stage is not None and stage.still_valid is not None:
        try:
            if not stage.still_valid(Done(stage.name, key, path, record)):
                return None
        except (KeyError, TypeError, OSError):
            return None
    return record


def plan(recipe: Recipe, out: Path, stages: dict[str, Stage] | None = None) -> list[Planned]:
    """Every stage with its key, folder and whether it is already complete; nothing is computed."""
    stages = STAGES if stages is None else stages
    keys: dict[str, str] = {}
    planned = []
    for stage in stages.values():
        missing = [u for u in stage.upstream if u not in keys]
        if missing:
            raise ValueError(f"stage {stage.name} runs before its upstream {missing}")  # a bug in the registry
        inputs = stage_inputs(stage, recipe, keys)
        key = keys[stage.name] = cache_key(inputs)
        path = Path(out) / stage.name / key
        planned.append(Planned(stage, key, inputs, path, read_done(path, key, stage) is not None))
    return planned


# ---------------------------------------------------------------- running
@dataclass
class StageRun:
    stage: str
    key: str
    path: Path
    status: str  # "ran" or "cached"
    seconds: float  # of this call ("cached": 0); done.json keeps the seconds of the run that computed it


@dataclass
class RunReport:
    recipe: str
    out: Path
    stages: list[StageRun] = field(default_factory=list)
    done: dict[str, Done] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ran(self) -> list[str]:
        return [s.stage for s in self.stages if s.status == "ran"]


@contextlib.contextmanager
def _stage_lock(stage_dir: Path, key: str, log: Callable[[str], None]) -> Iterator[None]:
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / f".{key}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"  waiting for another run that is computing {stage_dir.name}/{key} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_partials(stage_dir: Path, key: str, log: Callable[[str], None]) -> None:
    """Leftovers of a killed run (we hold the key's lock, so no live run owns them)."""
    for pattern in (f".{key}.tmp-*", f".{key}.old-*"):
        for leftover in stage_dir.glob(pattern):
            log(f"  removing the partial output of an interrupted run: {leftover.name}")
            shutil.rmtree(leftover, ignore_errors=True)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stderr(msg: str) -> None:
    import click

    click.echo(msg, err=True)


def run_recipe(
    recipe: Recipe,
    out: Path,
    name: str = "recipe",
    stages: dict[str, Stage] | None = None,
    rerun: tuple[str, ...] = (),
    log: Callable[[str], None] | None = None,
) -> RunReport:
    """Run every stage that is not complete yet, in order; returns what ran, what was cached, and the summary.

    ``rerun`` names stages to recompute even if complete (with everything downstream of them).
    """
    stages = STAGES if stages is None else stages
    log = log or _stderr
    out = Path(out)
    unknown = [s for s in rerun if s not in stages]
    if unknown:
        raise OwlError(f"unknown stage {', '.join(unknown)} for --rerun; stages: {', '.join(stages)}")
    forced = set(rerun)
    for stage in stages.values():  # downstream of a forced stage is forced too
        if forced & set(stage.upstream):
            forced.add(stage.name)
    report = RunReport(recipe=name, out=out)
    steps = plan(recipe, out, stages)
    total = len(steps)
    for i, step in enumerate(steps, 1):
        stage = step.stage
        tag = f"[{i}/{total}] {stage.name:<14s} {step.key}"
        record = None if stage.name in forced else read_done(step.path, step.key, stage)
        if record is not None:
            log(f"{tag}  cached")
            report.stages.append(StageRun(stage.name, step.key, step.path, "cached", 0.0))
            report.done[stage.name] = Done(stage.name, step.key, step.path, record)
            continue
        with _stage_lock(step.path.parent, step.key, log):
            record = None if stage.name in forced else read_done(step.path, step.key, stage)
            if record is not None:  # another run finished it while we waited
                log(f"{tag}  cached (computed by another run)")
                report.stages.append(StageRun(stage.name, step.key, step.path, "cached", 0.0))
                report.done[stage.name] = Done(stage.name, step.key, step.path, record)
                continue
            _remove_partials(step.path.parent, step.key, log)
            log(f"{tag}  running: {stage.title}")
            started, t0 = _now(), time.perf_counter()
            with atomic_dir(step.path) as tmp:
                ctx = StageContext(
                    recipe=recipe,
                    stage=stage.name,
                    key=step.key,
                    out=tmp,
                    final=step.path,
                    upstream={u: report.done[u] for u in stage.upstream},
                    log=log,
                )
                try:
                    result = stage.run(ctx)
                except OwlError as exc:
                    raise OwlError(f"stage {stage.name} failed: {exc}") from exc
                seconds = time.perf_counter() - t0
                record = {
                    "schema": SCHEMA,
                    "stage": stage.name,
                    "key": step.key,
                    "recipe": name,
                    "inputs": step.inputs,
                    "result": _jsonable(result or {}),
                    "started": started,
                    "finished": _now(),
                    "seconds": round(seconds, 3),
                }
                write_json(tmp / DONE, record)  # last: its presence means the stage is complete
        log(f"{tag}  done in {seconds:.1f} s")
        report.stages.append(StageRun(stage.name, step.key, step.path, "ran", seconds))
        report.done[stage.name] = Done(stage.name, step.key, step.path, record)
    report.summary = summarize(recipe, name, report)
    write_json(out / "summaries" / f"{name}.json", report.summary)
    return report


# ---------------------------------------------------------------- summary
def summarize(recipe: Recipe, name: str, report: RunReport) -> dict[str, Any]:
    d = report.done

    def res(stage: str) -> dict[str, Any]:
        return d[stage].result if stage in d else {}

    def path(stage: str, item: str) -> str | None:
        return str(d[stage].file(item)) if stage in d and item in d[stage].result else None

    dense, pruned, prune, bench = res("evaluate_dense"), res("evaluate"), res("prune"), res("bench")
    export, comp = res("export"), res("compile")
    return {
        "schema": SCHEMA,
        "recipe": name,
        "created": _now(),
        "out": str(report.out),
        "ran": report.ran,
        "stages": {
            s.stage: {"key": s.key, "path": str(s.path), "status": s.status, "seconds": round(s.seconds, 3)}
            for s in report.stages
        },
        "perplexity": {
            "text": dense.get("text") or pruned.get("text"),
            "windows": pruned.get("windows"),
            "seqlen": pruned.get("seqlen"),
            "dense": dense.get("perplexity"),
            "pruned": pruned.get("perplexity"),
            "dense_nll_std_err": dense.get("nll_std_err"),
            "pruned_nll_std_err": pruned.get("nll_std_err"),
        },
        "sparsity": {
            "global": prune.get("global_sparsity"),
            "target": recipe.target_sparsity,
            "method": recipe.prune.method,
            "allocation": recipe.prune.allocation,
            "nm": recipe.prune.nm,
        },
        "export": {k: export.get(k) for k in ("ok", "zeros_preserved", "onnx_sparsity", "deepsparse_sparse_kernels",
                                              "quantize")},
        "compile": {k: comp.get(k) for k in ("engine", "compile_seconds", "prompt", "generated_text")},
        "bench": {k: bench.get(k) for k in ("speedup_vs_dense_ort", "run", "reference", "decode_tokens_per_s",
                                            "reference_decode_tokens_per_s", "noisy", "noise_reasons")},
        "paths": {
            "pruned_model": path("prune", "model"),
            "deployment": path("export", "model"),
            "dense_export": path("export_dense", "model"),
            "compile": path("compile", "compile_json"),
            "bench": path("bench", "results_md"),
            "summary": str(report.out / "summaries" / f"{name}.json"),
        },
    }  # fmt: skip


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The human summary printed at the end of ``owl-deploy run``."""
    s = summary
    stages = s["stages"]
    lines = []
    if not s["ran"]:
        lines.append(f"nothing to do: all {len(stages)} stages of {s['recipe']} are cached in {s['out']}")
    else:
        cached = [n for n, st in stages.items() if st["status"] == "cached"]
        lines.append(f"{s['recipe']}: ran {', '.join(s['ran'])}" + (f"; reused {', '.join(cached)}" if cached else ""))
    p, sp, b = s["perplexity"], s["sparsity"], s["bench"]
    ratio = p["pruned"] / p["dense"] if isinstance(p["dense"], float) and isinstance(p["pruned"], float) else None
    lines.append(
        f"perplexity ({p['text']}, {p['windows']} x {p['seqlen']} tokens): dense {_num(p['dense'], '.2f')}"
        f" -> pruned {_num(p['pruned'], '.2f')}" + (f" (x{ratio:.2f})" if ratio else "")
    )
    target = f"nm {sp['nm']}" if sp["nm"] else f"target {_num(sp['target'], '.2f')}"
    lines.append(
        f"global sparsity {_num(sp['global'], '.4f')} ({target}, {sp['method']} + {sp['allocation']} allocation)"
    )
    x, c = s.get("export") or {}, s.get("compile") or {}
    if x.get("ok") is not None:
        kernels = x.get("deepsparse_sparse_kernels")
        lines.append(
            f"export{' (int8)' if x.get('quantize') else ''}: verification {'passed' if x['ok'] else 'FAILED'}, "
            "zeros preserved in ONNX: "
            f"{x.get('zeros_preserved')} (sparsity {_num(x.get('onnx_sparsity'), '.4f')})"
            + (f", {kernels} sparse DeepSparse kernels" if kernels is not None else "")
        )
    if c.get("engine"):
        lines.append(
            f"compiled in {c['engine']} in {_num(c.get('compile_seconds'), '.1f')} s; "
            f"{c.get('prompt')!r} -> {c.get('generated_text')!r}"
        )
    if b.get("speedup_vs_dense_ort") is not None:
        lines.append(
            f"decode speedup vs dense ONNX Runtime: {b['speedup_vs_dense_ort']:.2f}x "
            f"({b['run']} {_num(b['decode_tokens_per_s'], '.1f')} tok/s vs {b['reference']} "
            f"{_num(b['reference_decode_tokens_per_s'], '.1f')} tok/s)"
        )
    else:
        lines.append("decode speedup vs dense ONNX Runtime: n/a")
    if b.get("noisy"):
        lines.append("warning: the benchmark ran on a noisy machine: " + "; ".join(b.get("noise_reasons") or []))
    labels = {
        "pruned_model": "pruned model",
        "deployment": "deployment folder",
        "dense_export": "dense export",
        "compile": "compile check",
        "bench": "benchmark",
        "summary": "summary",
    }
    lines += [f"  {labels[k]:<18s} {v}" for k, v in s["paths"].items() if v]
    return lines


def plan_lines(steps: list[Planned]) -> list[str]:
    return [
        f"[{i}/{len(steps)}] {p.stage.name:<14s} {p.key}  {'cached' if p.cached else 'to run'}  {p.path}"
        for i, p in enumerate(steps, 1)
    ]
