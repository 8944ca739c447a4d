"""Measuring decode and prefill: every engine x model in one process, interleaved round by round.

What is measured:

* **decode** tokens/s at batch 1: ``steps`` single-token steps with the cache filled to ``context``
  tokens; a step is timed from building its inputs (including the KV-cache shift) to having the next
  greedy token;
* **prefill** tokens/s and **time to first token** per prompt length (``prompt_lengths``, default the
  ``context``): the prompt from an empty cache (``prefill_length`` tokens per multi-token call, the same
  re-declaration DeepSparse's pipeline makes, the remainder one token at a time) to its greedy token;
* **throughput** at each batch size above 1 (``batch_sizes``, deployments only): per-stream and
  aggregate decode tokens/s of ``batch`` sequences stepped together on the serving path
  (``sessions.BatchedSession``).

Round 0 (``warmup_rounds``) is run but not counted; the order of the sessions rotates every round so
none always follows the same neighbour; a short untimed pause separates sessions so one engine's
spinning threads have stopped before the next one starts.  Each statistic is a median with its 10th
and 90th percentile.  The headline is ``speedup_vs_dense_ort`` of DeepSparse on the sparse model: its
median decode tokens/s over that of ONNX Runtime on the dense model (absent when no dense model is
benchmarked: a single model gets its statistics without speedups).

What is benchmarked is a list of :class:`Target` objects (``sessions``), each opening one session:
the deployments (an engine of ``ENGINES`` on a deployment folder) and, from ``bench/peers.py``, the
peers a user runs instead (llama.cpp on a GGUF, the standard ONNX Runtime export).  The protocol above
does not know which is which; the peers are only named so that every ratio is also reported against
the strongest of them (the fastest peer run): ``speedup_vs_strongest_peer``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy import ort_int8
from owl_deploy.bench.machine import (
    CpuMonitor,
    NoisePolicy,
    engine_env,
    hardware_info,
    noise_verdict,
    quiet_sample,
    speed_phases,
    versions_info,
)
from owl_deploy.bench.sessions import BatchedSession, DecodeSession, DeploymentTarget, Target, run_key
from owl_deploy.bench.weights import ModelInfo, load_model_info
from owl_deploy.configs import ENGINES, BenchConfig, engine_items
from owl_deploy.errors import OwlError

SCHEMA = "owl_deploy.bench/1"
SHORT = {
    "deepsparse": "DeepSparse",
    "onnxruntime": "ONNX Runtime",
    "llama.cpp": "llama.cpp",
    "ort-standard": "ORT standard",
}
#: the baseline every speedup is relative to, and the product whose speedup is the headline
REFERENCE = ("onnxruntime", "dense")
HEADLINE = ("deepsparse", "sparse")
#: the dense int8 reference when it is benchmarked (``--model dense-int8=ODIR``): ONNX Runtime on int8
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Samples:
    """What the timed rounds recorded for one session."""

    steps: list[float] = field(default_factory=list)  # seconds of every timed decode step
    rounds: list[float] = field(default_factory=list)  # tokens/s of each round's median step
    round_seconds: list[float] = field(default_factory=list)  # seconds of each round's timed steps
    prefill: list[float] = field(default_factory=list)  # prefill tokens/s of each round
    ttft: dict[int, list[float]] = field(default_factory=dict)  # prompt length -> seconds, each round
    tokens: list[int] = field(default_factory=list)  # greedy tokens of the first (warm-up) round
    first_logits: np.ndarray | None = None
    compile_seconds: float = 0.0
    kv_cache: str | None = None
    batch: int = 1
    rows_agree: bool = True


def _load(
    models: dict[str, Path | str], runs: list[tuple[str, str]], cfg: BenchConfig, log
) -> tuple[dict[str, ModelInfo], int]:
    """The deployments the runs name, checked against each other and the settings."""
    for engine, label in runs:
        if engine not in ENGINES:
            raise OwlError(f"unknown engine {engine!r}")
        if label not in models:
            raise OwlError(f"no model labelled {label!r}")
    used = list(dict.fromkeys(label for _, label in runs))
    infos = {label: load_model_info(models[label], label) for label in used}
    seqs = {info.sequence_length for info in infos.values()}
    if len(seqs) > 1:
        detail = ", ".join(f"{k} {v.sequence_length}" for k, v in infos.items())
        raise OwlError(f"the deployments differ in sequence length ({detail}); export them with the same one")
    seq = seqs.pop()
    # DeepSparse's internal KV cache holds one token fewer than the sequence length (runtime.Session.capacity)
    if cfg.context + cfg.steps >= seq:
        raise OwlError(
            f"--context {cfg.context} + --steps {cfg.steps} decode tokens = "
            f"{cfg.context + cfg.steps} exceeds the deployment's sequence length {seq} less one"
        )
    if max(cfg.prefill_lengths()) >= seq:
        raise OwlError(
            f"--prompt-lengths {max(cfg.prefill_lengths())} exceeds the deployment's sequence length {seq} less one"
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
    sessions: list[DecodeSession], tokens: list[int], cfg: BenchConfig, monitor: CpuMonitor, log
) -> tuple[dict[str, Samples], dict[str, Any]]:
    """Warm-up and timed rounds, sessions rotated every round; the samples and the CPU observations.
    ``tokens`` is the random prompt: its first ``context`` tokens before the decode steps, its prefixes
    for the prefill lengths."""
    samples = {s.key: Samples(compile_seconds=s.compile_seconds, kv_cache=s.kv_cache, batch=s.batch) for s in sessions}
    prompts = {n: tokens[:n] for n in cfg.prefill_lengths()}
    prompt = tokens[: cfg.context]
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
            res = s.run_round(prompt, prompts if s.batch == 1 else {}, cfg.steps)
            use = CpuMonitor.usage(a, monitor.sample())
            smp = samples[s.key]
            if not smp.tokens:  # the first round's greedy tokens and logits: the engines' agreement
                smp.tokens, smp.first_logits = res.tokens, res.first_logits
            smp.rows_agree = smp.rows_agree and res.rows_agree
            if not timed:
                continue
            for key in rnd:
                rnd[key] += use[key] * use["wall"] if key != "wall" else use["wall"]
            smp.steps.extend(res.steps)
            # per round: the median step (robust to a burst, consistent with the headline median)
            smp.rounds.append(1.0 / float(np.median(res.steps)))
            smp.round_seconds.append(float(np.sum(res.steps)))
            if res.prefill_seconds:
                smp.prefill.append(cfg.context / res.prefill_seconds)
            for n, sec in res.ttft.items():
                smp.ttft.setdefault(n, []).append(sec)
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


def phase_points(samples: dict[str, Samples]) -> list[dict[str, Any]]:
    """Every session-round as ``bench.machine.speed_phases`` takes it: its median step over the session's median
    round (a slower round > 1), and how long its timed steps took."""
    points = []
    for key, smp in samples.items():
        if not smp.rounds:
            continue
        usual = float(np.median(smp.rounds))
        points += [{"session": key, "relative": round(usual / tps, 4), "seconds": round(sec, 4)}
                   for tps, sec in zip(smp.rounds, smp.round_seconds, strict=True)]  # fmt: skip
    return points


def run_stats(
    samples: dict[str, Samples],
    bytes_per_token: dict[str, dict[str, int]],
    reference: str | None,
    bandwidth_gb_per_s: float | None,
    peers: Sequence[str] = (),
) -> dict[str, Any]:
    """Per run: decode/prefill statistics, the speedup over ``reference`` (ratio of medians, and per round
    the paired ratio), and the bytes-per-token ceiling. ``bytes_per_token`` is keyed like ``samples``.
    With ``peers`` (run keys), also the speedup over the strongest of them (:func:`strongest_peer`)."""
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
            "prefill_by_length": {
                str(n): {"tokens_per_s": summarize(n / t for t in secs), "ttft_ms": summarize(1e3 * t for t in secs)}
                for n, secs in sorted(smp.ttft.items())
            },
            "compile_seconds": round(smp.compile_seconds, 2),
            "kv_cache": smp.kv_cache,
            "bytes_per_token": bpt,
            "bytes_per_token_encoding": encoding,
            "ceiling_tokens_per_s": round(bandwidth_gb_per_s * 1e9 / bpt, 2) if bandwidth_gb_per_s else None,
        }
    strongest = strongest_peer(out, peers)
    for entry in out.values():
        if reference is None:  # a single model, or no dense ONNX Runtime run: no speedups
            entry.update(speedup_vs_dense_ort=None, speedup_by_round=summarize([]))
        else:
            entry.update(_ratio(entry, out[reference], "speedup_vs_dense_ort", "speedup_by_round"))
        if strongest:
            entry.update(
                _ratio(entry, out[strongest], "speedup_vs_strongest_peer", "speedup_vs_strongest_peer_by_round")
            )
        med, ceil = entry["decode_tokens_per_s"]["median"], entry["ceiling_tokens_per_s"]
        entry["fraction_of_ceiling"] = round(med / ceil, 4) if med and ceil else None
    return out


def throughput_stats(samples: dict[str, Samples], runs: dict[str, Any]) -> dict[str, Any]:
    """Per deployment run and batch size: decode tok/s per stream and in aggregate (batch x per stream), the
    step time, and whether the batched greedy tokens equal the batch-1 run's (every row, same prompt)."""
    out: dict[str, Any] = {}
    for key, smp in samples.items():
        base = key.split("@", 1)[0]
        if base not in runs:
            continue
        entry = out.setdefault(base, {})
        entry[str(smp.batch)] = {
            "per_stream_tokens_per_s": summarize(1.0 / t for t in smp.steps),
            "aggregate_tokens_per_s": summarize(smp.batch / t for t in smp.steps),
            "step_ms": summarize(1e3 * t for t in smp.steps),
            "aggregate_tokens_per_s_by_round": [round(smp.batch * x, 3) for x in smp.rounds],
            # every row decoded ONNX Runtime's batch-1 greedy tokens (None: this is batch 1)
            "same_greedy_tokens_as_batch_1": smp.rows_agree if smp.batch > 1 else None,
            "compile_seconds": round(smp.compile_seconds, 2),
            "kv_cache": smp.kv_cache,
        }
    return {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in out.items() if len(v) > 1}


