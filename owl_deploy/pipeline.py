"""``owl-deploy run RECIPE``: the whole chain as cached, resumable stages.

Stages (run in this order; each names the recipe keys and the upstream stages it depends on)::

    fetch           model                                   the model as a Hugging Face folder
    tune            calibration, prune, owl, tune <- fetch  OWL's (M, λ) on held-out calibration text, or uniform
    prune           calibration, prune, owl   <- fetch, tune   pruned HF folder + sparsity.json
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

The stages themselves (what each computes, from which keys) are in ``stages.py``; this module plans
them, keys them, runs what is not cached, and summarises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl_deploy.errors import OwlError
from owl_deploy.io import atomic_dir, remove_stale, waiting, write_json
from owl_deploy.memory import Limit
from owl_deploy.recipe import Recipe
from owl_deploy.stages import DONE, STAGES, Done, Stage, StageContext
from owl_deploy.versions import package_versions

__all__ = ["STAGES", "Done", "Stage", "StageContext", "plan", "run_recipe"]

SCHEMA = "owl_deploy.pipeline/1"
KEY_CHARS = 16


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
        "libraries": package_versions(stage.libraries),
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
    busy = f"  waiting for another run that is computing {stage_dir.name}/{key} ..."
    with waiting(stage_dir / f".{key}.lock", lambda: log(busy)):
        yield


def _remove_partials(path: Path, log: Callable[[str], None]) -> None:
    """Leftovers of a killed run of this stage (we hold the key's lock, so no live run owns any)."""
    for leftover in remove_stale(path):
        log(f"  removed the partial output of an interrupted run: {leftover.name}")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_recipe(
    recipe: Recipe,
    out: Path,
    name: str = "recipe",
    stages: dict[str, Stage] | None = None,
    rerun: tuple[str, ...] = (),
    log: Callable[[str], None] | None = None,
    max_memory: Limit = None,
) -> RunReport:
    """Run every stage that is not complete yet, in order; returns what ran, what was cached, and the summary.

    ``rerun`` names stages to recompute even if complete (with everything downstream of them);
    ``max_memory`` (``memory.parse_limit``) is checked by each heavy stage before it loads a model.
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
            _remove_partials(step.path, log)
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
                    max_memory=max_memory,
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
    tune = res("tune")
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
            "allocation": prune.get("allocation") or recipe.prune.allocation,  # uniform when the tune guard chose it
            "nm": recipe.prune.nm,
            "clipped_blocks": prune.get("clipped_blocks") or [],
            "owl_m": prune.get("owl_m"),
            "owl_lambda": prune.get("owl_lambda"),
        },
        "tune": {k: tune.get(k) for k in ("tuned", "choice", "owl_wins", "reason", "seconds")},
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
        + (f"; blocks {sp['clipped_blocks']} held at the bounds [0, 0.99]" if sp.get("clipped_blocks") else "")
    )
    t = s.get("tune") or {}
    if t.get("reason"):
        lines.append(f"allocation: {t['reason']}")
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
