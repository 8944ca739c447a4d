"""Peers: what a CPU user runs instead of an owl_deploy deployment, prepared from the same model folder.

A speedup over our own dense fp32 graph says little to someone who runs llama.cpp on a GGUF or the
ONNX Runtime export everyone else makes.  This module builds those two paths from an owl_deploy Hugging
Face folder, caches them, and runs them token by token for the benchmark and for perplexity:

* **llama.cpp** (the optional extra ``peers``: ``llama-cpp-python`` built from source, the same
  llama.cpp as the converter it ships): ``f32``/``f16`` GGUF written from the HF folder by llama.cpp's
  own ``convert_hf_to_gguf.py`` (taken from the llama-cpp-python sdist of the installed version, so the
  converter and the kernels are one llama.cpp commit), then ``q8_0`` and ``q4_k_m`` requantized from the
  f32 file by ``llama_model_quantize``.  llama.cpp's defaults otherwise (f16 KV cache, flash attention
  as llama-cpp-python sets it).
* **ort-standard**: the dense model exported the way optimum's ``text-generation-with-past`` exports
  it (inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``; every
  length dynamic, the cache growing by concatenation inside the graph; the Hugging Face forward traced,
  opset 14), then ONNX Runtime's transformer optimizer (``model_type="gpt2"`` fusions, opt level 0, as
  ONNX Runtime's own LLaMA script and optimum's ORTOptimizer do for LLaMA), and its int8 twin from
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, dynamic per-tensor activations).
  optimum itself cannot be used: optimum-onnx 0.1.0 pins transformers<4.58 and fails to import beside
  transformers 5 (``get_parameter_dtype``), optimum 1.27 imports ``is_tf_available``; the export here
  reproduces its input/output contract and dynamic axes.

Each artifact is a folder ``OUT/<engine>-<variant>/`` (``model.gguf`` or ``model.onnx``) plus
``peer.json``, written atomically and reused while the source folder is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from owl_deploy.errors import OwlError
from owl_deploy.peers.common import (
    DEFAULT_PEERS,
    EXTRA_HINT,
    GGUF_FILE,
    GGUF_QUANTIZED,
    GGUF_WRITTEN,
    LLAMA_CPP,
    ONNX_FILE,
    ORT_STANDARD,
    ORT_VARIANTS,
    PEER_ENGINES,
    PEER_JSON,
    Log,
    _check_prepared_variant,
    _quiet,
    artifact,
    available,
    read_peer_json,
    require,
    split_key,
)
from owl_deploy.peers.gguf import gguf_metadata, gguf_weight_bytes, quantize_gguf, write_gguf
from owl_deploy.peers.ort_standard import export_ort_standard, quantize_ort_dynamic
from owl_deploy.peers.runners import PeerRunner, open_runner, ort_standard_spec, peer_logits_fn

__all__ = [
    "DEFAULT_PEERS",
    "EXTRA_HINT",
    "GGUF_FILE",
    "GGUF_QUANTIZED",
    "GGUF_WRITTEN",
    "LLAMA_CPP",
    "ONNX_FILE",
    "ORT_STANDARD",
    "ORT_VARIANTS",
    "PEER_ENGINES",
    "PEER_JSON",
    "PeerRunner",
    "artifact",
    "available",
    "export_ort_standard",
    "gguf_metadata",
    "gguf_weight_bytes",
    "open_runner",
    "ort_standard_spec",
    "peer_logits_fn",
    "prepare_peers",
    "quantize_gguf",
    "quantize_ort_dynamic",
    "read_peer_json",
    "require",
    "source_fingerprint",
    "split_key",
    "write_gguf",
]


# ---------------------------------------------------------------- caching
def source_fingerprint(model_dir: Path) -> str:
    """What the peers are built from: config.json, and each weight file's name, size and mtime."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _cached(folder: Path, fingerprint: str) -> bool:
    meta = read_peer_json(folder)
    return bool(meta) and meta.get("source_fingerprint") == fingerprint and (folder / meta.get("file", "-")).is_file()


def prepare_peers(
    model: str | os.PathLike,
    out: str | os.PathLike,
    peers: Iterable[str] = DEFAULT_PEERS,
    threads: int | None = None,
    log: Log | None = None,
) -> dict[str, Path]:
    """Build (or reuse) each peer of ``peers`` for the HF folder ``model`` under ``out``; key -> folder.

    The GGUF quantizations are made from the f32 GGUF (built first when missing, even if not asked for),
    the int8 ONNX from the optimized fp32 ONNX.
    """
    from owl_deploy.io import atomic_dir, write_json
    from owl_deploy.specs import resolve_model

    say = log or _quiet
    wanted = [split_key(k) for k in peers]
    for engine, variant in wanted:
        _check_prepared_variant(engine, variant)
        require(engine)
    model_dir = resolve_model(model)
    if not model_dir.is_dir():
        raise OwlError(f"{model_dir}: peers are prepared from a Hugging Face folder, not a single file")
    out = Path(out)
    fp = source_fingerprint(model_dir)
    done: dict[str, Path] = {}

    def build(engine: str, variant: str, make: Callable[[Path], dict[str, Any]]) -> Path:
        folder = out / f"{engine}-{variant}"
        key = f"{engine}/{variant}"
        if _cached(folder, fp):
            say(f"{key}: reusing {folder}")
            return folder
        say(f"{key}: preparing {folder} ...")
        t0 = time.perf_counter()
        with atomic_dir(folder) as tmp:
            meta = make(tmp)
            meta.update(
                engine=engine,
                variant=variant,
                source=str(model_dir),
                source_fingerprint=fp,
                seconds=round(time.perf_counter() - t0, 1),
                bytes=(tmp / meta["file"]).stat().st_size,
            )
            write_json(tmp / PEER_JSON, meta)
        say(f"{key}: done in {time.perf_counter() - t0:.0f} s")
        return folder

    needs_f32 = any(e == LLAMA_CPP and v in (*GGUF_QUANTIZED, "f32") for e, v in wanted)
    needs_dense = any(e == ORT_STANDARD for e, _ in wanted)
    if needs_f32:
        done["llama.cpp/f32"] = build(LLAMA_CPP, "f32", lambda d: write_gguf(model_dir, d / GGUF_FILE, "f32", log=say))
    if (LLAMA_CPP, "f16") in wanted:
        done["llama.cpp/f16"] = build(LLAMA_CPP, "f16", lambda d: write_gguf(model_dir, d / GGUF_FILE, "f16", log=say))
    for variant in GGUF_QUANTIZED:
        if (LLAMA_CPP, variant) in wanted:
            src = done["llama.cpp/f32"] / GGUF_FILE
            done[f"llama.cpp/{variant}"] = build(
                LLAMA_CPP, variant, lambda d, v=variant, s=src: quantize_gguf(s, d / GGUF_FILE, v, threads)
            )
    if needs_dense:
        done["ort-standard/dense"] = build(ORT_STANDARD, "dense", lambda d: export_ort_standard(model_dir, d, log=say))
    if (ORT_STANDARD, "dense-int8") in wanted:
        src = done["ort-standard/dense"]
        done["ort-standard/dense-int8"] = build(ORT_STANDARD, "dense-int8", lambda d: quantize_ort_dynamic(src, d))
    return {f"{e}/{v}": done[f"{e}/{v}"] for e, v in wanted}
