"""Measuring decode and prefill: every engine x model in one process, interleaved round by round.

What is measured (batch 1):

* **prefill** tokens/s: the ``context``-token prompt run through the session (``prefill_length``
  tokens per multi-token call, the same re-declaration DeepSparse's pipeline makes), the remainder one
  token at a time;
* **decode** tokens/s: ``steps`` single-token steps with the cache filled to ``context`` tokens; a step
  is timed from building its inputs (including the KV-cache shift) to having the next greedy token.

Round 0 (``warmup_rounds``) is run but not counted; the order of the sessions rotates every round so
none always follows the same neighbour; a short untimed pause separates sessions so one engine's
spinning threads have stopped before the next one starts.  Each statistic is a median with its 10th
and 90th percentile.  The headline is ``speedup_vs_dense_ort`` of DeepSparse on the sparse model: its
median decode tokens/s over that of ONNX Runtime on the dense model.  Sessions run through
``owl_deploy.runtime``, the product path (DeepSparse with its internal KV cache unless
``kv_cache="external"``).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy.bench.machine import (
    CpuMonitor,
    NoisePolicy,
    engine_env,
    hardware_info,
    noise_verdict,
    quiet_sample,
    versions_info,
)
from owl_deploy.bench.weights import ModelInfo, load_model_info
from owl_deploy.configs import ENGINES, BenchConfig, engine_items
from owl_deploy.errors import OwlError

SCHEMA = "owl_deploy.bench/1"
SHORT = {"deepsparse": "DeepSparse", "onnxruntime": "ONNX Runtime"}
#: the baseline every speedup is relative to, and the product whose speedup is the headline
REFERENCE = ("onnxruntime", "dense")
HEADLINE = ("deepsparse", "sparse")
#: the strongest dense peer when it is benchmarked (``--model dense-int8=ODIR``): ONNX Runtime on int8
SECOND_REFERENCE = ("onnxruntime", "dense-int8")


class NoisyMachine(OwlError):
    """``strict`` and the machine was busy: the numbers would not mean anything."""


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """Median, 10th/90th percentile (linear interpolation), mean, min, max and count."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"median": None, "p10": None, "p90": None, "mean": None, "min": None, "max": None, "n": 0}
    p10, med, p90 = np.percentile(arr, [10, 50, 90])
    return {
        "median": float(med),
        "p10": float(p10),
        "p90": float(p90),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }


def run_key(engine: str, model: str) -> str:
    return f"{engine}/{model}"


def parse_engines(spec: str | None, models: Iterable[str] = ("sparse", "dense")) -> list[tuple[str, str]]:
    """``"ds/sparse,ort/dense"`` -> pairs; an engine without a model means every model; ``all``/None: all.

    The reference (ONNX Runtime on the dense model) is always included when there is a dense model.
    """
    models = list(models)
    pairs: list[tuple[str, str]] = []
    for engine, model in engine_items(spec or "all"):
        if engine == "all":
            pairs += [(e, m) for m in reversed(models) for e in ENGINES]
            continue
        if model and model not in models:
            raise OwlError(f"unknown model {model!r} in --engines; use one of {', '.join(models)}")
        pairs += [(engine, m) for m in ([model] if model else models)]
    out: list[tuple[str, str]] = []
    for p in pairs:
        if p not in out:
            out.append(p)
    if REFERENCE[1] in models and REFERENCE not in out:
        out.insert(0, REFERENCE)
    return out


class DecodeSession:
    """One compiled engine x model: ``prefill(prompt)`` (fresh cache), then ``decode(token, steps)``."""

    key: str
    compile_seconds: float

    def prefill(self, prompt: list[int]) -> tuple[int, float]:
        """Run the prompt from an empty cache; returns (next greedy token, seconds)."""
        raise NotImplementedError

    def decode(self, token: int, steps: int) -> tuple[list[float], list[int], np.ndarray]:
        """``steps`` greedy single-token steps after the cached tokens; (seconds per step, tokens, first logits)."""
        times, tokens, first = [], [], None
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = self._step(token)
            token = int(np.argmax(logits))
            times.append(time.perf_counter() - t0)
            if first is None:
                first = np.array(logits, dtype=np.float32, copy=True)
            tokens.append(token)
        return times, tokens, first

    def _step(self, token: int) -> np.ndarray:
        raise NotImplementedError


