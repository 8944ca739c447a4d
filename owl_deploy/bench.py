"""Decode benchmark: the sparse model in DeepSparse against the dense model in ONNX Runtime, noise-aware.

What is measured (batch 1, every engine x model in one process, interleaved round by round):

* **prefill** tokens/s: the ``context``-token prompt run through a multi-token copy of the decode graph
  (``--prefill-chunk`` tokens per call, the same re-declaration DeepSparse's pipeline makes), the
  remainder one token at a time;
* **decode** tokens/s: ``steps`` single-token steps with the cache filled to ``context`` tokens; a step
  is timed from building its inputs (including the KV-cache shift) to having the next greedy token.

Round 0 (``warmup_rounds``) is run but not counted; the order of the sessions rotates every round so
none always follows the same neighbour; a short untimed pause separates sessions so one engine's
spinning threads have stopped before the next one starts.  Each statistic is a median with its 10th
and 90th percentile.  The headline is ``speedup_vs_dense_ort`` of DeepSparse on the sparse model: its
median decode tokens/s over that of ONNX Runtime on the dense model.

Noise: DeepSparse pins one thread per core, so any other load collapses its numbers.  The benchmark
records the load average before and after, samples the CPU time of every *other* process (system
busy time minus this process) during each timed session, and names the heaviest other processes.
The thresholds are in :class:`NoisePolicy`; a noisy run is flagged (``--strict`` refuses it).

Physical ceiling: decode reads every weight once per token, so
``tokens/s <= memory read bandwidth / bytes per token``.  Bytes per token come from the ONNX
initializers: weights feeding a MatMul are read whole (dense: ``numel x itemsize``; a sparse kernel
with a bitmask: ``nnz x itemsize + numel / 8``, whichever is smaller), a Gather table one row per token,
the KV cache whole (static shapes: attention always covers the full sequence length).

Sessions run through ``owl_deploy.runtime`` (the product path: DeepSparse with its internal KV cache
unless ``kv_cache="external"``).  ``driver="contract"`` instead feeds the engines through the export
contract directly (numpy KV cache), an independent cross-check that depends on nothing but the contract.

``results.json`` (schema ``owl_deploy.bench/1``, keys sorted)::

    settings   context, steps, rounds, warmup_rounds, prefill_chunk, threads, kv_cache, driver,
               sequence_length, environment (WAND_*/NM_*/OMP_* variables)
    models     {label: path, sequence_length, weights {numel, nnz, sparsity, sparsity_excluding_lm_head,
               sparsity_by_role}, bytes_per_token {weights_dense, weights_bitmask, kv_cache, dense, bitmask}}
    runs       {"engine/model": decode_tokens_per_s {median, p10, p90, mean, min, max, n},
               decode_step_ms {...}, decode_tokens_per_s_by_round [...], decode_throughput_tokens_per_s,
               prefill_tokens_per_s {...}, speedup_vs_dense_ort, speedup_by_round {...},
               ceiling_tokens_per_s, fraction_of_ceiling, bytes_per_token(_encoding), compile_seconds, kv_cache}
    headline   run, reference, speedup_vs_dense_ort, speedup_by_round, decode_tokens_per_s,
               reference_decode_tokens_per_s, ceiling_speedup_bytes
    agreement  {model: same_greedy_tokens, first_step_max_abs_logit_diff}   (both engines on one model)
    noise      noisy, reasons, loadavg_before/after, other_cpu_before, other_cpu_mean, other_cpu_rounds,
               steal_mean, own_cpu_mean, top_other_before/during, policy
    hardware   cpu_model, flags {avx2, avx512f, avx512_vnni, avx_vnni, ...}, physical_cores, memory_gb,
               memory_read_gb_per_s {1_thread, all_cores}, deepsparse_isa, deepsparse_vnni
    versions   python, owl_deploy, deepsparse, onnxruntime, onnx, numpy, torch, git_commit
    gate       (with a baseline) tolerance, passed, regressed, checks [{run, baseline, current, change}], notes
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np

from owl_deploy.errors import OwlError

SCHEMA = "owl_deploy.bench/1"
MODEL_ONNX = "model.onnx"
EXPORT_JSON = "export.json"
ENGINES = ("deepsparse", "onnxruntime")
ENGINE_ALIASES = {"ds": "deepsparse", "deepsparse": "deepsparse", "ort": "onnxruntime", "onnxruntime": "onnxruntime"}
SHORT = {"deepsparse": "DeepSparse", "onnxruntime": "ONNX Runtime"}
#: the baseline every speedup is relative to, and the product whose speedup is the headline
REFERENCE = ("onnxruntime", "dense")
HEADLINE = ("deepsparse", "sparse")
#: the strongest dense peer when it is benchmarked (``--model dense-int8=ODIR``): ONNX Runtime on int8
SECOND_REFERENCE = ("onnxruntime", "dense-int8")
#: exit status of ``owl-deploy bench`` when the regression gate fails / when --strict refuses a noisy run
EXIT_REGRESSION = 3
EXIT_NOISY = 4

_WEIGHT_OPS = {"MatMul": 1, "MatMulInteger": 1, "Gemm": 1, "Conv": 1}  # op -> index of its weight input
_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed")


class GateFailed(OwlError):
    """The speedup of at least one engine fell more than the tolerance below the baseline's."""


class NoisyMachine(OwlError):
    """``--strict`` and the machine was busy: the numbers would not mean anything."""


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class NoisePolicy:
    """When a run counts as noisy.  ``cores`` = CPU time per second of wall time (1.0 = one busy core)."""

    #: other processes' mean CPU use during the timed sessions
    other_cpu_mean: float = 0.20
    #: other processes' CPU use during any single round (a burst)
    other_cpu_round: float = 0.50
    #: other processes' CPU use in a 1 s sample just before the run
    other_cpu_before: float = 0.20
    #: CPU time stolen by the hypervisor during the timed sessions
    steal_mean: float = 0.10
    #: 1-minute load average before the run, per logical CPU (lags: it remembers the last minute)
    loadavg_per_cpu: float = 1.0
    #: rounds shorter than this are too short for the 10 ms kernel tick to judge on their own
    min_round_seconds: float = 0.25
    #: length of the idle sample taken before compiling
    before_sample_seconds: float = 1.0


@dataclass
class BenchSettings:
    context: int = 128
    steps: int = 32
    rounds: int = 5
    warmup_rounds: int = 1
    prefill_chunk: int = 16  # tokens per multi-token prefill call: 1 or a multiple of 4 (DeepSparse's rule)
    threads: int | None = None  # None: every physical core, both engines
    kv_cache: str | None = None  # DeepSparse: "internal" (the runtime's default) or "external"
    driver: str = "runtime"  # "runtime": owl_deploy.runtime (the product); "contract": this module's own feeding
    seed: int = 0
    gap_seconds: float = 0.05
    measure_bandwidth: bool = True

    def validate(self) -> None:
        if self.prefill_chunk == 0:  # "no multi-token prefill" = one token per call
            self.prefill_chunk = 1
        if self.context < 1:
            raise OwlError(f"--context must be at least 1, got {self.context}")
        if self.steps < 1:
            raise OwlError(f"--steps must be at least 1, got {self.steps}")
        if self.rounds < 1:
            raise OwlError(f"--rounds must be at least 1, got {self.rounds}")
        if self.warmup_rounds < 0:
            raise OwlError(f"--warmup-rounds must be >= 0, got {self.warmup_rounds}")
        if self.prefill_chunk < 1 or (self.prefill_chunk > 1 and self.prefill_chunk % 4):
            raise OwlError(f"--prefill-chunk must be 1 or a multiple of 4, got {self.prefill_chunk}")
        if self.kv_cache not in (None, "internal", "external"):
            raise OwlError(f"--kv-cache must be internal or external, got {self.kv_cache!r}")
        if self.driver not in ("runtime", "contract"):
            raise OwlError(f"unknown driver {self.driver!r}")
        if self.driver == "contract" and self.kv_cache == "internal":
            raise OwlError("the contract driver keeps the KV cache in numpy (external) only")
        if self.threads is not None and self.threads < 1:
            raise OwlError(f"--threads must be at least 1, got {self.threads}")


