"""Peers in the benchmark: llama.cpp on a GGUF and the standard ONNX Runtime export, as benchmark targets.

``--peer ENGINE/LABEL=PATH`` names one (``llama.cpp/q8_0=model-q8_0.gguf``, ``ort-standard/dense-int8=FOLDER``);
it is timed by the same interleaved rounds as the deployments (``measure._interleave``), with the same
thread count, and what it reads per token is counted the same way:

* llama.cpp: every GGUF tensor once (its quantized bytes), the token embedding one row unless it is
  also the output matrix (tied embeddings), plus the f16 KV cache of the cached tokens;
* ort-standard: the ONNX initializers as for a deployment (``weights.initializer_statistics``), plus the
  fp32 KV cache of the cached tokens.

A peer's cache grows with the sequence (a deployment's attention covers its whole static length), so
its KV bytes are those at the mean cache length of the timed steps, ``context + steps / 2``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy import peers as peer_mod
from owl_deploy.bench.sessions import DecodeSession, Target
from owl_deploy.bench.weights import bytes_per_token, initializer_statistics
from owl_deploy.configs import BenchConfig
from owl_deploy.errors import OwlError

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: bytes of one KV-cache element: llama.cpp's default f16 cache, the standard export's fp32 one
KV_ITEMSIZE = {peer_mod.LLAMA_CPP: 2, peer_mod.ORT_STANDARD: 4}


def parse_peers(items: Iterable[str]) -> dict[str, Path]:
    """``["llama.cpp/q8_0=x.gguf", ...]`` -> {run key: path}; one-line errors for anything else."""
    out: dict[str, Path] = {}
    for item in items:
        key, sep, path = item.partition("=")
        engine, slash, label = key.partition("/")
        if not sep or not path or not slash or not _LABEL.match(label):
            raise OwlError(
                f"--peer {item!r}: expected ENGINE/LABEL=PATH (e.g. llama.cpp/q8_0=model.gguf, "
                "ort-standard/dense-int8=FOLDER), the label of letters, digits, '.', '_' or '-'"
            )
        if engine not in peer_mod.PEER_ENGINES:
            raise OwlError(f"--peer {item!r}: unknown engine {engine!r}; use one of {', '.join(peer_mod.PEER_ENGINES)}")
        if key in out:
            raise OwlError(f"--peer {key} is given twice")
        out[key] = Path(path).expanduser()
    return out


class PeerSession(DecodeSession):
    """A peer runner behind the benchmark's session interface (greedy, logits of the last token only)."""

    def __init__(self, key: str, runner: peer_mod.PeerRunner, kv_cache: str):
        self.key, self.runner, self.kv_cache = key, runner, kv_cache
        self.compile_seconds = float(runner.compile_seconds)

    def prefill(self, prompt: list[int]) -> tuple[int, float]:
        self.runner.reset()
        t0 = time.perf_counter()
        logits = self.runner.forward(prompt, all_logits=False)
        token = int(np.argmax(logits[-1]))
        return token, time.perf_counter() - t0

    def _step(self, token: int) -> np.ndarray:
        return self.runner.forward([token], all_logits=False)[0]


class PeerTarget(Target):
    """One ``--peer``: checked and measured (bytes per token) before anything is compiled."""

    def __init__(self, key: str, path: Path, cfg: BenchConfig):
        self.key = key
        self.engine, _, self.label = key.partition("/")
        peer_mod.require(self.engine)
        path = Path(path)
        if not path.exists():
            raise OwlError(f"--peer {key}: {path}: no such file or folder")
        self.folder = path if path.is_dir() else path.parent
        self.path = peer_mod.artifact(path) if path.is_dir() else path
        self.kv_length = cfg.context + cfg.steps // 2
        self.runtime: dict[str, Any] = {}
        if self.engine == peer_mod.LLAMA_CPP:
            self._gguf()
        else:
            self._onnx()

    def _gguf(self) -> None:
        if self.path.suffix != ".gguf":
            raise OwlError(f"--peer {self.key}: {self.path} is not a .gguf file")
        meta = peer_mod.gguf_metadata(self.path)
        self.vocab_size = meta["vocab_size"]
        weights = peer_mod.gguf_weight_bytes(meta)
        kinds: dict[str, int] = {}
        for nbytes, kind, _shape in meta["tensors"].values():
            kinds[kind] = kinds.get(kind, 0) + nbytes
        self.format = {"file_type": meta["file_type"], "tensor_bytes_by_type": dict(sorted(kinds.items()))}
        self.spec = {k: meta[k] for k in ("architecture", "num_layers", "num_kv_heads", "head_dim", "vocab_size")}
        self.weights: dict[str, Any] = {}
        self.bytes_per_token = bytes_per_token(weights, weights, self._kv_bytes())

    def _onnx(self) -> None:
        import onnx

        if self.path.suffix != ".onnx":
            raise OwlError(
                f"--peer {self.key}: {self.path} is not a .onnx file or a folder holding {peer_mod.ONNX_FILE}"
            )
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:
            raise OwlError(f"--peer {self.key}: {self.path}: not a readable ONNX file ({exc})") from None
        shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        pasts = [n for n in shapes if n.startswith("past_key_values.")]
        if not pasts or not {"input_ids", "attention_mask", "position_ids"} <= set(shapes):
            raise OwlError(
                f"--peer {self.key}: {self.path} is not a text-generation-with-past export "
                "(inputs input_ids, attention_mask, position_ids, past_key_values.*)"
            )
        kv_shape = shapes[pasts[0]]
        logits = next((o for o in proto.graph.output if o.name == "logits"), None)
        vocab = logits.type.tensor_type.shape.dim[-1].dim_value if logits is not None else 0
        self.spec = {
            "num_layers": len(pasts) // 2,
            "num_kv_heads": int(kv_shape[1]),
            "head_dim": int(kv_shape[3]),
            "vocab_size": int(vocab) or None,
        }
        self.vocab_size = self.spec["vocab_size"]
        self.weights, dense, bitmask = initializer_statistics(proto, self.path.parent)
        del proto
        self.format = {"onnx_bytes": self.path.stat().st_size}
        self.bytes_per_token = bytes_per_token(dense, bitmask, self._kv_bytes())

    def _kv_bytes(self) -> int:
        s = self.spec
        return 2 * s["num_layers"] * s["num_kv_heads"] * s["head_dim"] * self.kv_length * KV_ITEMSIZE[self.engine]

    def open(self, cfg: BenchConfig, sequence_length: int) -> DecodeSession:
        runner = peer_mod.open_runner(self.engine, self.path, sequence_length, cfg.threads)
        self.runtime = runner.describe()
        kv = "internal (f16)" if self.engine == peer_mod.LLAMA_CPP else "external (fp32, grown by the graph)"
        return PeerSession(self.key, runner, kv)

    def describe(self) -> dict[str, Any]:
        made = peer_mod.read_peer_json(self.folder) if self.path.parent == self.folder else None
        return {
            "engine": self.engine,
            "label": self.label,
            "path": str(self.path),
            "bytes": self.path.stat().st_size,
            "spec": self.spec,
            "format": self.format,
            "weights": self.weights,
            "bytes_per_token": self.bytes_per_token,
            "kv_length_for_bytes": self.kv_length,
            "prepared": {k: v for k, v in (made or {}).items() if k != "spec"},
            "runtime": self.runtime,
        }


def load_peers(peers: dict[str, Path], cfg: BenchConfig) -> list[PeerTarget]:
    """The ``--peer`` targets, each checked (file, format, extra installed) before the benchmark starts."""
    return [PeerTarget(key, path, cfg) for key, path in peers.items()]
