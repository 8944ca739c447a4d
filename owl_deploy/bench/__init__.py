"""``owl-deploy bench``: decode and prefill speed of deployments, side by side, noise-aware, gated.

The package, one job per module (imports point down this list):

* ``report``   results.md, decode.png and the summary lines of a results.json;
* ``gate``     the regression gate against a baseline results.json;
* ``measure``  sessions, interleaved rounds, statistics, the headline ratios;
* ``weights``  what a deployment reads per token: zeros, bytes, the bandwidth ceiling;
* ``machine``  CPU, flags, bandwidth, versions, and the noise monitor.

``results.json`` (schema ``owl_deploy.bench/1``, keys sorted)::

    settings   the BenchConfig, sequence_length, environment (WAND_*/NM_*/OMP_* variables)
    models     {label: path, sequence_length, weights {numel, nnz, sparsity, sparsity_excluding_lm_head,
               sparsity_by_role}, bytes_per_token {weights_dense, weights_bitmask, kv_cache, dense, bitmask}}
    runs       {"engine/model": decode_tokens_per_s {median, p10, p90, mean, min, max, n},
               decode_step_ms {...}, decode_tokens_per_s_by_round [...], decode_throughput_tokens_per_s,
               prefill_tokens_per_s {...}, speedup_vs_dense_ort, speedup_by_round {...},
               ceiling_tokens_per_s, fraction_of_ceiling, bytes_per_token(_encoding), compile_seconds, kv_cache}
    headline   run, reference, speedup_vs_dense_ort, speedup_by_round, decode_tokens_per_s,
               reference_decode_tokens_per_s, ceiling_speedup_bytes (+ the second reference's, when run)
    agreement  {model: same_greedy_tokens, first_step_max_abs_logit_diff}   (both engines on one model)
    noise      noisy, reasons, loadavg_before/after, other_cpu_before, other_cpu_mean, other_cpu_rounds,
               steal_mean, own_cpu_mean, top_other_before/during, policy
    hardware   cpu_model, flags {avx2, avx512f, avx512_vnni, avx_vnni, ...}, physical_cores, memory_gb,
               memory_read_gb_per_s {1_thread, all_cores}, deepsparse_isa, deepsparse_vnni
    versions   python, owl_deploy, deepsparse, onnxruntime, onnx, numpy, torch, git_commit
    gate       (with a baseline) tolerance, passed, regressed, checks [{run, baseline, current, change}], notes
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from owl_deploy.bench.gate import EXIT_NOISY, EXIT_REGRESSION, GateFailed, compare, gate_message, load_results
from owl_deploy.bench.machine import NoisePolicy
from owl_deploy.bench.measure import NoisyMachine, parse_engines, run_benchmark
from owl_deploy.bench.report import summary_lines, write_results
from owl_deploy.configs import BenchConfig
from owl_deploy.errors import OwlError

__all__ = ["EXIT_NOISY", "EXIT_REGRESSION", "GateFailed", "NoisyMachine", "bench_command", "run_benchmark"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_command(
    models: dict[str, Path],
    out: Path,
    cfg: BenchConfig | None = None,
    baseline: Path | None = None,
    tolerance: float = 0.10,
    log: Callable[[str], None] | None = _log,
    policy: NoisePolicy | None = None,
) -> dict[str, Any]:
    """What ``owl-deploy bench`` does: run, gate, write; raises NoisyMachine / GateFailed at the end.

    ``models`` maps a label (``sparse``, ``dense``, ``dense-int8``, ...) to a deployment folder.
    """
    cfg = cfg or BenchConfig()
    if not 0 <= tolerance < 1:
        raise OwlError(f"--tolerance must be in [0, 1), got {tolerance}")
    base = load_results(baseline) if baseline is not None else None
    runs = parse_engines(cfg.engines, models)
    res = run_benchmark({k: Path(v) for k, v in models.items()}, runs, cfg, policy, log=log)
    if cfg.strict and res["noise"]["noisy"]:
        raise NoisyMachine("machine was noisy (--strict), results not written: " + "; ".join(res["noise"]["reasons"]))
    if base is not None:
        res["gate"] = compare(res, base, tolerance)
        res["gate"]["baseline"] = str(baseline)
    write_results(res, out)
    if log:
        for line in summary_lines(res):
            log(line)
        log(f"wrote {Path(out) / 'results.json'}, results.md, decode.png")
    if base is not None and not res["gate"]["passed"]:
        raise GateFailed(gate_message(res["gate"]))
    return res