# ---------------------------------------------------------------- statistics
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

    The reference (ONNX Runtime on the dense model) is always included: every speedup needs it.
    """
    models = list(models)
    pairs: list[tuple[str, str]] = []
    items = ["all"] if not spec else [s.strip() for s in spec.split(",") if s.strip()]
    for item in items:
        if item == "all":
            pairs += [(e, m) for m in reversed(models) for e in ENGINES]
            continue
        eng, _, model = item.replace(":", "/").partition("/")
        engine = ENGINE_ALIASES.get(eng.lower())
        if engine is None:
            raise OwlError(f"unknown engine {eng!r} in --engines; use ds|deepsparse or ort|onnxruntime")
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


# ---------------------------------------------------------------- the export folder and its graph
@dataclass
class ModelInfo:
    """What the benchmark needs to know about one export folder."""

    label: str
    folder: Path
    onnx_path: Path
    input_names: list[str]
    output_names: list[str]
    sequence_length: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    vocab_size: int | None
    export: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    bytes_per_token: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.folder),
            "onnx_bytes": self.onnx_path.stat().st_size,
            "sequence_length": self.sequence_length,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "export": self.export,
            "weights": self.weights,
            "bytes_per_token": self.bytes_per_token,
        }


def _dims(value_info) -> list[int | str]:
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    return out


def load_model_info(folder: Path | str, label: str, with_weights: bool = True) -> ModelInfo:
    """Check that ``folder`` is an export folder in the decode contract; read shapes and weight statistics."""
    import onnx

    folder = Path(folder)
    if not folder.exists():
        raise OwlError(f"--{label} {folder}: no such folder")
    if folder.is_file() and folder.suffix == ".onnx":
        onnx_path, folder = folder, folder.parent
    elif folder.is_dir():
        onnx_path = folder / MODEL_ONNX
    else:
        raise OwlError(f"--{label} {folder}: not an export folder (expected a folder with {MODEL_ONNX})")
    if not onnx_path.is_file():
        raise OwlError(f"--{label} {folder}: not an export folder (no {MODEL_ONNX}; run `owl-deploy export` first)")
    export: dict[str, Any] = {}
    ej = folder / EXPORT_JSON
    if ej.is_file():
        try:
            raw = json.loads(ej.read_text())
        except (OSError, ValueError) as exc:
            raise OwlError(f"--{label} {ej}: unreadable ({exc})") from exc
        if isinstance(raw, dict):
            export = {k: v for k, v in raw.items() if isinstance(v, str | int | float | bool) or v is None}
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise OwlError(f"--{label} {onnx_path}: not a readable ONNX file ({_one_line(exc)})") from exc
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    in_names = [i.name for i in inputs]
    out_names = [o.name for o in proto.graph.output]
    shapes = {i.name: _dims(i) for i in inputs}
    missing = [n for n in ("input_ids", "attention_mask", "positions", "causal_mask") if n not in shapes]
    past = [n for n in in_names if n.startswith("past_key_values.")]
    if missing or not past or "logits" not in out_names:
        what = ", ".join(missing) if missing else ("past_key_values.*" if not past else "output logits")
        raise OwlError(
            f"--{label} {onnx_path}: not a KV-cache decode graph in the DeepSparse contract (missing {what})"
        )
    num_layers = len(past) // 2
    for i in range(num_layers):
        for kind in ("key", "value"):
            if f"past_key_values.{i}.{kind}" not in shapes or f"present.{i}.{kind}" not in out_names:
                raise OwlError(f"--{label} {onnx_path}: missing past_key_values.{i}.{kind} or present.{i}.{kind}")
    am = shapes["attention_mask"]
    ids = shapes["input_ids"]
    pk = shapes["past_key_values.0.key"]
    if len(am) != 2 or not isinstance(am[1], int) or len(pk) != 4 or not all(isinstance(d, int) for d in pk[1:]):
        raise OwlError(f"--{label} {onnx_path}: the graph needs static shapes (attention_mask {am}, past {pk})")
    if ids != [1, 1]:
        raise OwlError(f"--{label} {onnx_path}: expected a single-token decode graph (input_ids [1, 1]), got {ids}")
    seq = int(am[1])
    if pk[2] != seq - 1:
        raise OwlError(f"--{label} {onnx_path}: past length {pk[2]} != sequence length {seq} - 1")
    if "sequence_length" in export and int(export["sequence_length"]) != seq:
        raise OwlError(f"--{label}: export.json says sequence length {export['sequence_length']}, model.onnx {seq}")
    past_vi = next(i for i in inputs if i.name == "past_key_values.0.key")
    kv_dtype = onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[past_vi.type.tensor_type.elem_type].name
    logits_vi = next(o for o in proto.graph.output if o.name == "logits")
    ld = _dims(logits_vi)
    vocab = ld[-1] if ld and isinstance(ld[-1], int) else None
    info = ModelInfo(
        label=label,
        folder=folder,
        onnx_path=onnx_path,
        input_names=in_names,
        output_names=out_names,
        sequence_length=seq,
        num_layers=num_layers,
        num_kv_heads=int(pk[1]),
        head_dim=int(pk[3]),
        kv_dtype=kv_dtype,
        vocab_size=vocab,
        export=export,
    )
    if with_weights:
        info.weights, info.bytes_per_token = weight_statistics(proto, onnx_path.parent, info)
        if info.vocab_size is None:
            info.vocab_size = info.weights.get("vocab_size")
    del proto
    return info


def _tensor_array(tensor, base_dir: Path) -> np.ndarray:
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(tensor):
        import onnx

        info = {e.key: e.value for e in tensor.external_data}
        dtype = np.dtype(onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[tensor.data_type])
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        path = base_dir / info["location"]
        offset = int(info.get("offset", 0))
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _role(name: str) -> str | None:
    for r in _ROLES:
        if r in name:
            return r
    return None


def weight_statistics(proto, base_dir: Path, info: ModelInfo) -> tuple[dict[str, Any], dict[str, int]]:
    """Count weights and nonzeros in the initializers; bytes read per decode token under two encodings.

    A MatMul/Gemm weight is read whole every token: ``dense`` = numel x itemsize; ``bitmask`` = nnz x
    itemsize + numel/8 (values plus a one-bit-per-weight mask; a kernel would keep the dense layout
    where that is smaller).  For MatMulInteger a "zero" is the weight's zero point.  A Gather table
    (the embedding) costs one row per token; other initializers are read whole.  The KV cache is
    read whole: attention covers the full static sequence length.
    """
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in proto.graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))
    inits = {t.name: t for t in proto.graph.initializer}
    dense_b = bitmask_b = 0
    numel_all = nnz_all = 0
    numel_prunable = nnz_prunable = 0
    lm_head = {"numel": 0, "nnz": 0}
    per_role: dict[str, dict[str, int]] = {}
    n_weights = 0
    vocab = None
    for name, t in inits.items():
        uses = consumers.get(name, [])
        itemsize = _itemsize(t)
        numel = int(np.prod(t.dims)) if t.dims else 1
        weight_use = [(n, i) for n, i in uses if _WEIGHT_OPS.get(n.op_type) == i]
        gather_use = [(n, i) for n, i in uses if n.op_type == "Gather" and i == 0]
        if weight_use and numel > 1:
            arr = _tensor_array(t, base_dir)
            zero = 0
            node = weight_use[0][0]
            if node.op_type == "MatMulInteger" and len(node.input) > 3 and node.input[3] in inits:
                zp = _tensor_array(inits[node.input[3]], base_dir)
                zero = int(zp.reshape(-1)[0]) if zp.size else 0
            nnz = int(np.count_nonzero(arr != zero)) if zero else int(np.count_nonzero(arr))
            del arr
            dense = numel * itemsize
            dense_b += dense
            bitmask_b += min(dense, nnz * itemsize + math.ceil(numel / 8))
            numel_all += numel
            nnz_all += nnz
            n_weights += 1
            is_head = "logits" in node.output or _role(name) == "lm_head"
            if is_head:
                lm_head["numel"] += numel
                lm_head["nnz"] += nnz
                vocab = int(t.dims[-1]) if t.dims else None
            else:
                numel_prunable += numel
                nnz_prunable += nnz
            role = _role(name) or ("lm_head" if is_head else "other")
            agg = per_role.setdefault(role, {"numel": 0, "nnz": 0})
            agg["numel"] += numel
            agg["nnz"] += nnz
        elif gather_use and len(t.dims) >= 2:
            row = int(np.prod(t.dims[1:])) * itemsize
            dense_b += row
            bitmask_b += row
        else:
            nbytes = numel * itemsize
            dense_b += nbytes
            bitmask_b += nbytes
    kv_itemsize = np.dtype(info.kv_dtype).itemsize
    kv = 2 * info.num_layers * info.num_kv_heads * info.sequence_length * info.head_dim * kv_itemsize

    def _sp(numel: int, nnz: int) -> float | None:
        return None if numel == 0 else 1.0 - nnz / numel

    weights = {
        "matmul_weights": n_weights,
        "numel": numel_all,
        "nnz": nnz_all,
        "sparsity": _sp(numel_all, nnz_all),
        "sparsity_excluding_lm_head": _sp(numel_prunable, nnz_prunable),
        "lm_head_sparsity": _sp(lm_head["numel"], lm_head["nnz"]),
        "sparsity_by_role": {r: _sp(v["numel"], v["nnz"]) for r, v in sorted(per_role.items())},
        "vocab_size": vocab,
    }
    bpt = {
        "weights_dense": int(dense_b),
        "weights_bitmask": int(bitmask_b),
        "kv_cache": int(kv),
        "dense": int(dense_b + kv),
        "bitmask": int(bitmask_b + kv),
    }
    return weights, bpt


def _itemsize(t) -> int:
    import onnx

    return np.dtype(onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[t.data_type]).itemsize


# ---------------------------------------------------------------- hardware and versions
def measure_read_bandwidth(nbytes: int = 1 << 30, threads: int = 1, repeats: int = 4) -> float:
    """Memory read bandwidth in bytes/s: best of ``repeats`` passes of ``max`` over ``nbytes`` of float32.

    ``threads`` numpy reductions run side by side (numpy releases the GIL in them).  1 GiB is several
    times any last-level cache this code runs on.
    """
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(nbytes // 4, dtype=np.float32)  # np.ones touches every page
    chunks = np.array_split(a, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(np.max, chunks))
            best = min(best, time.perf_counter() - t0)
    size = a.nbytes
    del a, chunks
    return size / best


def _cpuinfo() -> dict[str, Any]:
    out: dict[str, Any] = {"model": platform.processor() or platform.machine(), "vendor": None, "flags": set()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                out["model"] = value
            elif key == "vendor_id":
                out["vendor"] = value
            elif key == "flags" and not out["flags"]:
                out["flags"] = set(value.split())
    return out


def hardware_info(measure_bandwidth: bool = True, deepsparse_view: bool = True) -> dict[str, Any]:
    """CPU model, vector extensions, cores, memory, and (once) the measured memory read bandwidth."""
    import psutil

    cpu = _cpuinfo()
    flags = cpu["flags"]
    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    info: dict[str, Any] = {
        "cpu_model": cpu["model"],
        "cpu_vendor": cpu["vendor"],
        "flags": {
            "avx2": "avx2" in flags,
            "fma": "fma" in flags,
            "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx_int8": "amx_int8" in flags,
        },
        "hypervisor": "hypervisor" in flags,
        "logical_cpus": logical,
        "physical_cores": physical,
        "usable_cpus": affinity,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "machine": platform.machine(),
        "kernel": platform.release(),
    }
    if deepsparse_view:
        try:
            from deepsparse.cpu import cpu_architecture

            arch = cpu_architecture()
            info["deepsparse_isa"] = arch.isa
            info["deepsparse_vnni"] = bool(arch.vnni)
        except Exception as exc:  # the benchmark still works without DeepSparse's view
            info["deepsparse_isa"] = f"unavailable: {_one_line(exc)}"
    if measure_bandwidth:
        bw1 = measure_read_bandwidth(threads=1)
        bwn = measure_read_bandwidth(threads=max(1, physical))
        info["memory_read_gb_per_s"] = {"1_thread": round(bw1 / 1e9, 2), "all_cores": round(bwn / 1e9, 2)}
    return info


def versions_info() -> dict[str, Any]:
    from importlib import metadata

    import owl_deploy

    out: dict[str, Any] = {"python": platform.python_version(), "owl_deploy": owl_deploy.__version__}
    for pkg in ("deepsparse", "onnxruntime", "onnx", "numpy", "torch", "transformers", "psutil"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    repo = Path(__file__).resolve().parent.parent
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            out["git_commit"] = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    return out


# ---------------------------------------------------------------- noise
class CpuMonitor:
    """System-wide busy/steal CPU time versus this process's own, so other processes' use is the difference."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()

    def sample(self) -> tuple[float, float, float, float]:
        """(wall, busy, steal, own) in seconds."""
        t = self._psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        own = self._me.cpu_times()
        return time.perf_counter(), busy, getattr(t, "steal", 0.0), own.user + own.system

    @staticmethod
    def usage(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> dict[str, float]:
        """Cores used between two samples: by other processes, stolen, and by this process."""
        wall = max(b[0] - a[0], 1e-9)
        own = max(b[3] - a[3], 0.0)
        other = max((b[1] - a[1]) - own, 0.0)
        return {"wall": wall, "other": other / wall, "steal": max(b[2] - a[2], 0.0) / wall, "own": own / wall}

    def process_times(self) -> dict[int, tuple[str, float]]:
        """CPU time of every other process (pid -> (name, seconds))."""
        out = {}
        me = os.getpid()
        for p in self._psutil.process_iter(["pid", "name", "cpu_times", "cmdline"]):
            try:
                if p.info["pid"] == me or p.info["cpu_times"] is None:
                    continue
                ct = p.info["cpu_times"]
                cmd = " ".join(p.info["cmdline"] or [])[:80] or p.info["name"]
                out[p.info["pid"]] = (cmd, ct.user + ct.system)
            except (self._psutil.Error, TypeError):
                continue
        return out

    @staticmethod
    def top(before: dict, after: dict, wall: float, n: int = 3) -> list[dict[str, Any]]:
        rows = []
        for pid, (name, t1) in after.items():
            if pid in before:
                cores = (t1 - before[pid][1]) / max(wall, 1e-9)
                if cores >= 0.02:
                    rows.append({"pid": pid, "command": name, "cores": round(cores, 3)})
        return sorted(rows, key=lambda r: -r["cores"])[:n]


def noise_verdict(obs: dict[str, Any], policy: NoisePolicy, cpus: int) -> list[str]:
    """Reasons the run is noisy (empty = quiet), from the observations ``run_benchmark`` records."""
    reasons = []
    before = obs.get("other_cpu_before")
    if before is not None and before > policy.other_cpu_before:
        reasons.append(
            f"other processes used {before:.2f} cores just before the run (limit {policy.other_cpu_before:.2f})"
            + _top_text(obs.get("top_other_before"))
        )
    la = obs.get("loadavg_before")
    if la and la[0] > policy.loadavg_per_cpu * cpus:
        reasons.append(
            f"1-minute load average {la[0]:.2f} before the run exceeds {policy.loadavg_per_cpu * cpus:.2f} "
            f"({policy.loadavg_per_cpu:g} per CPU x {cpus})"
        )
    mean = obs.get("other_cpu_mean")
    if mean is not None and mean > policy.other_cpu_mean:
        reasons.append(
            f"other processes used {mean:.2f} cores on average during the timed sessions "
            f"(limit {policy.other_cpu_mean:.2f})" + _top_text(obs.get("top_other_during"))
        )
    for i, (cores, wall) in enumerate(zip(obs.get("other_cpu_rounds", []), obs.get("round_seconds", []), strict=False)):
        if cores is not None and wall >= policy.min_round_seconds and cores > policy.other_cpu_round:
            reasons.append(
                f"round {i + 1}: other processes used {cores:.2f} cores (limit {policy.other_cpu_round:.2f})"
            )
            break
    steal = obs.get("steal_mean")
    if steal is not None and steal > policy.steal_mean:
        reasons.append(
            f"the hypervisor stole {steal:.2f} cores during the timed sessions (limit {policy.steal_mean:.2f})"
        )
    return reasons


def _top_text(top: list[dict[str, Any]] | None) -> str:
    if not top:
        return ""
    return "; busiest: " + ", ".join(f"{r['command'][:40]} (pid {r['pid']}) {r['cores']:.2f}" for r in top)


def quiet_sample(monitor: CpuMonitor, seconds: float = 1.0) -> tuple[float, list[dict[str, Any]]]:
    """Other processes' CPU use over ``seconds`` of this process sleeping, and the busiest of them."""
    procs = monitor.process_times()
    a = monitor.sample()
    time.sleep(seconds)
    b = monitor.sample()
    use = CpuMonitor.usage(a, b)
    return use["other"], CpuMonitor.top(procs, monitor.process_times(), use["wall"])


# ---------------------------------------------------------------- engines (a thin adapter on the contract)
class _Runner:
    """One compiled graph: ``run(feed) -> outputs`` in the graph's output order."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class _DeepSparseRunner(_Runner):
    def __init__(self, path: Path, input_names: list[str], output_names: list[str], threads: int | None):
        from deepsparse import Engine

        self.input_names, self.output_names = input_names, output_names
        with _quiet_stdout():
            self.engine = Engine(model=str(path), batch_size=1, num_cores=threads)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.engine.run([feed[n] for n in self.input_names], val_inp=False)


class _OrtRunner(_Runner):
    def __init__(self, path: Path, input_names: list[str], output_names: list[str], threads: int | None):
        import onnxruntime as ort

        self.input_names, self.output_names = input_names, output_names
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or _physical_cores()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


def make_runner(engine: str, path: Path, info: ModelInfo, threads: int | None) -> _Runner:
    cls = {"deepsparse": _DeepSparseRunner, "onnxruntime": _OrtRunner}[engine]
    try:
        return cls(path, info.input_names, info.output_names, threads)
    except OwlError:
        raise
    except Exception as exc:
        raise OwlError(f"{SHORT[engine]} could not compile {path}: {_one_line(exc)}") from exc


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@contextlib.contextmanager
def _quiet_stdout():
    """DeepSparse prints a banner on stdout at the first compile; keep stdout for our own output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def redeclare(info: ModelInfo, input_ids_length: int, dest_dir: Path) -> Path:
    """A copy of the decode graph declared for ``input_ids_length`` new tokens (DeepSparse's prefill trick).

    Internal shapes are computed from the inputs, so only the declared input/output shapes change.
    External data files are linked, not copied.
    """
    import onnx

    n, total = input_ids_length, info.sequence_length
    proto = onnx.load(str(info.onnx_path), load_external_data=False)
    shapes = {
        "input_ids": [1, n],
        "positions": [1, n],
        "attention_mask": [1, total],
        "causal_mask": [1, 1, n, total],
    }
    for inp in proto.graph.input:
        if inp.name.startswith("past_key_values."):
            dims: list[int | str] = [1, info.num_kv_heads, total - n, info.head_dim]
        elif inp.name in shapes:
            dims = shapes[inp.name]
        else:
            continue
        _set_dims(inp, dims)
    for out in proto.graph.output:
        if out.name == "logits":
            _set_dims(out, [1, n, info.vocab_size or "vocab"])
        elif out.name.startswith("present."):
            _set_dims(out, [1, info.num_kv_heads, total, info.head_dim])
    del proto.graph.value_info[:]
    dest_dir.mkdir(parents=True, exist_ok=True)
    for f in info.onnx_path.parent.iterdir():
        if f.is_file() and f.suffix not in (".onnx", ".json") and f.name != EXPORT_JSON:
            link = dest_dir / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
    dest = dest_dir / MODEL_ONNX
    onnx.save(proto, str(dest))
    return dest


def _set_dims(value_info, dims: list[int | str]) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, int):
            shape.dim.add().dim_value = d
        else:
            shape.dim.add().dim_param = d