def strongest_peer(runs: dict[str, Any], peers: Sequence[str]) -> str | None:
    """The peer run with the highest median decode tokens/s (None without peers)."""
    timed = [(runs[k]["decode_tokens_per_s"]["median"] or 0.0, k) for k in peers if k in runs]
    return max(timed)[1] if timed else None


def _ratio(run: dict[str, Any], ref: dict[str, Any], name: str, by_round: str) -> dict[str, Any]:
    """``run``'s median decode tokens/s over ``ref``'s, and the per-round paired ratios summarised."""
    med, ref_med = run["decode_tokens_per_s"]["median"], ref["decode_tokens_per_s"]["median"]
    pairs = zip(run["decode_tokens_per_s_by_round"], ref["decode_tokens_per_s_by_round"], strict=False)
    return {
        name: round(med / ref_med, 4) if med and ref_med else None,
        by_round: summarize(a / b for a, b in pairs if b),
    }


def headline_of(
    runs: dict[str, Any],
    bytes_per_token: dict[str, dict[str, int]],
    reference: str,
    headline: str,
    peers: Sequence[str] = (),
) -> dict[str, Any] | None:
    """The headline run against the reference, the second reference (our dense int8 graph) and the
    strongest peer (the fastest of ``peers``) when they were run, each with the bytes-per-token ceiling
    of that ratio (bitmask over dense bytes)."""
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
    strongest = strongest_peer(runs, peers)
    if strongest and strongest != headline:
        head["strongest_peer"] = strongest
        head["strongest_peer_decode_tokens_per_s"] = runs[strongest]["decode_tokens_per_s"]["median"]
        head.update(_ratio(he, runs[strongest], "speedup_vs_strongest_peer", "speedup_vs_strongest_peer_by_round"))
        head["ceiling_speedup_bytes_vs_strongest_peer"] = round(
            bytes_per_token[strongest]["dense"] / bytes_per_token[headline]["bitmask"], 3
        )
    return head


