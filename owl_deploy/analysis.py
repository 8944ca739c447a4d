"""DeepSparse's debug analysis of one graph: per-layer kernels, times and detected weight sparsity (what
``deepsparse.debug_analysis`` prints). ``export.verify`` reads which projections run sparse from it;
``benchmarks/layer_profile.py`` times layers with it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from owl_deploy.errors import OwlError, one_line
from owl_deploy.runtime import quiet_stdout


def deepsparse_analysis(
    path: Path,
    inputs: list[np.ndarray],
    threads: int | None = None,
    iterations: int = 1,
    warmup: int = 0,
    internal_cache: bool = False,
) -> dict:
    """DeepSparse's per-layer kernels, times and detected weight sparsity for one run of ``inputs``
    (what ``deepsparse.debug_analysis`` prints); ``analysis_layers`` walks its layers."""
    os.environ.setdefault("WAND_OPT_FLAGS", "default,~pyramids")
    with _environ(NM_BENCHMARK_KV_TOKENS="1"):  # as deepsparse.debug_analysis runs; never left set for later engines
        return _analyze(path, inputs, threads, iterations, warmup, internal_cache)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block only (engines read them when they compile)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _analyze(path, inputs, threads, iterations, warmup, internal_cache) -> dict:
    try:
        from deepsparse.engine import DebugAnalysisEngine, KVCacheParams
        from deepsparse.utils.onnx import default_cached_outputs

        params = KVCacheParams(default_cached_outputs(str(path)), 0, 0) if internal_cache else None
        with quiet_stdout():
            engine = DebugAnalysisEngine(
                str(path),
                batch_size=1,
                num_cores=threads,
                num_iterations=iterations,
                num_warmup_iterations=warmup,
                kv_cache_params=params,
            )
    except Exception as exc:
        raise OwlError(f"deepsparse cannot compile the graph for analysis: {one_line(exc)}") from exc
    return engine.analyze(inputs, val_inp=False)


def analysis_layers(result: dict) -> Iterator[dict]:
    """Every layer of a :func:`deepsparse_analysis` result, sub-layers included (depth first)."""

    def walk(layers):
        for li in layers:
            yield li
            yield from walk(li.get("sub_layer_info", []))

    yield from walk(result.get("layer_info", []))