class RuntimeSession(DecodeSession):
    """The product path: ``owl_deploy.runtime`` (DeepSparse with its internal KV cache by default)."""

    def __init__(self, engine: str, info: ModelInfo, cfg: BenchConfig):
        from owl_deploy import runtime

        self.key = run_key(engine, info.label)
        kv = cfg.kv_cache if engine == "deepsparse" else None
        self.session = runtime.compile(
            info.folder, engine, prefill_length=cfg.prefill_length, kv_cache=kv, threads=cfg.threads
        )
        self.compile_seconds = float(self.session.compile_seconds)
        self.kv_cache = self.session.kv_cache

    def prefill(self, prompt: list[int]) -> tuple[int, float]:
        self.session.reset()
        t0 = time.perf_counter()
        logits = self.session.forward(prompt)
        token = int(np.argmax(logits[-1]))
        return token, time.perf_counter() - t0

    def _step(self, token: int) -> np.ndarray:
        return self.session.step(token)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Samples:
    """What the timed rounds recorded for one session."""

    steps: list[float] = field(default_factory=list)  # seconds of every timed decode step
    rounds: list[float] = field(default_factory=list)  # tokens/s of each round's median step
    prefill: list[float] = field(default_factory=list)  # prefill tokens/s of each round
    tokens: list[int] = field(default_factory=list)  # greedy tokens of the first (warm-up) round
    first_logits: np.ndarray | None = None
    compile_seconds: float = 0.0
    kv_cache: str | None = None


def _load(
    models: dict[str, Path | str], runs: list[tuple[str, str]], cfg: BenchConfig, reference: tuple[str, str], log
) -> tuple[dict[str, ModelInfo], int]:
    """The deployments the runs name, checked against each other and the settings."""
    for engine, label in runs:
        if engine not in ENGINES:
            raise OwlError(f"unknown engine {engine!r}")
        if label not in models:
            raise OwlError(f"no model labelled {label!r}")
    if reference not in runs:
        raise OwlError(f"the reference run {run_key(*reference)} is missing: every speedup is relative to it")
    used = list(dict.fromkeys(label for _, label in runs))
    infos = {label: load_model_info(models[label], label) for label in used}
    seqs = {info.sequence_length for info in infos.values()}
    if len(seqs) > 1:
        detail = ", ".join(f"{k} {v.sequence_length}" for k, v in infos.items())
        raise OwlError(f"the deployments differ in sequence length ({detail}); export them with the same one")
    seq = seqs.pop()
    if cfg.context + cfg.steps > seq:
        raise OwlError(
            f"--context {cfg.context} + --steps {cfg.steps} decode tokens = "
            f"{cfg.context + cfg.steps} exceeds the deployment's sequence length {seq}"
        )
    for label, info in infos.items():
        if info.export.get("ok") is False:
            log(f"warning: {info.folder}/export.json records a failed verification (ok: false)")
        w = info.weights
        log(
            f"{label}: {info.onnx_path} (sequence length {seq}; zeros: {w.get('sparsity_excluding_lm_head') or 0:.1%} "
            f"of the block weights, {w.get('sparsity') or 0:.1%} of all MatMul weights)"
        )
    if "sparse" in infos and (infos["sparse"].weights.get("sparsity") or 0.0) < 0.01:
        log("warning: the --sparse model has (almost) no zero weights")
    return infos, seq


def _interleave(
    sessions: list[DecodeSession], prompt: list[int], cfg: BenchConfig, monitor: CpuMonitor, log
) -> tuple[dict[str, Samples], dict[str, Any]]:
    """Warm-up and timed rounds, sessions rotated every round; the samples and the CPU observations."""
    samples = {s.key: Samples(compile_seconds=s.compile_seconds, kv_cache=s.kv_cache) for s in sessions}
    other_rounds, own_rounds, round_seconds = [], [], []
    tot = {"wall": 0.0, "other": 0.0, "steal": 0.0, "own": 0.0}
    procs_start, t_timed = None, None
    for r in range(cfg.warmup_rounds + cfg.rounds):
        timed = r >= cfg.warmup_rounds
        if timed and procs_start is None:
            procs_start, t_timed = monitor.process_times(), time.perf_counter()
        order = [sessions[(r + j) % len(sessions)] for j in range(len(sessions))]
        rnd = {"wall": 0.0, "other": 0.0, "steal": 0.0, "own": 0.0}
        for s in order:
            time.sleep(cfg.gap_seconds)
            a = monitor.sample()
            token, pre_s = s.prefill(prompt)
            step_s, toks, first = s.decode(token, cfg.steps)
            use = CpuMonitor.usage(a, monitor.sample())
            smp = samples[s.key]
            if not smp.tokens:  # the first round's greedy tokens and logits: the engines' agreement
                smp.tokens, smp.first_logits = toks, first
            if not timed:
                continue
            for key in rnd:
                rnd[key] += use[key] * use["wall"] if key != "wall" else use["wall"]
            smp.steps.extend(step_s)
            # per round: the median step (robust to a burst, consistent with the headline median)
            smp.rounds.append(1.0 / float(np.median(step_s)))
            smp.prefill.append(cfg.context / pre_s)
        if not timed:
            log(f"warm-up round {r + 1}/{cfg.warmup_rounds} done")
            continue
        w = max(rnd["wall"], 1e-9)
        other_rounds.append(round(rnd["other"] / w, 3))
        own_rounds.append(round(rnd["own"] / w, 3))
        round_seconds.append(round(rnd["wall"], 3))
        for key in tot:
            tot[key] += rnd[key]
        log(
            f"round {r - cfg.warmup_rounds + 1}/{cfg.rounds}: "
            + ", ".join(f"{k} {v.rounds[-1]:.1f} tok/s" for k, v in samples.items())
            + f" (other processes {other_rounds[-1]:.2f} cores)"
        )
    wall_timed = time.perf_counter() - (t_timed or time.perf_counter())
    w = max(tot["wall"], 1e-9)
    obs = {
        "other_cpu_mean": round(tot["other"] / w, 3),
        "other_cpu_rounds": other_rounds,
        "steal_mean": round(tot["steal"] / w, 3),
        "own_cpu_mean": round(tot["own"] / w, 3),
        "own_cpu_rounds": own_rounds,
        "round_seconds": round_seconds,
        "top_other_during": CpuMonitor.top(procs_start or {}, monitor.process_times(), wall_timed),
    }
    return samples, obs


