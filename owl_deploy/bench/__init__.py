"""``owl-deploy bench``: decode and prefill speed of deployments, side by side, noise-aware, gated.

The package, one job per module (imports point down this list):

* ``report``   results.md, decode.png and the summary lines of a results.json;
* ``gate``     the regression gate against a baseline results.json;
* ``peers``    llama.cpp and the standard ONNX Runtime export as targets (``--peer``; optional extra);
* ``measure``  interleaved rounds, statistics, the headline ratios;
* ``sessions`` what is timed: targets and their sessions (batch 1, batched, peers open their own);
* ``weights``  what a deployment reads per token: zeros, bytes, the bandwidth ceiling;
* ``machine``  CPU, flags, bandwidth, versions, and the noise monitor.

``results.json`` (schema ``owl_deploy.bench/1``, keys sorted)::

    settings   the BenchConfig, sequence_length, environment (WAND_*/NM_*/OMP_* variables)
    models     {label: path, sequence_length, weights {numel, nnz, sparsity, sparsity_excluding_lm_head,
               sparsity_by_role}, bytes_per_token {weights_dense, weights_bitmask, kv_cache, dense, bitmask}}
    runs       {"engine/model": decode_tokens_per_s {median, p10, p90, mean, min, max, n},
               decode_step_ms {...}, decode_tokens_per_s_by_round [...], decode_throughput_tokens_per_s,
               prefill_tokens_per_s {...}, prefill_by_length {N: tokens_per_s {...}, ttft_ms {...}},
               speedup_vs_dense_ort, speedup_by_round {...}   (null without a dense ONNX Runtime run),
               speedup_vs_strongest_peer, speedup_vs_strongest_peer_by_round {...}   (with peers),
               ceiling_tokens_per_s, fraction_of_ceiling, bytes_per_token(_encoding), compile_seconds, kv_cache}
    throughput (with --batch-sizes) {"engine/model": {B: per_stream_tokens_per_s {...}, aggregate_tokens_per_s {...},
               step_ms {...}, aggregate_tokens_per_s_by_round, same_greedy_tokens_as_batch_1, compile_seconds}}
    peers      (with --peer) {"engine/label": engine, label, path, bytes, spec, format, weights, bytes_per_token,
               kv_length_for_bytes, prepared (peer.json), runtime (versions, threads, llama.cpp system info)}
    strongest_peer   the peer run with the highest median decode tokens/s
    headline   run, reference, speedup_vs_dense_ort, speedup_by_round, decode_tokens_per_s,
               reference_decode_tokens_per_s, ceiling_speedup_bytes (+ the second reference's and the
               strongest peer's: speedup_vs_strongest_peer, ..._by_round, ceiling_speedup_bytes_vs_strongest_peer)
    agreement  {model: same_greedy_tokens, first_step_max_abs_logit_diff}   (both engines on one model)
    peer_agreement  {peer: versus, same_greedy_tokens, first_step_max_abs_logit_diff}   (against the reference)
    noise      noisy, reasons, loadavg_before/after, other_cpu_before, other_cpu_mean, other_cpu_rounds,
               steal_mean, own_cpu_mean, top_other_before/during, policy, cpu_speed {judged_rounds,
               slow_rounds, slow_over_fast, slow_sessions, two_speeds}   (the CPU's own phases)
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
from owl_deploy.bench.measure import REFERENCE, NoisyMachine, parse_engines, run_benchmark
from owl_deploy.bench.peers import load_peers, parse_peers
from owl_deploy.bench.report import check_out_dir, render_table, summary_lines, write_results
from owl_deploy.configs import BenchConfig
from owl_deploy.errors import OwlError

__all__ = [
    "EXIT_NOISY",
    "EXIT_REGRESSION",
    "GateFailed",
    "NoisyMachine",
    "bench_command",
    "parse_peers",
    "render_table",
    "run_benchmark",
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_command(
    models: dict[str, Path],
    out: Path | None,
    cfg: BenchConfig | None = None,
    baseline: Path | None = None,
    tolerance: float = 0.10,
    log: Callable[[str], None] | None = _log,
    policy: NoisePolicy | None = None,
    peers: dict[str, Path] | None = None,
    show: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """What ``owl-deploy bench`` does: run, gate, show, write; raises NoisyMachine / GateFailed at the end.

    ``models`` maps a label (``sparse``, ``dense``, ``dense-int8``, ...) to a deployment folder; ``peers``
    maps a peer run key (``llama.cpp/q8_0``, ``ort-standard/dense-int8``) to its GGUF file or folder;
    ``show`` prints the results (the CLI's stdout table); ``out`` (optional) receives the files.
    """
    cfg = cfg or BenchConfig()
    if not 0 <= tolerance < 1:
        raise OwlError(f"--tolerance must be in [0, 1), got {tolerance}")
    if out is not None:
        check_out_dir(out)  # before the run: its folder is replaced whole at the end
    runs = parse_engines(cfg.engines, models)
    if baseline is not None and REFERENCE not in runs:
        raise OwlError("--baseline gates speedups over dense ONNX Runtime: give --dense (keep ort/dense in --engines)")
    base = load_results(baseline) if baseline is not None else None
    targets = load_peers(peers, cfg) if peers else []
    res = run_benchmark({k: Path(v) for k, v in models.items()}, runs, cfg, policy, log=log, peers=targets)
    if cfg.strict and res["noise"]["noisy"]:
        raise NoisyMachine("machine was noisy (--strict), results not written: " + "; ".join(res["noise"]["reasons"]))
    if base is not None:
        res["gate"] = compare(res, base, tolerance)
        res["gate"]["baseline"] = str(baseline)
    if out is not None:
        write_results(res, out)
    if show:
        show(res)
    if log:
        for line in summary_lines(res):
            log(line)
        if out is not None:
            log(f"wrote {Path(out) / 'results.json'}, results.md, decode.png")
    if base is not None and not res["gate"]["passed"]:
        raise GateFailed(gate_message(res["gate"]))
    return res
