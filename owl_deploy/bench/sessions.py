"""What the benchmark times: a :class:`Target` (a deployment in an engine, or a peer) opens a
:class:`DecodeSession`, and a session runs one round of the protocol (``measure``) at a time.

* :class:`RuntimeSession`: batch 1 through ``owl_deploy.runtime``, the product path (DeepSparse with its
  internal KV cache unless ``kv_cache="external"``): the context prompt, decode steps, then each prompt
  length from an empty cache (prefill tok/s, time to first token);
* :class:`BatchedSession`: ``batch`` sequences decoded together by ``runtime.Decoder``, the serving path
  (``owl-deploy serve``) with the server's KV caches: every row starts from the context prompt's cache,
  and the rows' greedy tokens are checked against ONNX Runtime's batch-1 decode of the same deployment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from owl_deploy.bench.weights import ModelInfo
from owl_deploy.configs import BenchConfig


def run_key(engine: str, model: str) -> str:
    return f"{engine}/{model}"


@dataclass
class Round:
    """What one session did in one round."""

    steps: list[float]  # seconds of each decode step
    tokens: list[int]  # greedy tokens of the decode steps (row 0 when batched)
    first_logits: np.ndarray | None
    prefill_seconds: float | None  # the context prompt, before the decode steps
    ttft: dict[int, float]  # prompt length -> seconds from an empty cache to the first token
    rows_agree: bool = True  # batched: every row decoded the same tokens


class DecodeSession:
    """One compiled engine x model: ``prefill(prompt)`` (fresh cache), then ``decode(token, steps)``."""

    key: str
    compile_seconds: float
    kv_cache: str | None = None
    batch: int = 1

    def run_round(self, prompt: list[int], prompts: dict[int, list[int]], steps: int) -> Round:
        """The context prompt, ``steps`` decode steps after it, then each of ``prompts`` from an empty cache
        (prefill speed and time to first token: the first token is the prefill's last logits' argmax)."""
        token, pre_s = self.prefill(prompt)
        step_s, toks, first = self.decode(token, steps)
        ttft = {n: self.prefill(p)[1] for n, p in prompts.items()}
        return Round(step_s, toks, first, pre_s, ttft)

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
        self.session = runtime.compile(  # a prompt's lm_head for its last token only, as a server (and llama.cpp) does
            info.folder, engine, prefill_length=cfg.prefill_length, kv_cache=kv, threads=cfg.threads, last_logits=True
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


class Target:
    """One thing to benchmark: its run key, what it reads per decoded token, and how to open a session."""

    key: str
    engine: str
    label: str
    vocab_size: int | None = None
    bytes_per_token: dict[str, int]

    def open(self, cfg: BenchConfig, sequence_length: int) -> DecodeSession:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}


class DeploymentTarget(Target):
    """An engine of ``ENGINES`` on a deployment folder (already checked by ``load_model_info``)."""

    def __init__(self, engine: str, info: ModelInfo):
        self.engine, self.label, self.info = engine, info.label, info
        self.key = run_key(engine, info.label)
        self.vocab_size = info.vocab_size
        self.bytes_per_token = info.bytes_per_token

    def open(self, cfg: BenchConfig, sequence_length: int) -> DecodeSession:
        return RuntimeSession(self.engine, self.info, cfg)


class BatchedSession(DecodeSession):
    """``batch`` sequences per decode step through ``runtime.Decoder``, with the KV caches ``owl-deploy serve``
    would use (``serve.serving_plan``): DeepSparse keeps one internal cache per row (fp32 and int8), each filled
    by a DeepSparse prefill of the context prompt (untimed); ONNX Runtime's rows start from copies of its batch-1
    cache. The rows must equal batch 1 of the same plan (DeepSparse's int8 tokens are not ONNX Runtime's, see
    ``serving_plan``). No prefill is timed."""

    def __init__(self, engine: str, info: ModelInfo, batch: int, cfg: BenchConfig, prompt: list[int]):
        from owl_deploy import runtime
        from owl_deploy.configs import ServeConfig
        from owl_deploy.serve import serving_plan

        self.key, self.batch = f"{run_key(engine, info.label)}@b{batch}", batch
        kv, prefill_engine = serving_plan(info.folder, ServeConfig(engine=engine))
        ref = runtime.compile(info.folder, prefill_engine, prefill_length=cfg.prefill_length, kv_cache=kv,
                              threads=cfg.threads, last_logits=True)  # fmt: skip
        self.first_token = int(np.argmax(ref.forward(prompt)[-1]))
        self.reference_tokens, token = [], self.first_token
        self.state = ref.state() if kv == "external" else None  # an internal cache is not copied: rows prefill
        for _ in range(cfg.steps):  # what batch 1 of this plan decodes from the same prompt
            token = int(np.argmax(ref.step(token)))
            self.reference_tokens.append(token)
        self.prefiller = ref if kv == "internal" else None  # ONNX Runtime's session is freed before compiling
        del ref
        self.decoder = runtime.compile_decoder(info.folder, engine, [batch], threads=cfg.threads, kv_cache=kv)
        self.compile_seconds = float(self.decoder.compile_seconds)
        self.kv_cache = f"{kv} (batched)"

    def _states(self, prompt: list[int]) -> list:
        from owl_deploy.runtime import KVState

        if self.prefiller is None:
            presents = self.state.presents
            return [KVState(list(presents) if presents else None, self.state.num_cached) for _ in range(self.batch)]
        states = []
        for _ in range(self.batch):  # an internal cache cannot be copied: each row prefills its own
            self.prefiller.reset()
            self.prefiller.forward(prompt)
            states.append(self.prefiller.state())
        return states

    def run_round(self, prompt: list[int], prompts: dict[int, list[int]], steps: int) -> Round:
        states = self._states(prompt)
        tokens, times, rows = [self.first_token] * self.batch, [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = self.decoder.step(tokens, states)
            tokens = [int(t) for t in np.argmax(logits, axis=1)]
            times.append(time.perf_counter() - t0)
            rows.append(tokens)
        row0 = [r[0] for r in rows]
        agree = all(len(set(r)) == 1 for r in rows) and row0 == self.reference_tokens[:steps]
        return Round(times, row0, None, None, {}, rows_agree=agree)
