"""DeepSparse and ONNX Runtime behind one small interface: compile a deployment folder, run tokens.

``compile(ODIR, engine)`` returns a :class:`Session` that owns the KV cache of one sequence:

* ``session.forward(ids)`` feeds tokens after those already cached and returns their logits
  ``[len(ids), vocab]``: whole chunks of ``prefill_length`` go through the multi-token graph, the rest
  one at a time through the single-token graph — the same split DeepSparse's TextGeneration pipeline
  makes (both graphs are the one ``model.onnx`` with its input shapes re-declared). Past 16 tokens a
  DeepSparse session also compiles the 16-token graph, so the rest goes in 16-token chunks before single
  tokens (a 127-token prompt at 128 is 7 x 16 + 15 x 1 calls, not 127). ONNX Runtime's one graph takes any
  length: there the rest is one last, shorter chunk.
* ``session.step(token)`` is ``forward([token])[0]``; ``session.reset()`` empties the cache.
* ``session.generate(prompt_ids, max_new_tokens)`` is greedy decoding that yields token ids as they
  are produced (prefill, then decode, explicitly).

DeepSparse runs with its internal KV cache by default (the engine keeps the cache, as in its own
pipeline); ``kv_cache="external"`` feeds the cache back from numpy like ONNX Runtime does.

Every problem the user can fix (missing folder or files, corrupted ONNX, a graph that does not follow
the contract, a sequence length the graph cannot take, an engine that refuses the graph) is raised as
an ``OwlError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from owl_deploy import contract
from owl_deploy.configs import ENGINES
from owl_deploy.contract import MODEL_ONNX, PREFILL_RULE, GraphSpec, valid_prefill_length
from owl_deploy.errors import OwlError, one_line

#: tokens per multi-token prefill call (DeepSparse's pipeline default; it must be 1 or a multiple of 4)
DEFAULT_PREFILL_LENGTH = 16


# ---------------------------------------------------------------- the deployment folder
@dataclass
class Deployment:
    """A deployment folder: ``model.onnx`` (+ external data), config and tokenizer files."""

    folder: Path
    onnx_path: Path
    contract: contract.Contract
    external_files: list[str] = field(default_factory=list)
    #: the parsed graph (weights included unless they are external data); compile re-declares its inputs
    proto: object = field(default=None, repr=False)

    @property
    def spec(self) -> GraphSpec:
        return self.contract.spec

    @property
    def sequence_length(self) -> int:
        """The export's static sequence length."""
        return self.contract.sequence_length

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence length the graph can be re-declared to (RoPE table rows)."""
        return self.contract.max_sequence_length

    def tokenizer(self):
        from transformers import AutoTokenizer

        if not any((self.folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise OwlError(f"{self.folder} has no tokenizer files (tokenizer.json, tokenizer_config.json)")
        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except Exception as exc:
            raise OwlError(f"cannot load the tokenizer in {self.folder}: {one_line(exc)}") from exc


def open_deployment(folder: str | os.PathLike | Deployment) -> Deployment:
    """Check a deployment folder against the ONNX contract without compiling anything."""
    if isinstance(folder, Deployment):
        return folder
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise OwlError(f"deployment folder not found: {folder}")
    path = folder / MODEL_ONNX
    if not path.is_file():
        raise OwlError(f"{folder} has no {MODEL_ONNX}: export a model there first (owl-deploy export)")
    proto = contract.load_graph(path)
    external = contract.external_data_files(proto, folder)
    return Deployment(folder, path, contract.read_contract(proto, path), external, proto)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """DeepSparse prints a banner on the process's stdout at its first compile and logs every input it
    generates at INFO; keep stdout (and stderr) for our own output."""
    import logging

    logger = logging.getLogger("deepsparse")
    level = logger.level
    logger.setLevel(logging.WARNING)
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
        logger.setLevel(level)


# ---------------------------------------------------------------- compiled graphs
class _Graph:
    """One compiled graph; ``n`` is its static input_ids length (None: any length)."""

    n: int | None
    input_names: list[str]

    def run(self, feeds: dict, kv=None) -> list[np.ndarray]:
        raise NotImplementedError


class _OrtGraph(_Graph):
    def __init__(self, model_bytes: bytes, folder: Path, threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        # loaded from memory: external data is read from the deployment folder itself
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            self.sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OwlError(f"onnxruntime cannot load the graph: {one_line(exc)}") from exc
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.n = None

    def run(self, feeds: dict, kv=None) -> list[np.ndarray]:
        return self.sess.run(None, {k: feeds[k] for k in self.input_names})


def _ort_form(proto, folder: Path) -> int:
    """ONNX Runtime's form of a graph: int8 weights re-signed where that is exact and faster (``ort_int8``; the
    external ones from a companion file in ``folder``); how many were."""
    from owl_deploy import ort_int8

    return ort_int8.sign_weights(proto, folder) if ort_int8.enabled() else 0


class _DeepSparseGraph(_Graph):
    def __init__(self, path: Path, n: int, threads: int | None, internal_cache: bool, batch: int = 1):
        os.environ.setdefault("WAND_OPT_FLAGS", "default,~pyramids")  # what DeepSparse's LLM pipeline sets
        try:
            from deepsparse import Engine
            from deepsparse.utils.onnx import default_cached_outputs
        except Exception as exc:
            raise OwlError(f"deepsparse is not usable here: {one_line(exc)}") from exc
        cached = default_cached_outputs(str(path)) if internal_cache else None
        try:
            with quiet_stdout():
                self.engine = Engine(str(path), batch_size=batch, num_cores=threads, cached_outputs=cached)
        except Exception as exc:
            raise OwlError(f"deepsparse cannot compile the graph (input_ids_length {n}): {one_line(exc)}") from exc
        self.input_names = list(self.engine.input_names)
        self.n = n

    def run(self, feeds: dict, kv=None) -> list[np.ndarray]:
        """``kv``: the internal cache of a batch-1 call, or a list of one per row of a batched call."""
        inputs = [feeds[k] for k in self.input_names]
        if kv is not None:
            return self.engine._eng_net.execute_list_out(inputs, kv if isinstance(kv, list) else [kv])
        return self.engine._eng_net.execute_list_out(inputs)


# ---------------------------------------------------------------- the session
@dataclass
class KVState:
    """One sequence's KV cache between calls and how many tokens it holds: either the ``present`` tensors
    [1, kv_heads, L, head_dim] of its last call (valid entries right-aligned; an external cache), or the
    DeepSparse ``kv_cache`` object whose engine-side buffers hold it (an internal cache)."""

    presents: list[np.ndarray] | None
    num_cached: int
    internal: object | None = None


class Session:
    """A compiled deployment plus the KV cache of one sequence."""

    def __init__(
        self,
        dep: Deployment,
        engine: str,
        sequence_length: int,
        prefill_length: int,
        kv_cache: str,
        graphs: dict[int | None, _Graph],
        compile_seconds: float,
        signed_weights: int = 0,
        last_logits: bool = False,
    ):
        self.deployment = dep
        self.last_logits = last_logits  # multi-token calls return the last token's logits only
        self.engine = engine
        self.sequence_length = sequence_length
        self.prefill_length = prefill_length
        self.kv_cache = kv_cache
        self.compile_seconds = compile_seconds
        self.signed_weights = signed_weights  # int8 weights ONNX Runtime runs re-signed (ort_int8)
        self._graphs = graphs
        self.reset()

    # -- cache
    def reset(self) -> None:
        """Forget every cached token."""
        self.num_cached = 0
        self._cache: list[np.ndarray] | None = None
        self._internal = None
        if self.kv_cache == "internal":
            from deepsparse.engine import LIB

            self._internal = LIB.kv_cache(0, 0)

    @property
    def capacity(self) -> int:
        """Tokens the cache holds: the sequence length, one fewer with DeepSparse's internal cache (its engine
        makes room for the last slot by evicting the oldest entry — measured: the chunk that fills it
        differs from ONNX Runtime, every earlier one is equal)."""
        return self.sequence_length - (self.kv_cache == "internal")

    @property
    def capacity_left(self) -> int:
        return self.capacity - self.num_cached

    def state(self) -> KVState:
        """This sequence's cache, to hand to a :class:`Decoder` of the same kind of cache. An external cache
        is shared (the session's next call makes new arrays); an internal one is handed over and the session
        starts afresh (the engine's buffers cannot be copied)."""
        if self.kv_cache == "external":
            return KVState(list(self._cache) if self._cache is not None else None, self.num_cached)
        state = KVState(None, self.num_cached, internal=self._internal)
        self.reset()
        return state

    # -- running
    def forward(self, input_ids: Sequence[int]) -> np.ndarray:
        """Feed ``input_ids`` after the cached tokens; return their logits ``[len(input_ids), vocab]`` (``[1, vocab]``,
        the last token's, in a session compiled with ``last_logits``)."""
        ids = [int(t) for t in input_ids]
        if not ids:
            raise OwlError("forward() needs at least one token")
        if self.num_cached + len(ids) > self.capacity:
            internal = " less one (DeepSparse's internal KV cache)" if self.capacity < self.sequence_length else ""
            raise OwlError(
                f"sequence too long: {self.num_cached} cached + {len(ids)} new tokens exceed "
                f"the sequence length {self.sequence_length}{internal}"
            )
        out = []
        pos = 0
        p = self.prefill_length
        any_length = None in self._graphs  # ONNX Runtime: one graph takes any number of tokens
        lengths = sorted((n for n in self._graphs if n is not None), reverse=True)
        while pos < len(ids):
            left = len(ids) - pos
            n = min(p, left) if any_length else next((k for k in lengths if k <= left), 0)
            if not n:
                raise OwlError(f"no compiled graph takes {left} tokens (this session has {lengths})")
            out.append(self._run(ids[pos : pos + n]))
            pos += n
        return out[-1][-1:] if self.last_logits else np.concatenate(out, axis=0)

    def step(self, token: int) -> np.ndarray:
        """One decode step: the logits ``[vocab]`` after ``token``."""
        return self.forward([token])[0]

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> Iterator[int]:
        """Greedy decoding from a fresh cache: prefill the prompt, then decode; yields each new token.

        Stops after ``max_new_tokens``, at an end-of-sequence token (yielded), or when the cache is full.
        """
        if max_new_tokens < 0:
            raise OwlError("max_new_tokens must be >= 0")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise OwlError("the prompt is empty")
        if len(prompt) >= self.sequence_length:
            raise OwlError(
                f"the prompt has {len(prompt)} tokens; the deployment's sequence length is "
                f"{self.sequence_length} (re-export with a longer --sequence-length)"
            )
        if eos_token_id is None:
            stops: set[int] = set()
        else:
            stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self.reset()
        logits = self.forward(prompt)[-1]
        for i in range(max_new_tokens):
            token = int(np.argmax(logits))
            yield token
            if token in stops or i == max_new_tokens - 1 or self.num_cached >= self.capacity:
                return
            logits = self.step(token)

    # -- internals
    def _graph_for(self, n: int) -> _Graph:
        graph = self._graphs.get(n) or self._graphs.get(None)
        if graph is None:
            raise OwlError(f"internal: no compiled graph for {n} tokens")
        return graph

    def _run(self, ids: list[int]) -> np.ndarray:
        n, total, spec = len(ids), self.sequence_length, self.deployment.spec
        capacity = total - n
        cached = self.num_cached
        feeds = contract.feeds(ids, cached, total)
        past = self._past(capacity)
        for i in range(spec.num_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outputs = self._graph_for(n).run(feeds, self._internal)
        if self._internal is None:
            self._cache = outputs[1:]  # present: [1, kvh, total, hd], valid entries right-aligned
        self.num_cached += n
        return np.asarray(outputs[0][0], dtype=np.float32)

    def _past(self, capacity: int) -> list[np.ndarray]:
        spec = self.deployment.spec
        if self._internal is not None:  # the engine keeps the cache; it wants empty placeholders
            empty = np.zeros((0, spec.num_kv_heads, capacity, spec.head_dim), np.float32)
            return [empty] * (2 * spec.num_layers)
        if self._cache is None:
            zeros = np.zeros((1, spec.num_kv_heads, capacity, spec.head_dim), np.float32)
            return [zeros] * (2 * spec.num_layers)
        have = self._cache[0].shape[2]
        if have >= capacity:  # drop blank slots on the left
            return [np.ascontiguousarray(a[:, :, have - capacity :, :]) for a in self._cache]
        pad = np.zeros((1, spec.num_kv_heads, capacity - have, spec.head_dim), np.float32)
        return [np.concatenate([pad, a], axis=2) for a in self._cache]


def prefill_cascade(prefill_length: int) -> list[int]:
    """The static input lengths a DeepSparse session compiles: 1, ``prefill_length``, and between them
    DEFAULT_PREFILL_LENGTH when it is shorter, so a prompt's rest is not fed one token at a time. (Whatever
    ``prefill_length`` fits the cache, the shorter length fits too.)"""
    step = DEFAULT_PREFILL_LENGTH
    return sorted({1, prefill_length} | ({step} if 1 < step < prefill_length else set()))


def internal_prefill_length(total: int) -> int:
    """The chunk for an internal cache of ``total`` slots (it needs 2n < total): the largest power of two that
    fits, at least 4 (else 1). Measured on the AMX Xeon, SmolLM2 70% fp32, a 128-token prompt at 256 slots: 64 + 64
    in 109 ms, 112 + 16 in 153 ms, 124 + 4 x 1 in 155 ms (DeepSparse's 112- and 32-token graphs cost more per token
    than its 64-token one); and 128-token chunks at 512 slots run at the 64-at-256 rate."""
    n = (total - 1) // 2
    if n < 4:
        return 1
    return 1 << (n.bit_length() - 1)


def compile(
    folder: str | os.PathLike | Deployment,
    engine: str = "deepsparse",
    sequence_length: int | None = None,
    prefill_length: int = DEFAULT_PREFILL_LENGTH,
    kv_cache: str | None = None,
    threads: int | None = None,
    lengths: Sequence[int] | None = None,
    last_logits: bool = False,
) -> Session:
    """Compile a deployment folder with ``engine`` (``deepsparse`` or ``onnxruntime``).

    ``sequence_length`` defaults to the export's; ``prefill_length`` 1 disables the multi-token graph.
    ``kv_cache`` is ``internal`` (DeepSparse only, its default) or ``external``. ``lengths`` (DeepSparse):
    compile exactly these static input lengths instead of ``prefill_cascade`` — each DeepSparse graph
    holds its own copy of the weights, so a check that needs less memory compiles one at a time.
    ``last_logits``: multi-token calls compute the lm_head for their last token only (a server's prefill needs
    nothing else; ``contract.last_logits``), and ``forward`` returns that row.
    """
    if engine not in ENGINES:
        raise OwlError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    dep = open_deployment(folder)
    total = int(sequence_length or dep.sequence_length)
    if total < 2 or total > dep.max_sequence_length:
        raise OwlError(
            f"sequence length {total} does not fit this deployment (2 .. {dep.max_sequence_length}; "
            f"exported at {dep.sequence_length})"
        )
    if not valid_prefill_length(prefill_length):
        raise OwlError(f"prefill length {prefill_length} must be {PREFILL_RULE}")
    kv_cache = kv_cache or ("internal" if engine == "deepsparse" else "external")
    if kv_cache not in ("internal", "external"):
        raise OwlError(f"unknown kv_cache {kv_cache!r}; choose internal or external")
    if kv_cache == "internal" and engine != "deepsparse":
        raise OwlError("an internal KV cache is a DeepSparse feature; use kv_cache='external' with onnxruntime")
    if kv_cache == "internal":
        # DeepSparse's internal cache needs more cache slots than new tokens (sequence_length > 2n):
        # at n == L - n it returns NaN, below that the engine aborts the process.
        if total < 3:
            kv_cache = "external"
        if prefill_length > 1 and 2 * prefill_length >= total:
            prefill_length = internal_prefill_length(total)
    if prefill_length >= total:
        prefill_length = 1
    start = time.perf_counter()
    if dep.proto is None:
        raise OwlError(f"{dep.folder}: this deployment was compiled already; open it again")
    proto, dep.proto = dep.proto, None  # the session does not keep a second copy of the weights
    graphs: dict[int | None, _Graph] = {}
    signed = 0
    if engine == "onnxruntime":
        signed = _ort_form(proto, dep.folder)
        graphs[None] = _OrtGraph(
            contract.serialized(proto, dep.spec, total, None, last=last_logits), dep.folder, threads
        )
    else:
        for n in lengths or prefill_cascade(prefill_length):
            with contract.declared_copy(dep.folder, proto, dep.spec, total, n, last=last_logits and n > 1) as path:
                graphs[n] = _DeepSparseGraph(path, n, threads, kv_cache == "internal")
    seconds = time.perf_counter() - start
    return Session(dep, engine, total, prefill_length, kv_cache, graphs, seconds, signed, last_logits)


class Decoder:
    """Single-token decode steps for several independent sequences at once, each with its own KV cache.

    Compiled at ``batch_sizes``: a step of k sequences runs the smallest compiled batch that holds them,
    padding the rest with empty rows (one weight read serves every row: decode reads the weights, not the
    tokens). Rows are independent: masks, positions and caches are per sequence.

    ``kv_cache="external"`` feeds every row's cache in and takes it back out as numpy arrays each step, so
    a step of B rows copies B whole caches (measured on SmolLM2 70% int8, batch 16, 256 slots: 72 ms a step;
    the copy into the feed arrays is the part we own, see ``_gather``). ``"internal"`` (DeepSparse) passes one
    engine-side cache per row, as DeepSparse's own continuous batching does, and nothing is copied (20 ms a
    step); its rows' caches come from a DeepSparse session with an internal cache (``Session.state()``).
    """

    def __init__(
        self,
        dep: Deployment,
        engine: str,
        sequence_length: int,
        graphs: dict[int, _Graph],
        seconds: float,
        kv_cache: str = "external",
        signed_weights: int = 0,
    ):
        self.deployment, self.engine, self.sequence_length = dep, engine, sequence_length
        self.batch_sizes = sorted(graphs)
        self.compile_seconds = seconds
        self.signed_weights = signed_weights  # int8 weights ONNX Runtime runs re-signed (ort_int8)
        self.kv_cache = kv_cache
        self._graphs = graphs
        self._past: list[np.ndarray] | None = None  # external caches: the feed arrays, reused (see _gather)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def capacity(self) -> int:
        """Tokens a row's cache holds (one fewer than the sequence length in DeepSparse's internal cache)."""
        return self.sequence_length - (self.kv_cache == "internal")

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def step(self, tokens: Sequence[int], states: Sequence[KVState]) -> np.ndarray:
        """Feed ``tokens[i]`` after ``states[i]``; update the states in place; logits ``[len(tokens), vocab]``."""
        k = len(tokens)
        if not 0 < k <= self.max_batch or len(states) != k:
            raise OwlError(f"a decode step takes 1 to {self.max_batch} sequences, got {k}")
        internal = self.kv_cache == "internal"
        if any((st.internal is not None) != internal for st in states):
            raise OwlError(f"this decoder takes {self.kv_cache} KV caches; a sequence came with the other kind")
        batch = next(b for b in self.batch_sizes if b >= k)
        spec, total = self.deployment.spec, self.sequence_length
        rows = []
        for token, st in zip(tokens, states, strict=True):
            if st.num_cached >= self.capacity:
                raise OwlError(f"a sequence is full ({self.capacity} tokens)")
            rows.append(contract.feeds([int(token)], st.num_cached, total))
        rows += [contract.feeds([0], 0, total)] * (batch - k)  # padding: attends to itself only
        feeds = {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
        if internal:
            from deepsparse.engine import LIB

            empty = np.zeros((0, spec.num_kv_heads, total - 1, spec.head_dim), np.float32)  # the engine's own
            for j in range(2 * spec.num_layers):
                feeds[f"past_key_values.{j // 2}.{'key' if j % 2 == 0 else 'value'}"] = empty
            caches = [st.internal for st in states] + [LIB.kv_cache(0, 0) for _ in range(batch - k)]
            outputs = self._graphs[batch].run(feeds, caches)
            for st in states:
                st.num_cached += 1
            return np.asarray(outputs[0][:k, -1], dtype=np.float32)
        past = self._gather(states, batch)
        for j in range(2 * spec.num_layers):
            feeds[f"past_key_values.{j // 2}.{'key' if j % 2 == 0 else 'value'}"] = past[j]
        outputs = self._graphs[batch].run(feeds)
        for i, st in enumerate(states):
            st.presents = [np.ascontiguousarray(o[i : i + 1]) for o in outputs[1:]]
            st.num_cached += 1
        return np.asarray(outputs[0][:k, -1], dtype=np.float32)

    def _gather(self, states: Sequence[KVState], batch: int) -> list[np.ndarray]:
        """Every row's past (its last present minus the oldest slot) copied into the feed arrays of a batch.

        The arrays are allocated once, at the largest batch, and reused (the first ``batch`` rows of a
        C-contiguous array are one), and two threads copy them while the engine waits: a fresh
        ``np.concatenate`` per step spent 42 of a 111 ms batch-16 step here (SmolLM2 int8, 256 slots);
        padding rows keep whatever finite values they held (the mask hides them)."""
        spec = self.deployment.spec
        shape = (self.max_batch, spec.num_kv_heads, self.sequence_length - 1, spec.head_dim)
        if self._past is None:
            self._past = [np.zeros(shape, np.float32) for _ in range(2 * spec.num_layers)]
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="owl-deploy-kv")

        def fill(layers: range) -> None:
            for j in layers:
                for i, st in enumerate(states):
                    if st.presents is None:
                        self._past[j][i] = 0.0
                    else:
                        np.copyto(self._past[j][i], st.presents[j][0, :, 1:, :])

        n = len(self._past)
        list(self._pool.map(fill, (range(0, n, 2), range(1, n, 2))))
        return [a[:batch] for a in self._past]


def compile_decoder(
    folder: str | os.PathLike | Deployment,
    engine: str = "deepsparse",
    batch_sizes: Sequence[int] = (1,),
    sequence_length: int | None = None,
    threads: int | None = None,
    kv_cache: str = "external",
) -> Decoder:
    """One single-token graph per batch size, each compiled in ``engine`` with a ``kv_cache`` of that kind
    (``internal``: DeepSparse only)."""
    if engine not in ENGINES:
        raise OwlError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if kv_cache not in ("internal", "external"):
        raise OwlError(f"unknown kv_cache {kv_cache!r}; choose internal or external")
    if kv_cache == "internal" and engine != "deepsparse":
        raise OwlError("an internal KV cache is a DeepSparse feature; use kv_cache='external' with onnxruntime")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise OwlError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    dep = open_deployment(folder)
    total = int(sequence_length or dep.sequence_length)
    if total < 2 or total > dep.max_sequence_length:
        raise OwlError(f"sequence length {total} does not fit this deployment (2 .. {dep.max_sequence_length})")
    proto, dep.proto = dep.proto, None
    start = time.perf_counter()
    graphs: dict[int, _Graph] = {}
    import onnx

    signed = _ort_form(proto, dep.folder) if engine == "onnxruntime" else 0
    for b in sizes:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        if engine == "onnxruntime":
            graphs[b] = _OrtGraph(contract.serialized(copy, dep.spec, total, 1, b), dep.folder, threads)
        else:
            with contract.declared_copy(dep.folder, copy, dep.spec, total, 1, batch=b) as path:
                graphs[b] = _DeepSparseGraph(path, 1, threads, internal_cache=kv_cache == "internal", batch=b)
        del copy
    return Decoder(dep, engine, total, graphs, time.perf_counter() - start, kv_cache, signed)