# ---------------------------------------------------------------- one engine x model session
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

    def __init__(self, engine: str, info: ModelInfo, settings: BenchSettings):
        from owl_deploy import runtime

        self.key = run_key(engine, info.label)
        kv = settings.kv_cache if engine == "deepsparse" else None
        self.session = runtime.compile(
            info.folder, engine, prefill_length=settings.prefill_chunk, kv_cache=kv, num_threads=settings.threads
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


class ContractSession(DecodeSession):
    """The engines driven directly through the export contract (external KV cache kept in numpy).

    An independent implementation of the runtime's feeding: right-aligned cache like DeepSparse's;
    a call with n new tokens feeds ``present[:, :, n:, :]`` of the previous call as the past.
    """

    def __init__(self, engine: str, info: ModelInfo, settings: BenchSettings, workdir: Path):
        self.engine, self.info, self.settings = engine, info, settings
        self.key = run_key(engine, info.label)
        self.kv_cache = "external"
        t0 = time.perf_counter()
        self.step_runner = make_runner(engine, info.onnx_path, info, settings.threads)
        self.chunk_runner = None
        chunk = settings.prefill_chunk
        if 1 < chunk < info.sequence_length:
            path = redeclare(info, chunk, workdir / f"{info.label}-{engine}-n{chunk}")
            self.chunk_runner = make_runner(engine, path, info, settings.threads)
        self.compile_seconds = time.perf_counter() - t0
        self.cache: list[np.ndarray] = self.empty_cache()
        self.num_cached = 0

    def empty_cache(self) -> list[np.ndarray]:
        i = self.info
        shape = (1, i.num_kv_heads, i.sequence_length, i.head_dim)
        return [np.zeros(shape, dtype=i.kv_dtype) for _ in range(2 * i.num_layers)]

    def _feed(self, ids: list[int]) -> dict[str, np.ndarray]:
        n, total, num_cached = len(ids), self.info.sequence_length, self.num_cached
        capacity = total - n
        if num_cached > capacity:
            raise OwlError(f"{num_cached} cached + {n} new tokens exceed the sequence length {total}")
        from owl_deploy.runtime import contract_feeds

        feed = contract_feeds(ids, num_cached, total)
        for i in range(self.info.num_layers):
            feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(self.cache[2 * i][:, :, n:, :])
            feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(self.cache[2 * i + 1][:, :, n:, :])
        return feed

    def _call(self, runner: _Runner, ids: list[int]) -> np.ndarray:
        outs = runner.run(self._feed(ids))
        names = runner.output_names
        new_cache = []
        for i in range(self.info.num_layers):
            new_cache.append(outs[names.index(f"present.{i}.key")])
            new_cache.append(outs[names.index(f"present.{i}.value")])
        self.cache, self.num_cached = new_cache, self.num_cached + len(ids)
        return outs[names.index("logits")][0]

    def prefill(self, prompt: list[int]) -> tuple[int, float]:
        self.cache, self.num_cached = self.empty_cache(), 0
        t0 = time.perf_counter()
        chunk, pos, logits = self.settings.prefill_chunk, 0, None
        if self.chunk_runner is not None:
            while len(prompt) - pos >= chunk:
                logits = self._call(self.chunk_runner, prompt[pos : pos + chunk])
                pos += chunk
        while pos < len(prompt):
            logits = self._call(self.step_runner, [prompt[pos]])
            pos += 1
        token = int(np.argmax(logits[-1]))
        return token, time.perf_counter() - t0

    def _step(self, token: int) -> np.ndarray:
        return self._call(self.step_runner, [token])[-1]


def open_session(engine: str, info: ModelInfo, settings: BenchSettings, workdir: Path) -> DecodeSession:
    if settings.driver == "runtime":
        return RuntimeSession(engine, info, settings)
    return ContractSession(engine, info, settings, workdir)


# ---------------------------------------------------------------- the benchmark
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_benchmark(
    models: dict[str, Path | str],
    runs: list[tuple[str, str]],
    settings: BenchSettings | None = None,
    policy: NoisePolicy | None = None,
    reference: tuple[str, str] = REFERENCE,
    headline: tuple[str, str] | None = HEADLINE,
    log: Callable[[str], None] | None = _log,
    strict: bool = False,
    hardware: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark every (engine, model label) of ``runs``; returns the results.json dictionary.

    ``models`` maps a label to an export folder.  With ``strict`` a machine that is busy before the run
    raises :class:`NoisyMachine` at once (the during-run verdict is the caller's to enforce).
    """
    settings = settings or BenchSettings()
    policy = policy or NoisePolicy()
    settings.validate()
    log = log or (lambda _m: None)
    started = _dt.datetime.now(_dt.UTC)
    loadavg_before = list(os.getloadavg())
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
        raise OwlError(f"the exports differ in sequence length ({detail}); export them with the same one")
    seq = seqs.pop()
    if settings.context + settings.steps > seq:
        raise OwlError(
            f"--context {settings.context} + --steps {settings.steps} decode tokens = "
            f"{settings.context + settings.steps} exceeds the export's sequence length {seq}"
        )
    vocabs = {i.vocab_size for i in infos.values() if i.vocab_size}
    vocab = min(vocabs) if vocabs else 2
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
        if strict:
            raise NoisyMachine("machine is busy (--strict): " + "; ".join(early))
    if hardware is None:
        log("measuring memory read bandwidth (once)...")
        hardware = hardware_info(measure_bandwidth=settings.measure_bandwidth)
    rng = np.random.default_rng(settings.seed)
    prompt = [int(x) for x in rng.integers(0, vocab, size=settings.context)]

    with tempfile.TemporaryDirectory(prefix="owl-bench-") as tmp:
        sessions: list[DecodeSession] = []
        for engine, label in runs:
            log(f"compiling {run_key(engine, label)}...")
            with _quiet_stdout():
                s = open_session(engine, infos[label], settings, Path(tmp))
            log(f"  compiled in {s.compile_seconds:.1f} s")
            sessions.append(s)
        kv_modes = {s.key: s.kv_cache for s in sessions}
        samples: dict[str, dict[str, list]] = {s.key: {"steps": [], "rounds": [], "prefill": []} for s in sessions}
        tokens: dict[str, list[int]] = {}
        first_logits: dict[str, np.ndarray] = {}
        other_rounds, steal_rounds, own_rounds, round_seconds = [], [], [], []
        tot = {"wall": 0.0, "other": 0.0, "steal": 0.0, "own": 0.0}
        procs_start = None
        t_timed = None
        total_rounds = settings.warmup_rounds + settings.rounds
        for r in range(total_rounds):
            timed = r >= settings.warmup_rounds
            if timed and procs_start is None:
                procs_start, t_timed = monitor.process_times(), time.perf_counter()
            k = len(sessions)
            order = [sessions[(r + j) % k] for j in range(k)]
            rnd = {"wall": 0.0, "other": 0.0, "steal": 0.0, "own": 0.0}
            for s in order:
                time.sleep(settings.gap_seconds)
                a = monitor.sample()
                token, pre_s = s.prefill(prompt)
                step_s, toks, first = s.decode(token, settings.steps)
                use = CpuMonitor.usage(a, monitor.sample())
                if not timed:
                    tokens.setdefault(s.key, toks)
                    if first is not None:
                        first_logits.setdefault(s.key, first)
                    continue
                for key in rnd:
                    rnd[key] += use[key] * use["wall"] if key != "wall" else use["wall"]
                samples[s.key]["steps"].extend(step_s)
                # per round: the median step (robust to a burst, consistent with the headline median)
                samples[s.key]["rounds"].append(1.0 / float(np.median(step_s)))
                samples[s.key]["prefill"].append(settings.context / pre_s)
            if timed:
                w = max(rnd["wall"], 1e-9)
                other_rounds.append(round(rnd["other"] / w, 3))
                steal_rounds.append(round(rnd["steal"] / w, 3))
                own_rounds.append(round(rnd["own"] / w, 3))
                round_seconds.append(round(rnd["wall"], 3))
                for key in tot:
                    tot[key] += rnd[key]
                med = {s.key: f"{np.median(samples[s.key]['rounds'][-1:]):.1f}" for s in sessions}
                log(
                    f"round {r - settings.warmup_rounds + 1}/{settings.rounds}: "
                    + ", ".join(f"{k} {v} tok/s" for k, v in med.items())
                    + f" (other processes {other_rounds[-1]:.2f} cores)"
                )
            else:
                log(f"warm-up round {r + 1}/{settings.warmup_rounds} done")
        if settings.warmup_rounds == 0:  # nothing recorded the tokens: take them from an extra, untimed run
            for s in sessions:
                _, toks, first = s.decode(s.prefill(prompt)[0], settings.steps)
                tokens[s.key], first_logits[s.key] = toks, first
        wall_timed = time.perf_counter() - (t_timed or time.perf_counter())
        top_during = CpuMonitor.top(procs_start or {}, monitor.process_times(), wall_timed)
        compile_s = {s.key: round(s.compile_seconds, 2) for s in sessions}
        del sessions
    loadavg_after = list(os.getloadavg())
    w = max(tot["wall"], 1e-9)
    obs.update(
        {
            "loadavg_after": [round(x, 2) for x in loadavg_after],
            "other_cpu_mean": round(tot["other"] / w, 3),
            "other_cpu_rounds": other_rounds,
            "steal_mean": round(tot["steal"] / w, 3),
            "own_cpu_mean": round(tot["own"] / w, 3),
            "own_cpu_rounds": own_rounds,
            "round_seconds": round_seconds,
            "top_other_during": top_during,
        }
    )
    reasons = noise_verdict(obs, policy, cpus)
    noise = {"noisy": bool(reasons), "reasons": reasons, **obs, "cpus": cpus, "policy": asdict(policy)}

    bw = (hardware.get("memory_read_gb_per_s") or {}).get("all_cores")
    results_runs: dict[str, Any] = {}
    ref_key = run_key(*reference)
    for engine, label in runs:
        key = run_key(engine, label)
        smp = samples[key]
        info = infos[label]
        encoding = "bitmask" if engine == "deepsparse" else "dense"
        bpt = info.bytes_per_token[encoding]
        entry: dict[str, Any] = {
            "engine": engine,
            "model": label,
            "decode_tokens_per_s": summarize(1.0 / t for t in smp["steps"]),
            "decode_step_ms": summarize(1e3 * t for t in smp["steps"]),
            "decode_tokens_per_s_by_round": [round(x, 3) for x in smp["rounds"]],
            # plain throughput (all timed steps / their total time): what a user sees, outliers included
            "decode_throughput_tokens_per_s": round(len(smp["steps"]) / sum(smp["steps"]), 3),
            "prefill_tokens_per_s": summarize(smp["prefill"]) if smp["prefill"] else None,
            "compile_seconds": compile_s[key],
            "kv_cache": kv_modes[key],
            "bytes_per_token": bpt,
            "bytes_per_token_encoding": encoding,
            "ceiling_tokens_per_s": round(bw * 1e9 / bpt, 2) if bw else None,
        }
        results_runs[key] = entry
    ref = results_runs[ref_key]
    ref_med = ref["decode_tokens_per_s"]["median"]
    for entry in results_runs.values():
        med = entry["decode_tokens_per_s"]["median"]
        entry["speedup_vs_dense_ort"] = round(med / ref_med, 4) if med and ref_med else None
        paired = [
            a / b
            for a, b in zip(entry["decode_tokens_per_s_by_round"], ref["decode_tokens_per_s_by_round"], strict=False)
            if b
        ]
        entry["speedup_by_round"] = summarize(paired)
        ceil = entry["ceiling_tokens_per_s"]
        entry["fraction_of_ceiling"] = round(med / ceil, 4) if med and ceil else None

    checks = _agreement(runs, tokens, first_logits)
    head = None
    if headline is not None and run_key(*headline) in results_runs:
        hk = run_key(*headline)
        he = results_runs[hk]
        hinfo, rinfo = infos[headline[1]], infos[reference[1]]
        head = {
            "run": hk,
            "reference": ref_key,
            "speedup_vs_dense_ort": he["speedup_vs_dense_ort"],
            "speedup_by_round": he["speedup_by_round"],
            "decode_tokens_per_s": he["decode_tokens_per_s"]["median"],
            "reference_decode_tokens_per_s": ref_med,
            "ceiling_speedup_bytes": round(rinfo.bytes_per_token["dense"] / hinfo.bytes_per_token["bitmask"], 3),
        }
        # a second dense peer (e.g. the same model in int8 under ONNX Runtime): the headline against it too
        peer_key = run_key(*SECOND_REFERENCE)
        if peer_key in results_runs and peer_key != hk:
            peer = results_runs[peer_key]
            pmed = peer["decode_tokens_per_s"]["median"]
            head["second_reference"] = peer_key
            head["speedup_vs_second_reference"] = round(he["decode_tokens_per_s"]["median"] / pmed, 4) if pmed else None
            head["speedup_vs_second_reference_by_round"] = summarize(
                a / b
                for a, b in zip(he["decode_tokens_per_s_by_round"], peer["decode_tokens_per_s_by_round"], strict=False)
                if b
            )
            pinfo = infos[SECOND_REFERENCE[1]]
            head["ceiling_speedup_bytes_vs_second_reference"] = round(
                pinfo.bytes_per_token["dense"] / hinfo.bytes_per_token["bitmask"], 3
            )
    return {
        "schema": SCHEMA,
        "created": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {**asdict(settings), "sequence_length": seq, "environment": _engine_env()},
        "models": {label: info.describe() for label, info in infos.items()},
        "runs": results_runs,
        "headline": head,
        "agreement": checks,
        "noise": noise,
        "hardware": hardware,
        "versions": versions_info(),
    }


def _engine_env() -> dict[str, str]:
    """Environment variables that change how the engines compile or run (recorded for reproducibility)."""
    keys = ("WAND_", "NM_", "OMP_", "ORT_", "DEEPSPARSE_")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(keys)}


def _agreement(runs, tokens, first_logits) -> dict[str, Any]:
    """Same model in two engines: greedy tokens identical? max |logit difference| at the first step."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(m for _, m in runs):
        keys = [run_key(e, label) for e in ENGINES if (e, label) in runs]
        if len(keys) != 2 or not all(k in tokens for k in keys):
            continue
        a, b = keys
        diff = None
        if a in first_logits and b in first_logits:
            diff = float(np.max(np.abs(first_logits[a].astype(np.float64) - first_logits[b])))
        out[label] = {"same_greedy_tokens": tokens[a] == tokens[b], "first_step_max_abs_logit_diff": diff}
    return out


# ---------------------------------------------------------------- regression gate
def load_results(path: Path | str) -> dict[str, Any]:
    """Read a results.json (or the BDIR holding one); one-line errors for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise OwlError(f"baseline {path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise OwlError(f"baseline {path}: not a readable JSON file ({_one_line(exc)})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("runs"), dict):
        raise OwlError(f"baseline {path}: not a results.json of `owl-deploy bench` (schema {SCHEMA})")
    return data


def gate(current: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Compare each run's speedup over dense ONNX Runtime with the baseline's (ratios, not times).

    A run regresses when ``current < baseline x (1 - tolerance)``.  Runs present in only one file are
    listed, not judged; the headline run must be in both.
    """
    if not 0 <= tolerance < 1:
        raise OwlError(f"--tolerance must be in [0, 1), got {tolerance}")
    checks, regressed, notes = [], [], []
    cur_runs, base_runs = current.get("runs", {}), baseline.get("runs", {})
    ref = (current.get("headline") or {}).get("reference") or run_key(*REFERENCE)
    for key in sorted(set(cur_runs) | set(base_runs)):
        if key == ref:
            continue
        c = (cur_runs.get(key) or {}).get("speedup_vs_dense_ort")
        b = (base_runs.get(key) or {}).get("speedup_vs_dense_ort")
        if c is None or b is None:
            notes.append(f"{key}: only in the {'baseline' if c is None else 'current run'}; not compared")
            continue
        change = c / b - 1.0 if b else 0.0
        bad = c < b * (1.0 - tolerance)
        checks.append({"run": key, "baseline": b, "current": c, "change": round(change, 4), "regressed": bool(bad)})
        if bad:
            regressed.append(key)
    head = (current.get("headline") or {}).get("run") or run_key(*HEADLINE)
    if head not in {c["run"] for c in checks}:
        notes.append(f"the headline run {head} is not in both results; it was not gated")
    hw_c, hw_b = current.get("hardware") or {}, baseline.get("hardware") or {}
    if hw_c.get("cpu_model") and hw_b.get("cpu_model") and hw_c["cpu_model"] != hw_b["cpu_model"]:
        notes.append(f"the baseline ran on a different CPU ({hw_b['cpu_model']} vs {hw_c['cpu_model']})")
    if (baseline.get("noise") or {}).get("noisy"):
        notes.append("the baseline run was flagged noisy")
    if (current.get("noise") or {}).get("noisy"):
        notes.append("this run was flagged noisy")
    return {
        "tolerance": tolerance,
        "passed": not regressed,
        "regressed": regressed,
        "checks": checks,
        "notes": notes,
        "current_noisy": bool((current.get("noise") or {}).get("noisy")),
    }


def gate_message(result: dict[str, Any]) -> str:
    parts = []
    for c in result["checks"]:
        if c["regressed"]:
            parts.append(
                f"{c['run']} speedup vs dense ONNX Runtime {c['current']:.3f}x is {-c['change']:.1%} below the "
                f"baseline's {c['baseline']:.3f}x (tolerance {result['tolerance']:.0%})"
            )
    msg = "regression: " + "; ".join(parts)
    if result.get("current_noisy"):
        msg += " [this run was flagged noisy: re-run on a quiet machine (or with --strict) before trusting it]"
    return msg


# ---------------------------------------------------------------- reports
def render_markdown(res: dict[str, Any]) -> str:
    s, noise = res["settings"], res["noise"]
    lines = ["# Decode benchmark", ""]
    if noise["noisy"]:
        lines += ["> **NOISY RUN** — the numbers below are not trustworthy:", ">"]
        lines += [f"> - {r}" for r in noise["reasons"]] + [""]
    head = res.get("headline")
    if head:
        sp = head["speedup_by_round"]
        spread = f" (per-round p10–p90 {sp['p10']:.2f}–{sp['p90']:.2f})" if sp.get("n") else ""
        lines += [
            f"**Headline:** {head['run']} decodes at {head['decode_tokens_per_s']:.1f} tok/s = "
            f"**{head['speedup_vs_dense_ort']:.2f}x** {head['reference']} "
            f"({head['reference_decode_tokens_per_s']:.1f} tok/s){spread}; "
            f"the bytes-per-token ceiling of that ratio is {head['ceiling_speedup_bytes']:.2f}x.",
            "",
        ]
        if head.get("second_reference"):
            sp2 = head["speedup_vs_second_reference_by_round"]
            spread2 = f" (per-round p10–p90 {sp2['p10']:.2f}–{sp2['p90']:.2f})" if sp2.get("n") else ""
            lines += [
                f"Against the strongest dense peer, {head['second_reference']}: "
                f"**{head['speedup_vs_second_reference']:.2f}x**{spread2}; bytes-per-token ceiling "
                f"{head['ceiling_speedup_bytes_vs_second_reference']:.2f}x.",
                "",
            ]
    lines += [
        f"Batch 1, cache filled to {s['context']} of {s['sequence_length']} tokens, {s['steps']} decode steps x "
        f"{s['rounds']} rounds (+{s['warmup_rounds']} warm-up, not counted), engines interleaved round by round; "
        f"prefill in chunks of {s['prefill_chunk']}; DeepSparse KV cache "
        f"{', '.join(sorted({str(r.get('kv_cache')) for r in res['runs'].values() if r['engine'] == 'deepsparse'}))}; "
        "decode tok/s = median (p10–p90) over all timed steps; throughput = steps / their total time.",
        "",
        "| engine | model | decode tok/s | throughput | step ms | prefill tok/s | vs dense ORT | ceiling tok/s "
        "| of ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"].values():
        d, ms, p = r["decode_tokens_per_s"], r["decode_step_ms"], r["prefill_tokens_per_s"]
        pre = f"{p['median']:.1f} ({p['p10']:.1f}–{p['p90']:.1f})" if p and p.get("n") else "—"
        ceil = (
            f"{r['ceiling_tokens_per_s']:.0f} ({r['bytes_per_token_encoding']})" if r["ceiling_tokens_per_s"] else "—"
        )
        frac = f"{r['fraction_of_ceiling']:.0%}" if r["fraction_of_ceiling"] else "—"
        lines.append(
            f"| {SHORT[r['engine']]} | {r['model']} | {d['median']:.2f} ({d['p10']:.2f}–{d['p90']:.2f}) | "
            f"{r.get('decode_throughput_tokens_per_s') or 0:.2f} | {ms['median']:.2f} | {pre} | "
            f"{r['speedup_vs_dense_ort']:.3f}x | {ceil} | {frac} |"
        )
    lines += [
        "",
        "## Models",
        "",
        "| model | zeros in block weights | zeros in all MatMul weights | bytes/token dense | bytes/token bitmask "
        "| path |",
    ]
    lines += ["|---|---|---|---|---|---|"]
    for label, m in res["models"].items():
        w, bpt = m["weights"], m["bytes_per_token"]
        sp, spb = w.get("sparsity"), w.get("sparsity_excluding_lm_head")
        lines.append(
            f"| {label} | {spb or 0:.1%} | {sp:.1%} | {_mb(bpt['dense'])} | {_mb(bpt['bitmask'])} | `{m['path']}` |"
            if sp is not None
            else f"| {label} | — | — | — | — | `{m['path']}` |"
        )
    if res.get("agreement"):
        lines += [
            "",
            "Same model in both engines: "
            + "; ".join(
                f"{k}: greedy tokens {'identical' if v['same_greedy_tokens'] else 'DIFFER'}"
                + (
                    f", max |Δlogit| {v['first_step_max_abs_logit_diff']:.2e}"
                    if v["first_step_max_abs_logit_diff"] is not None
                    else ""
                )
                for k, v in res["agreement"].items()
            ),
        ]
    lines += machine_markdown(res)
    g = res.get("gate")
    if g:
        lines += [
            "",
            f"## Regression gate ({'PASSED' if g['passed'] else 'FAILED'}, tolerance {g['tolerance']:.0%})",
            "",
        ]
        lines += ["| run | baseline speedup | this run | change | |", "|---|---|---|---|---|"]
        for c in g["checks"]:
            mark = "REGRESSED" if c["regressed"] else "ok"
            lines.append(f"| {c['run']} | {c['baseline']:.3f}x | {c['current']:.3f}x | {c['change']:+.1%} | {mark} |")
        lines += [f"- {n}" for n in g["notes"]]
    lines.append("")
    return "\n".join(lines)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e7 else f"{nbytes / 1e6:.3f} MB"


def render_png(res: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(res["runs"].values())
    labels = [f"{SHORT[r['engine']]}\n{r['model']}" for r in runs]
    colors = ["#d62728" if r["engine"] == "deepsparse" else "#1f77b4" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(runs))
    for ax, field_, title in (
        (axes[0], "decode_tokens_per_s", "decode tokens/s (batch 1)"),
        (axes[1], "prefill_tokens_per_s", f"prefill tokens/s ({res['settings']['context']}-token prompt)"),
    ):
        med = [((r[field_] or {}).get("median") or 0.0) for r in runs]
        lo = [max(0.0, m - ((r[field_] or {}).get("p10") or m)) for m, r in zip(med, runs, strict=True)]
        hi = [max(0.0, ((r[field_] or {}).get("p90") or m) - m) for m, r in zip(med, runs, strict=True)]
        ax.bar(x, med, color=colors, yerr=[lo, hi], capsize=4, alpha=0.85)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if field_ == "decode_tokens_per_s":
            top = max(max(m + h for m, h in zip(med, hi, strict=True)) * 1.25, 1e-9)
            ceils = [r["ceiling_tokens_per_s"] or 0.0 for r in runs]
            ymax = max(top, min(max(ceils), top * 2.5))
            ax.set_ylim(0, ymax)
            for i, r in enumerate(runs):
                c = ceils[i]
                if c and c <= ymax:
                    ax.plot([i - 0.4, i + 0.4], [c, c], "k--", lw=1)
                elif c:
                    ax.annotate(f"ceiling {c:.0f} ↑", (i, ymax * 0.97), ha="center", va="top", fontsize=7)
                if r["speedup_vs_dense_ort"]:
                    ax.annotate(
                        f"{r['speedup_vs_dense_ort']:.2f}x", (i, med[i] + hi[i]), ha="center", va="bottom", fontsize=8
                    )
            ax.plot([], [], "k--", lw=1, label="bytes/token ceiling")
            ax.legend(fontsize=8, loc="upper left")
    hw = res["hardware"]
    title = f"{hw['cpu_model']}, {hw['physical_cores']} cores — context {res['settings']['context']}"
    if res["noise"]["noisy"]:
        title = "NOISY RUN — " + title
    fig.suptitle(title, fontsize=10, color="red" if res["noise"]["noisy"] else "black")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def write_results(res: dict[str, Any], out_dir: Path | str) -> Path:
    """results.json, results.md and decode.png, all or nothing."""
    from owl_deploy.io import atomic_dir, write_json

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "results.json", res)
        (tmp / "results.md").write_text(render_markdown(res))
        render_png(res, tmp / "decode.png")
    return out_dir


def summary_lines(res: dict[str, Any]) -> list[str]:
    out = []
    for key, r in res["runs"].items():
        d = r["decode_tokens_per_s"]
        out.append(
            f"{key:28s} decode {d['median']:8.2f} tok/s (p10 {d['p10']:.2f}, p90 {d['p90']:.2f})  "
            f"x{r['speedup_vs_dense_ort']:.3f} vs dense ORT"
        )
    h = res.get("headline")
    if h:
        out.append(f"headline: {h['run']} = {h['speedup_vs_dense_ort']:.3f}x {h['reference']}")
    g = res.get("gate")
    if g:
        verdict = "passed" if g["passed"] else "FAILED: " + ", ".join(g["regressed"])
        out.append(f"gate vs baseline (tolerance {g['tolerance']:.0%}): {verdict}")
        out += [f"gate note: {n}" for n in g["notes"]]
    if res["noise"]["noisy"]:
        out.append("warning: NOISY RUN: " + "; ".join(res["noise"]["reasons"]))
    return out


def bench_command(
    sparse: Path,
    dense: Path,
    out: Path,
    engines: str | None = None,
    settings: BenchSettings | None = None,
    baseline: Path | None = None,
    tolerance: float = 0.10,
    strict: bool = False,
    log: Callable[[str], None] | None = _log,
    policy: NoisePolicy | None = None,
    extra_models: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """What ``owl-deploy bench`` does: run, gate, write; raises NoisyMachine / GateFailed at the end."""
    base = load_results(baseline) if baseline is not None else None
    if base is not None and not 0 <= tolerance < 1:
        raise OwlError(f"--tolerance must be in [0, 1), got {tolerance}")
    models = {"sparse": Path(sparse), "dense": Path(dense)}
    for label, folder in (extra_models or {}).items():
        if label in models:
            raise OwlError(f"--model {label}=...: the label {label!r} is taken (sparse and dense are --sparse/--dense)")
        models[label] = Path(folder)
    runs = parse_engines(engines, models)
    res = run_benchmark(models, runs, settings, policy, log=log, strict=strict)
    if strict and res["noise"]["noisy"]:
        raise NoisyMachine("machine was noisy (--strict), results not written: " + "; ".join(res["noise"]["reasons"]))
    if base is not None:
        res["gate"] = gate(res, base, tolerance)
        res["gate"]["baseline"] = str(baseline)
    write_results(res, out)
    if log:
        for line in summary_lines(res):
            log(line)
        log(f"wrote {Path(out) / 'results.json'}, results.md, decode.png")
    if base is not None and not res["gate"]["passed"]:
        raise GateFailed(gate_message(res["gate"]))
    return res


# ---------------------------------------------------------------- per-layer time (used by benchmarks/sweep.py)
def decode_feed(info: ModelInfo, context: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one decode step with ``context`` cached tokens (random cache values)."""
    rng = np.random.default_rng(seed)
    n, total = 1, info.sequence_length
    feed = {
        "input_ids": np.asarray([[1]], dtype=np.int64),
        "attention_mask": np.zeros((1, total), dtype=np.int64),
        "positions": np.asarray([[context]], dtype=np.int64),
    }
    feed["attention_mask"][:, total - (context + n) :] = 1
    feed["causal_mask"] = feed["attention_mask"].reshape(1, 1, 1, total).copy()
    shape = (1, info.num_kv_heads, total - 1, info.head_dim)
    for name in info.input_names:
        if name.startswith("past_key_values."):
            feed[name] = (rng.standard_normal(shape) * 0.5).astype(info.kv_dtype)
    return feed


def _node_roles(info: ModelInfo) -> tuple[dict[str, str], dict[str, str]]:
    """ONNX output name -> role, node name -> role (role of the weight a node reads, else attention/other)."""
    import onnx

    proto = onnx.load(str(info.onnx_path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    by_output, by_node = {}, {}
    for node in proto.graph.node:
        role = None
        widx = _WEIGHT_OPS.get(node.op_type)
        if widx is not None and len(node.input) > widx and node.input[widx] in inits:
            role = _role(node.input[widx]) or ("lm_head" if "logits" in node.output else "matmul_weights")
        elif node.op_type == "Gather" and node.input and node.input[0] in inits:
            role = _role(node.input[0]) or "gather"
        elif node.op_type in ("MatMul", "Softmax"):
            role = "attention"
        if role is None:
            role = "other"
        for o in node.output:
            by_output[o] = role
        by_node[node.name] = role
    return by_output, by_node


def deepsparse_layer_breakdown(
    info: ModelInfo, context: int, threads: int | None = None, iterations: int = 20, warmup: int = 5
) -> dict[str, Any]:
    """Per-layer DeepSparse time of one decode step (``DebugAnalysisEngine.analyze``, as debug_analysis).

    Layers are grouped by the weight they read (q/k/v/o/gate/up/down/lm_head), attention, other
    (shuffles, norms, element-wise), and by kernel kind (``ks_gevm_be`` = sparse kernel, ``gemm`` ...)
    with the kernel sparsity DeepSparse detected.
    """
    from deepsparse.engine import DebugAnalysisEngine

    feed = decode_feed(info, context)
    by_output, _ = _node_roles(info)
    with _quiet_stdout():
        eng = DebugAnalysisEngine(
            str(info.onnx_path),
            batch_size=1,
            num_cores=threads,
            num_iterations=iterations,
            num_warmup_iterations=warmup,
        )
        result = eng.analyze([feed[n] for n in info.input_names], val_inp=False)
    layers = []

    def visit(li):
        if "average_run_time_in_ms" not in li:
            return
        name = li["name"]
        kind = re.sub(r"-[0-9.]+%", "", name.rsplit("_", 1)[0]) if not name.startswith("Naive") else "naive subgraph"
        outs = [o.strip() for o in (li.get("canonical_name") or "").split(",") if o.strip() and o != "<none>"]
        roles = [by_output[o] for o in outs if o in by_output]
        weighted = [r for r in roles if r not in ("attention", "other")]
        role = weighted[0] if weighted else (roles[0] if roles else "other")
        layers.append(
            {
                "name": name,
                "kernel": kind,
                "role": role,
                "ms": float(li["average_run_time_in_ms"]),
                "kernel_sparsity": float(li.get("kernel_sparsity", 0.0)),
            }
        )

    for li in result["layer_info"]:
        if li.get("sub_layer_info"):
            for sub in li["sub_layer_info"]:
                visit(sub)
        else:
            visit(li)
    return _group_layers(layers, engine="deepsparse", engine_total_ms=float(result.get("average_total_time", 0.0)))


def ort_layer_breakdown(info: ModelInfo, context: int, threads: int | None = None, iterations: int = 20) -> dict:
    """Per-node ONNX Runtime time of one decode step, from its profiler, grouped like DeepSparse's."""
    import onnxruntime as ort

    feed = decode_feed(info, context)
    _, by_node = _node_roles(info)
    with tempfile.TemporaryDirectory(prefix="owl-ortprof-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or _physical_cores()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess0 = ort.InferenceSession(str(info.onnx_path), opts, providers=["CPUExecutionProvider"])
        for _ in range(5):
            sess0.run(None, feed)
        del sess0
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(info.onnx_path), opts, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(iterations):
            sess.run(None, feed)
        wall_ms = (time.perf_counter() - t0) * 1e3 / iterations
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        rec = per_node.setdefault(node, {"us": 0.0, "count": 0, "op": ev.get("args", {}).get("op_name", "?")})
        rec["us"] += float(ev.get("dur", 0))
        rec["count"] += 1
    runs = 3 + iterations
    layers = []
    for node, rec in per_node.items():
        # fused nodes keep their first member's name; fall back to the op type
        role = by_node.get(node) or by_node.get(node.split("_token_")[0]) or "other"
        layers.append({"name": node, "kernel": rec["op"], "role": role, "ms": rec["us"] / 1e3 / runs})
    return _group_layers(layers, engine="onnxruntime", engine_total_ms=wall_ms)


def _group_layers(layers: list[dict[str, Any]], engine: str, engine_total_ms: float) -> dict[str, Any]:
    by_role: dict[str, float] = {}
    by_kernel: dict[str, float] = {}
    sparsity: dict[str, list[float]] = {}
    for layer in layers:
        by_role[layer["role"]] = by_role.get(layer["role"], 0.0) + layer["ms"]
        by_kernel[layer["kernel"]] = by_kernel.get(layer["kernel"], 0.0) + layer["ms"]
        if "kernel_sparsity" in layer and layer["role"] not in ("attention", "other"):
            sparsity.setdefault(layer["role"], []).append(layer["kernel_sparsity"])
    total = sum(by_role.values())
    out = {
        "engine": engine,
        "summed_layer_ms": round(total, 4),
        "engine_total_ms": round(engine_total_ms, 4),
        "by_role_ms": {k: round(v, 4) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
        "by_kernel_ms": {k: round(v, 4) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])},
        "layers": len(layers),
    }
    if sparsity:
        out["detected_kernel_sparsity_by_role"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(sparsity.items())}
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def machine_markdown(res: dict) -> list[str]:
    """The "## Machine" section of a report from a results.json: hardware, load and versions."""
    hw, noise = res["hardware"], res["noise"]
    bw = hw.get("memory_read_gb_per_s") or {}
    flags = ", ".join(k for k, v in hw["flags"].items() if v) or "none"
    return [
        "",
        "## Machine",
        "",
        f"- CPU: {hw['cpu_model']} ({hw['physical_cores']} cores, {hw['logical_cpus']} logical CPUs"
        f"{', virtual machine' if hw.get('hypervisor') else ''}); flags: {flags}; "
        f"DeepSparse sees `{hw.get('deepsparse_isa')}`{' + VNNI' if hw.get('deepsparse_vnni') else ''}",
        f"- memory {hw['memory_gb']} GB; read bandwidth {bw.get('1_thread', '—')} GB/s (1 thread), "
        f"{bw.get('all_cores', '—')} GB/s (all cores)",
        f"- load average before {noise['loadavg_before']}, after {noise['loadavg_after']}; other processes "
        f"{noise['other_cpu_before']:.2f} cores before, {noise['other_cpu_mean']:.2f} mean during "
        f"(per round {noise['other_cpu_rounds']}); this process {noise['own_cpu_mean']:.2f} cores",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
    ]
