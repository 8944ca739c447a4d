"""Continuous batching: one engine thread that prefills new requests and decodes every active one together.

Decode is bound by reading the weights, not by the tokens: a step of k sequences in a batch-k graph reads
the weights once for k tokens. So every loop iteration (1) admits waiting requests while fewer than
``max_batch`` are active (at most ``prefills_per_step`` of them, when set) — each prompt is prefilled in the
batch-1 session's multi-token chunks, its KV cache handed to the decoder — and (2) runs one batched decode step over
all active sequences. A new request therefore waits at most for the step under way and the prefills admitted before
it, never for a running request to finish; a finished or cancelled request frees its row at the next step. The
running streams wait for every prefill admitted between two steps: the bound caps that stall.

The engine is one thread (the engines pin their threads to the cores; two callers would fight for them).
Requests cross threads through their own queues of events: ``("token", id)`` then ``("done", reason)``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from owl_deploy.errors import OwlError
from owl_deploy.runtime import Decoder, KVState, Session


class QueueFull(OwlError):
    """More requests wait than the server admits; the client should retry later."""


@dataclass
class Sampling:
    """How the next token is chosen: greedy (temperature 0, the default) or sampled (temperature, top_p)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to the top-p nucleus."""
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < s.top_p  # the smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


@dataclass
class Request:
    """One generation: the prompt, its limits and sampling, and what the engine thread reports back."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()
    #: where the engine thread reports ("token", id) ... then ("done", reason) or ("error", message); a server
    #: passes a callback into its event loop, tests read the default queue
    put: Callable[[tuple], None] | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    # engine-thread state
    state: KVState | None = None
    generated: int = 0
    last: int = 0
    rng: np.random.Generator | None = None

    def cancel(self) -> None:
        """The client went away (or a stop string was found): free the row at the next step."""
        self.cancelled.set()

    def report(self, event: tuple) -> None:
        (self.put or self.events.put)(event)


class Scheduler:
    """The engine thread and its admission queue (bounded: ``max_queue`` waiting requests)."""

    def __init__(
        self,
        prefill: Session,
        decoder: Decoder,
        max_batch: int,
        max_queue: int,
        on_step: Callable[[int, int, float], None] | None = None,
        on_prefill: Callable[[int, float], None] | None = None,
        after_step: Callable[[], None] | None = None,
        prefills_per_step: int | None = None,
    ):
        if max_batch > decoder.max_batch:
            raise OwlError(f"max batch {max_batch} exceeds the decoder's largest compiled batch {decoder.max_batch}")
        if prefills_per_step is not None and prefills_per_step < 1:
            raise OwlError(f"prefills per step must be at least 1, got {prefills_per_step}")
        self.prefills_per_step = prefills_per_step or max_batch
        self.prefill, self.decoder = prefill, decoder
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step = on_step or (lambda active, waiting, seconds: None)
        self.on_prefill = on_prefill or (lambda tokens, seconds: None)
        self.after_step = after_step or (lambda: None)  # e.g. wait for the server's event loop (ServeConfig.step_sync)
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._active: list[Request] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="owl-deploy-engine", daemon=True)
        self.sequence_length = decoder.sequence_length

    # ---------------------------------------------------------------- API of the server side
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        """Queue a request, or raise QueueFull (bounded memory: the server answers 429 instead)."""
        if len(req.prompt_ids) + req.max_tokens > self.sequence_length:
            raise OwlError(
                f"the prompt ({len(req.prompt_ids)} tokens) and max_tokens ({req.max_tokens}) exceed the "
                f"deployment's sequence length ({self.sequence_length})"
            )
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            self._waiting.append(req)
            self._lock.notify()

    @property
    def depth(self) -> tuple[int, int]:
        """(active, waiting) requests."""
        with self._lock:
            return len(self._active), len(self._waiting)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is admitted and queued, then end the engine thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the engine thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._active and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._waiting and not self._active:
                    return
                admit = []
                while (
                    self._waiting
                    and len(self._active) + len(admit) < self.max_batch
                    and len(admit) < self.prefills_per_step
                ):
                    admit.append(self._waiting.popleft())
            for req in admit:
                self._admit(req)
            self._step()

    def _admit(self, req: Request) -> None:
        """Prefill the prompt (batch-1 multi-token chunks), emit the first token, hand the cache over."""
        if req.cancelled.is_set():
            req.report(("done", "cancelled"))
            return
        t0 = time.perf_counter()
        try:
            self.prefill.reset()
            logits = self.prefill.forward(req.prompt_ids)[-1]
            req.state = self.prefill.state()
        except Exception as exc:  # a bad request must not stop the engine thread
            req.report(("error", str(exc)))
            return
        self.on_prefill(len(req.prompt_ids), time.perf_counter() - t0)
        req.rng = req.sampling.rng()
        self._emit(req, sample(logits, req.sampling, req.rng))
        if req.generated < req.max_tokens and not req.cancelled.is_set() and req.last not in req.stop_ids:
            self._active.append(req)

    def _emit(self, req: Request, token: int) -> None:
        req.last = token
        req.generated += 1
        req.report(("token", token))
        if token in req.stop_ids:
            req.report(("done", "stop"))
        elif req.generated >= req.max_tokens:
            req.report(("done", "length"))

    def _step(self) -> None:
        """One batched decode step over the active requests (cancelled and full ones leave first)."""
        keep = []
        for req in self._active:
            if req.cancelled.is_set():
                req.report(("done", "cancelled"))
            elif req.state.num_cached >= self.decoder.capacity:
                req.report(("done", "length"))
            else:
                keep.append(req)
        self._active = keep
        if not keep:
            return
        t0 = time.perf_counter()
        try:
            logits = self.decoder.step([r.last for r in keep], [r.state for r in keep])
        except Exception as exc:
            for req in keep:
                req.report(("error", str(exc)))
            self._active = []
            return
        for req, row in zip(keep, logits, strict=True):
            self._emit(req, sample(row, req.sampling, req.rng))
        self._active = [r for r in keep if r.generated < r.max_tokens and r.last not in r.stop_ids]
        with self._lock:
            waiting = len(self._waiting)
        self.on_step(len(keep), waiting, time.perf_counter() - t0)
        self.after_step()

    def info(self) -> dict[str, Any]:
        return {
            "engine": self.decoder.engine,
            "batch_sizes": self.decoder.batch_sizes,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "prefills_per_step": self.prefills_per_step,
            "sequence_length": self.sequence_length,
            "kv_cache": self.decoder.kv_cache,
            "prefill_engine": self.prefill.engine,
            "prefill_length": self.prefill.prefill_length,
            # int8 weights ONNX Runtime runs re-signed (ort_int8): what each compiled session did, not the rule
            "onnxruntime_signed_weights": {
                "prefill": self.prefill.signed_weights,
                "decode": self.decoder.signed_weights,
            },
        }