def run_stats(
    samples: dict[str, Samples],
    bytes_per_token: dict[str, dict[str, int]],
    reference: str,
    bandwidth_gb_per_s: float | None,
) -> dict[str, Any]:
    """Per run: decode/prefill statistics, the speedup over ``reference`` (ratio of medians, and per round
    the paired ratio), and the bytes-per-token ceiling. ``bytes_per_token`` is keyed like ``samples``."""
    out: dict[str, Any] = {}
    for key, smp in samples.items():
        engine, label = key.split("/", 1)
        encoding = "bitmask" if engine == "deepsparse" else "dense"
        bpt = bytes_per_token[key][encoding]
        out[key] = {
            "engine": engine,
            "model": label,
            "decode_tokens_per_s": summarize(1.0 / t for t in smp.steps),
            "decode_step_ms": summarize(1e3 * t for t in smp.steps),
            "decode_tokens_per_s_by_round": [round(x, 3) for x in smp.rounds],
            # plain throughput (all timed steps / their total time): what a user sees, outliers included
            "decode_throughput_tokens_per_s": round(len(smp.steps) / sum(smp.steps), 3) if smp.steps else None,
            "prefill_tokens_per_s": summarize(smp.prefill) if smp.prefill else None,
            "compile_seconds": round(smp.compile_seconds, 2),
            "kv_cache": smp.kv_cache,
            "bytes_per_token": bpt,
            "bytes_per_token_encoding": encoding,
            "ceiling_tokens_per_s": round(bandwidth_gb_per_s * 1e9 / bpt, 2) if bandwidth_gb_per_s else None,
        }
    for entry in out.values():
        entry.update(_ratio(entry, out[reference], "speedup_vs_dense_ort", "speedup_by_round"))
        med, ceil = entry["decode_tokens_per_s"]["median"], entry["ceiling_tokens_per_s"]
        entry["fraction_of_ceiling"] = round(med / ceil, 4) if med and ceil else None
    return out


def _ratio(run: dict[str, Any], ref: dict[str, Any], name: str, by_round: str) -> dict[str, Any]:
    """``run``'s median decode tokens/s over ``ref``'s, and the per-round paired ratios summarised."""
    med, ref_med = run["decode_tokens_per_s"]["median"], ref["decode_tokens_per_s"]["median"]
    pairs = zip(run["decode_tokens_per_s_by_round"], ref["decode_tokens_per_s_by_round"], strict=False)
    return {
        name: round(med / ref_med, 4) if med and ref_med else None,
        by_round: summarize(a / b for a, b in pairs if b),
    }