def run_benchmark(
    models: dict[str, Path | str],
    runs: list[tuple[str, str]],
    cfg: BenchConfig | None = None,
    policy: NoisePolicy | None = None,
    reference: tuple[str, str] | None = REFERENCE,
    headline: tuple[str, str] | None = HEADLINE,
    log: Callable[[str], None] | None = _log,
    hardware: dict[str, Any] | None = None,
    peers: Sequence[Target] = (),
) -> dict[str, Any]:
    """Benchmark every (engine, model label) of ``runs`` and every peer target; returns the results.json
    dictionary.

    ``models`` maps a label to a deployment folder; ``peers`` are targets from ``bench.peers`` (llama.cpp,
    the standard ONNX Runtime export), interleaved with the deployments under the same protocol.  With
    ``cfg.strict`` a machine that is busy before the run raises :class:`NoisyMachine` at once (the
    during-run verdict is the caller's to enforce).
    """
    cfg = cfg or BenchConfig()
    policy = policy or NoisePolicy()
    log = log or (lambda _m: None)
    started = _dt.datetime.now(_dt.UTC)
    loadavg_before = list(os.getloadavg())
    infos, seq = _load(models, runs, cfg, log)
    if reference is not None and reference not in runs:
        reference = None  # a single model or no dense ONNX Runtime run: statistics without speedups
    targets: list[Target] = [DeploymentTarget(e, infos[m]) for e, m in runs] + list(peers)
    keys = [t.key for t in targets]
    clash = sorted({k for k in keys if keys.count(k) > 1})
    if clash:
        raise OwlError(f"two runs share the key {clash[0]}; give the peer another label")
    peer_keys = [t.key for t in peers]

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
    vocab = min((t.vocab_size for t in targets if t.vocab_size), default=2)
    length = max(cfg.context, *cfg.prefill_lengths())
    tokens = [int(x) for x in np.random.default_rng(cfg.seed).integers(0, vocab, size=length)]

    sessions: list[DecodeSession] = []
    for target in targets:
        log(f"compiling {target.key}...")
        sessions.append(target.open(cfg, seq))
        log(f"  compiled in {sessions[-1].compile_seconds:.1f} s")
    for (engine, label), b in ((r, b) for b in cfg.batch_sizes if b > 1 for r in runs):
        log(f"compiling {run_key(engine, label)} at batch {b}...")
        sessions.append(BatchedSession(engine, infos[label], b, cfg, tokens[: cfg.context]))
        log(f"  compiled in {sessions[-1].compile_seconds:.1f} s")
    samples, during = _interleave(sessions, tokens, cfg, monitor, log)
    del sessions
    obs |= {"loadavg_after": [round(x, 2) for x in os.getloadavg()], **during}
    obs["cpu_speed"] = speed_phases(phase_points(samples), policy)
    reasons = noise_verdict(obs, policy, cpus)
    noise = {"noisy": bool(reasons), "reasons": reasons, **obs, "cpus": cpus, "policy": asdict(policy)}

    bpt = {t.key: t.bytes_per_token for t in targets}
    bandwidth = (hardware.get("memory_read_gb_per_s") or {}).get("all_cores")
    ref_key = run_key(*reference) if reference else None
    single = {k: v for k, v in samples.items() if v.batch == 1}
    results_runs = run_stats(single, bpt, ref_key, bandwidth, peer_keys)
    peer_results = (
        {
            "peers": {t.key: t.describe() for t in peers},
            "strongest_peer": strongest_peer(results_runs, peer_keys),
            "peer_agreement": _peer_agreement(peer_keys, ref_key, samples) if ref_key else {},
        }
        if peers
        else {}
    )
    throughput = throughput_stats(samples, results_runs)
    return {
        "schema": SCHEMA,
        "created": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {
            **cfg.to_json(),
            "sequence_length": seq,
            "environment": engine_env(),
            "onnxruntime_int8_weights": ort_int8.describe(),
        },
        "models": {label: info.describe() for label, info in infos.items()},
        "runs": results_runs,
        **({"throughput": throughput} if throughput else {}),
        **peer_results,
        "headline": headline_of(results_runs, bpt, ref_key, run_key(*headline), peer_keys)
        if headline and ref_key
        else None,
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


def _peer_agreement(peers: Sequence[str], reference: str, samples: dict[str, Samples]) -> dict[str, Any]:
    """Each peer against the reference run on the same prompt (a peer built from another model shows here):
    greedy tokens identical? max |logit difference| at the first step."""
    out: dict[str, Any] = {}
    ref = samples.get(reference)
    for key in peers:
        smp = samples.get(key)
        if ref is None or smp is None:
            continue
        diff = None
        a, b = ref.first_logits, smp.first_logits
        if a is not None and b is not None and a.shape == b.shape:
            diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        out[key] = {
            "versus": reference,
            "same_greedy_tokens": ref.tokens == smp.tokens,
            "first_step_max_abs_logit_diff": diff,
        }
    return out
