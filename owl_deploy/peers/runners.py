"""Running a peer token by token: one loaded engine and the KV cache of one sequence."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy.errors import OwlError, one_line
from owl_deploy.peers.common import LLAMA_CPP, ONNX_FILE, ORT_STANDARD, PEER_ENGINES, artifact, require
from owl_deploy.peers.ort_standard import _past_names


class PeerRunner:
    """One loaded peer and the KV cache of one sequence: ``forward(ids)`` after the cached tokens."""

    engine: str
    compile_seconds: float
    vocab_size: int
    num_cached: int

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` (``all_logits``) or of the last token only ``[1, vocab]``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}


def llama_repack(env: dict[str, str] | None = None, cpuinfo: str | None = None) -> bool:
    """Whether llama.cpp may repack weights into its CPU-specific layouts (its "extra buffer types").

    ``LLAMA_ARG_REPACK`` (the variable ``llama-server`` reads for ``--repack``/``--no-repack``) decides when set;
    otherwise off on CPUs with AMX tiles, where llama.cpp 0c1e57098 (llama-cpp-python 0.3.36) segfaults while
    repacking Q8_0 weights at load (measured on an AMX Xeon, in ``llama-server`` and in-process alike), and on
    everywhere else."""
    env = os.environ if env is None else env
    value = env.get("LLAMA_ARG_REPACK")
    if value is not None:
        return value.strip().lower() not in ("0", "false", "off", "no", "disabled")
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    return " amx_tile" not in cpuinfo


class LlamaCppRunner(PeerRunner):
    """llama-cpp-python's ``Llama`` with its defaults (f16 KV cache), ``threads`` for decode and batches;
    weight repacking as :func:`llama_repack` says (Llama() has no argument for it: set in the model params)."""

    engine = LLAMA_CPP

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, all_logits: bool = False):
        require(LLAMA_CPP)
        import llama_cpp.llama as llama_module
        from llama_cpp import Llama

        threads = threads or _physical_cores()
        self.repack = llama_repack()
        defaults = llama_module.llama_cpp.llama_model_default_params

        def model_params():
            params = defaults()
            params.use_extra_bufts = self.repack
            return params

        t0 = time.perf_counter()
        llama_module.llama_cpp.llama_model_default_params = model_params
        try:
            self.llm = Llama(
                model_path=str(path),
                n_ctx=int(n_ctx),
                n_batch=min(int(n_ctx), 512),
                n_ubatch=min(int(n_ctx), 512),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=all_logits,
                verbose=False,
            )
        except Exception as exc:
            raise OwlError(f"llama.cpp cannot load {path}: {one_line(exc)}") from exc
        finally:
            llama_module.llama_cpp.llama_model_default_params = defaults
        self.compile_seconds = time.perf_counter() - t0
        self.threads = threads
        self.n_ctx = min(int(n_ctx), int(self.llm.n_ctx()))  # llama.cpp may round its context up; Llama's arrays not
        self.vocab_size = int(self.llm.n_vocab())
        self._all = all_logits
        self.num_cached = 0

    def reset(self) -> None:
        self.llm.reset()
        self.num_cached = 0

    def forward(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        import llama_cpp

        ids = [int(t) for t in ids]
        if self.num_cached + len(ids) > self.n_ctx:
            raise OwlError(f"llama.cpp context full: {self.num_cached} + {len(ids)} tokens > n_ctx {self.n_ctx}")
        start = self.llm.n_tokens
        self.llm.eval(ids)
        self.num_cached += len(ids)
        if all_logits:
            if not self._all:
                raise OwlError("internal: this llama.cpp context keeps only the last token's logits")
            return np.array(self.llm.scores[start : start + len(ids)], dtype=np.float32, copy=True)
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(1, self.vocab_size)).copy()

    def describe(self) -> dict[str, Any]:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        return {
            "llama_cpp_python": str(llama_cpp.__version__),
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "repack": self.repack,
            "flash_attn_type": int(getattr(self.llm.context_params, "flash_attn_type", 0)),  # -1 auto, 0 off, 1 on
            "system_info": info,
        }


class OrtStandardRunner(PeerRunner):
    """The standard export in ONNX Runtime: the cache fed back from numpy and grown by the graph."""

    engine = ORT_STANDARD

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        t0 = time.perf_counter()
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OwlError(f"onnxruntime cannot load {path}: {one_line(exc)}") from exc
        self.compile_seconds = time.perf_counter() - t0
        self.threads = threads
        spec = ort_standard_spec(self.sess)
        self.num_layers, self.num_kv_heads, self.head_dim = spec["num_layers"], spec["num_kv_heads"], spec["head_dim"]
        self.vocab_size = int(spec["vocab_size"] or 0)
        self._past_names = _past_names(self.num_layers)
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.num_kv_heads, 0, self.head_dim), np.float32)
        self._past = [empty] * (2 * self.num_layers)
        self.num_cached = 0

    def forward(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        n, past = len(ids), self.num_cached
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past + n), dtype=np.int64),
            "position_ids": np.arange(past, past + n, dtype=np.int64)[None],
        }
        feeds.update(zip(self._past_names, self._past, strict=True))
        out = self.sess.run(None, feeds)
        self._past = out[1:]
        self.num_cached += n
        logits = out[0][0]
        return np.asarray(logits if all_logits else logits[-1:], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "threads": self.threads, "kv_cache": "fp32, grown by Concat"}


def ort_standard_spec(sess) -> dict[str, Any]:
    """Layers, KV heads and head size from the inputs of a standard export; vocab from ``logits``."""
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    names = {i.name for i in sess.get_inputs()}
    missing = {"input_ids", "attention_mask", "position_ids"} - names
    if missing or not pasts:
        raise OwlError(
            "not a text-generation-with-past export (inputs input_ids, attention_mask, position_ids, "
            f"past_key_values.*): missing {', '.join(sorted(missing)) or 'past_key_values'}"
        )
    shape = pasts[0].shape
    logits = next((o for o in sess.get_outputs() if o.name == "logits"), None)
    vocab = logits.shape[-1] if logits is not None and isinstance(logits.shape[-1], int) else None
    return {
        "num_layers": len(pasts) // 2,
        "num_kv_heads": int(shape[1]),
        "head_dim": int(shape[3]),
        "vocab_size": vocab,
    }


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def open_runner(engine: str, path: Path, n_ctx: int, threads: int | None = None, all_logits: bool = False):
    """A :class:`PeerRunner` for ``engine`` on ``path`` (a .gguf, a .onnx, or a peer folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = artifact(path)
    if not path.is_file():
        raise OwlError(f"{engine} peer {path}: no such file")
    if engine == LLAMA_CPP:
        if path.suffix != ".gguf":
            raise OwlError(f"llama.cpp peer {path}: expected a .gguf file")
        return LlamaCppRunner(path, n_ctx, threads, all_logits=all_logits)
    if engine == ORT_STANDARD:
        if path.suffix != ".onnx":
            raise OwlError(f"ort-standard peer {path}: expected a .onnx file or a folder with {ONNX_FILE}")
        return OrtStandardRunner(path, threads)
    raise OwlError(f"unknown peer engine {engine!r}; use one of {', '.join(PEER_ENGINES)}")


def peer_logits_fn(engine: str, path: Path, seqlen: int, threads: int | None = None):
    """``ids [1, seqlen] -> logits [seqlen, vocab]`` for ``owl_deploy.evaluate.perplexity``: each window from
    an empty cache in one call, the same windows every other engine is scored on."""
    import torch

    runner = open_runner(engine, path, seqlen, threads, all_logits=True)

    def fn(ids):
        runner.reset()
        return torch.from_numpy(runner.forward(ids[0].tolist(), all_logits=True))

    fn.runner = runner  # type: ignore[attr-defined]
    return fn