def headline_of(
    runs: dict[str, Any], bytes_per_token: dict[str, dict[str, int]], reference: str, headline: str
) -> dict[str, Any] | None:
    """The headline run against the reference and, when it was run, the second reference (the strongest
    dense peer), each with the bytes-per-token ceiling of that ratio (bitmask over dense bytes)."""
    if headline not in runs:
        return None
    he, ref = runs[headline], runs[reference]
    head = {
        "run": headline,
        "reference": reference,
        "speedup_vs_dense_ort": he["speedup_vs_dense_ort"],
        "speedup_by_round": he["speedup_by_round"],
        "decode_tokens_per_s": he["decode_tokens_per_s"]["median"],
        "reference_decode_tokens_per_s": ref["decode_tokens_per_s"]["median"],
        "ceiling_speedup_bytes": round(bytes_per_token[reference]["dense"] / bytes_per_token[headline]["bitmask"], 3),
    }
    peer = run_key(*SECOND_REFERENCE)
    if peer in runs and peer != headline:
        head["second_reference"] = peer
        head.update(_ratio(he, runs[peer], "speedup_vs_second_reference", "speedup_vs_second_reference_by_round"))
        head["ceiling_speedup_bytes_vs_second_reference"] = round(
            bytes_per_token[peer]["dense"] / bytes_per_token[headline]["bitmask"], 3
        )
    return head


def run_benchmark(
    models: dict[str, Path | str],
    runs: list[tuple[str, str]],
    cfg: BenchConfig | None = None,
    policy: NoisePolicy | None = None,
    reference: tuple[str, str] = REFERENCE,
    headline: tuple[str, str] | None = HEADLINE,
    log: Callable[[str], None] | None = _log,
    hardware: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark every (engine, model label) of ``runs``; returns the results.json dictionary.

    ``models`` maps a label to a deployment folder.  With ``cfg.strict`` a machine that is busy before
    the run raises :class:`NoisyMachine` at once (the during-run verdict is the caller's to enforce).
    """
    cfg = cfg or BenchConfig()
    policy = policy or NoisePolicy()
    log = log or (lambda _m: None)
    started = _dt.datetime.now(_dt.UTC)
    loadavg_before = list(os.getloadavg())
    infos, seq = _load(models, runs, cfg, reference, log)

    monitor = CpuMonitor()
    cpus = os.cpu_count() or 1
    other_before, top_before = quiet_sample(monitor, policy.before_sample_seconds)
    obs: dict[str, Any] = {
        "loadavg_before": [round(x, 2) for x in loadavg_before],
        "other_cpu_before": round(other_before, 3),
        "top_other_before": top_before,
    }
    early = noise_verdict(obs, policy, cpus)
    if early:
        log("warning: the machine is busy before the run: " + "; ".join(early))
        if cfg.strict:
            raise NoisyMachine("machine is busy (--strict): " + "; ".join(early))
    if hardware is None:
        log("measuring memory read bandwidth (once)...")
        hardware = hardware_info(measure_bandwidth=cfg.measure_bandwidth)
    vocab = min((i.vocab_size for i in infos.values() if i.vocab_size), default=2)
    prompt = [int(x) for x in np.random.default_rng(cfg.seed).integers(0, vocab, size=cfg.context)]

    sessions: list[DecodeSession] = []
    for engine, label in runs:
        log(f"compiling {run_key(engine, label)}...")
        sessions.append(RuntimeSession(engine, infos[label], cfg))
        log(f"  compiled in {sessions[-1].compile_seconds:.1f} s")
    samples, during = _interleave(sessions, prompt, cfg, monitor, log)
    del sessions
    obs |= {"loadavg_after": [round(x, 2) for x in os.getloadavg()], **during}
    reasons = noise_verdict(obs, policy, cpus)
    noise = {"noisy": bool(reasons), "reasons": reasons, **obs, "cpus": cpus, "policy": asdict(policy)}

    bpt = {run_key(e, m): infos[m].bytes_per_token for e, m in runs}
    bandwidth = (hardware.get("memory_read_gb_per_s") or {}).get("all_cores")
    results_runs = run_stats(samples, bpt, run_key(*reference), bandwidth)
    return {
        "schema": SCHEMA,
        "created": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {**cfg.to_json(), "sequence_length": seq, "environment": engine_env()},
        "models": {label: info.describe() for label, info in infos.items()},
        "runs": results_runs,
        "headline": headline_of(results_runs, bpt, run_key(*reference), run_key(*headline)) if headline else None,
        "agreement": _agreement(runs, samples),
        "noise": noise,
        "hardware": hardware,
        "versions": versions_info(),
    }


def _agreement(runs: list[tuple[str, str]], samples: dict[str, Samples]) -> dict[str, Any]:
    """Same model in two engines: greedy tokens identical? max |logit difference| at the first step."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(m for _, m in runs):
        keys = [run_key(e, label) for e in ENGINES if (e, label) in runs]
        if len(keys) != 2:
            continue
        a, b = (samples[k] for k in keys)
        diff = None
        if a.first_logits is not None and b.first_logits is not None:
            diff = float(np.max(np.abs(a.first_logits.astype(np.float64) - b.first_logits)))
        out[label] = {"same_greedy_tokens": a.tokens == b.tokens, "first_step_max_abs_logit_diff": diff}
    return out
