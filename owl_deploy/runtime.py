"""DeepSparse and ONNX Runtime behind one small interface: compile a deployment folder, run tokens.

``compile(ODIR, engine)`` returns a :class:`Session` that owns the KV cache of one sequence:

* ``session.forward(ids)`` feeds tokens after those already cached and returns their logits
  ``[len(ids), vocab]``: whole chunks of ``prefill_length`` go through the multi-token graph, the rest
  one at a time through the single-token graph — the same split DeepSparse's TextGeneration pipeline
  makes (both graphs are the one ``model.onnx`` with its input shapes re-declared).
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
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from owl_deploy.errors import OwlError
from owl_deploy.export.graph import META_KEY, MODEL_ONNX, GraphSpec, set_input_shapes

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

ENGINES = ("deepsparse", "onnxruntime")
#: tokens per multi-token prefill call (DeepSparse's pipeline default; it must be 1 or a multiple of 4)
DEFAULT_PREFILL_LENGTH = 16


# ---------------------------------------------------------------- the deployment folder
@dataclass
class Deployment:
    """A deployment folder: ``model.onnx`` (+ external data), config and tokenizer files."""

    folder: Path
    onnx_path: Path
    spec: GraphSpec
    sequence_length: int  # the export's static sequence length
    max_sequence_length: int  # the longest one the graph can be re-declared to (RoPE table rows)
    external_files: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    #: the parsed graph (weights included unless they are external data); compile re-declares its inputs
    proto: object = field(default=None, repr=False)

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except Exception as exc:
            raise OwlError(f"cannot load the tokenizer in {self.folder}: {_one_line(exc)}") from exc


def open_deployment(folder: str | os.PathLike) -> Deployment:
    """Check a deployment folder against the ONNX contract without compiling anything."""
    import onnx
    from google.protobuf.message import DecodeError

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise OwlError(f"deployment folder not found: {folder}")
    path = folder / MODEL_ONNX
    if not path.is_file():
        raise OwlError(f"{folder} has no {MODEL_ONNX}: export a model there first (owl-deploy export)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise OwlError(f"{path} is corrupted: not a readable ONNX model ({_one_line(exc)})") from exc
    except Exception as exc:  # protobuf raises several types for garbage
        raise OwlError(f"{path} is corrupted: not a readable ONNX model ({_one_line(exc)})") from exc
    if not proto.graph.node:
        raise OwlError(f"{path} is corrupted: the ONNX graph has no nodes")
    external = sorted(
        {
            entry.value
            for init in proto.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data
            if entry.key == "location"
        }
    )
    for name in external:
        if not (folder / name).is_file():
            raise OwlError(f"{path} keeps its weights in {name}, which is missing from {folder}")
    spec, seq_len, max_len, meta = _contract(proto, path)
    return Deployment(folder, path, spec, seq_len, max_len, external, meta, proto)


def _contract(proto, path: Path) -> tuple[GraphSpec, int, int, dict]:
    """Read the shapes from the graph inputs and our metadata; reject graphs outside the contract."""
    inputs = {i.name: i for i in proto.graph.input}
    initializers = {i.name for i in proto.graph.initializer}
    names = [n for n in inputs if n not in initializers]
    required = ["input_ids", "attention_mask", "positions", "causal_mask"]
    missing = [n for n in required if n not in names]
    past = [n for n in names if n.startswith("past_key_values.")]
    if missing or not past:
        what = ", ".join(missing) if missing else "past_key_values.*"
        raise OwlError(f"{path} does not follow the KV-cache contract: missing input(s) {what}")
    outputs = [o.name for o in proto.graph.output]
    if not outputs or outputs[0] != "logits" or not any(o.startswith("present.") for o in outputs):
        raise OwlError(f"{path} does not follow the KV-cache contract: outputs must be logits, present.*")
    layers = len([n for n in past if n.endswith(".key")])
    expected = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    if sorted(past) != sorted(expected):
        raise OwlError(f"{path} does not follow the KV-cache contract: past_key_values inputs are not 0..{layers - 1}")
    presents = [o for o in outputs if o.startswith("present.")]
    if sorted(presents) != sorted(n.replace("past_key_values", "present") for n in expected):
        raise OwlError(f"{path} does not follow the KV-cache contract: present outputs do not match the past inputs")
    dims = [d.dim_value for d in inputs[past[0]].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        raise OwlError(f"{path}: past_key_values inputs must be [batch, kv_heads, past, head_dim], got {dims}")
    for name in expected:
        other = [d.dim_value for d in inputs[name].type.tensor_type.shape.dim]
        if len(other) != 4 or (other[1], other[3]) != (dims[1], dims[3]):
            raise OwlError(f"{path}: wrong shape {other} for {name} (the other caches are {dims})")
    meta = {}
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            with contextlib.suppress(ValueError):
                meta = json.loads(prop.value)
    mask_dims = [d.dim_value for d in inputs["attention_mask"].type.tensor_type.shape.dim]
    declared = mask_dims[1] if len(mask_dims) == 2 else 0
    if meta and (meta.get("num_kv_heads"), meta.get("head_dim")) != (dims[1], dims[3]):
        raise OwlError(
            f"{path}: wrong cache shape {dims}: the export recorded {meta.get('num_kv_heads')} KV heads "
            f"of {meta.get('head_dim')}"
        )
    seq_len = int(meta.get("sequence_length") or declared or 0)
    if seq_len <= 1:
        raise OwlError(f"{path}: cannot tell the sequence length (attention_mask has no static length)")
    spec = GraphSpec(
        num_layers=layers,
        num_heads=int(meta.get("num_heads", 0)),
        num_kv_heads=dims[1],
        head_dim=dims[3],
        hidden_size=int(meta.get("hidden_size", 0)),
        vocab_size=int(meta.get("vocab_size", 0)),
        max_positions=int(meta.get("max_positions", 0)),
    )
    max_len = int(meta.get("max_sequence_length") or seq_len)
    return spec, seq_len, max_len, meta


# ---------------------------------------------------------------- compiled graphs
class _Graph:
    """One compiled graph; ``n`` is its static input_ids length (None: any length)."""

    n: int | None
    input_names: list[str]

    def run(self, feeds: dict, kv=None) -> list[np.ndarray]:
        raise NotImplementedError


class _OrtGraph(_Graph):
    def __init__(self, model_bytes: bytes, folder: Path, num_threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if num_threads:
            opts.intra_op_num_threads = num_threads
        # loaded from memory: external data is read from the deployment folder itself
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            self.sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OwlError(f"onnxruntime cannot load the graph: {_one_line(exc)}") from exc
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.n = None

    def run(self, feeds: dict, kv=None) -> list[np.ndarray]:
        return self.sess.run(None, {k: feeds[k] for k in self.input_names})


class _DeepSparseGraph(_Graph):
    def __init__(self, path: Path, n: int, num_threads: int | None, internal_cache: bool):
        os.environ.setdefault("WAND_OPT_FLAGS", "default,~pyramids")  # what DeepSparse's LLM pipeline sets
        try:
            from deepsparse import Engine
            from deepsparse.utils.onnx import default_cached_outputs
        except Exception as exc:
            raise OwlError(f"deepsparse is not usable here: {_one_line(exc)}") from exc
        cached = default_cached_outputs(str(path)) if internal_cache else None
        try:
            self.engine = Engine(str(path), batch_size=1, num_cores=num_threads, cached_outputs=cached)
        except Exception as exc:
            raise OwlError(f"deepsparse cannot compile the graph (input_ids_length {n}): {_one_line(exc)}") from exc
        self.input_names = list(self.engine.input_names)
        self.n = n

    def run(self, feeds: dict, kv=None) -> list[np.ndarray]:
        inputs = [feeds[k] for k in self.input_names]
        if kv is not None:
            return self.engine._eng_net.execute_list_out(inputs, [kv])
        return self.engine._eng_net.execute_list_out(inputs)


def _declare(dep: Deployment, proto, sequence_length: int, input_ids_length: int | None) -> bytes:
    """``proto`` with re-declared input shapes, serialised.

    ``input_ids_length=None`` declares n (and the cache length) symbolic, for ONNX Runtime.
    """
    if input_ids_length is None:
        set_input_shapes(proto, dep.spec, sequence_length, 1)
        for inp in proto.graph.input:
            dims = inp.type.tensor_type.shape.dim
            if inp.name in ("input_ids", "positions"):
                dims[1].dim_param = "n"
            elif inp.name == "causal_mask":
                dims[2].dim_param = "n"
            elif inp.name.startswith("past_key_values."):
                dims[2].dim_param = "past"
    else:
        set_input_shapes(proto, dep.spec, sequence_length, input_ids_length)
    del proto.graph.value_info[:]
    return proto.SerializeToString()


def _declared(proto) -> list:
    return [(i.name, [(d.dim_value, d.dim_param) for d in i.type.tensor_type.shape.dim]) for i in proto.graph.input]


def _redeclared_inputs(dep: Deployment, proto, sequence_length: int, input_ids_length: int):
    """A graph holding only a copy of ``proto``'s inputs, re-declared (cheap: no weights)."""
    import onnx

    shell = onnx.ModelProto()
    shell.graph.input.extend(proto.graph.input)
    set_input_shapes(shell, dep.spec, sequence_length, input_ids_length)
    return shell


@contextlib.contextmanager
def _declared_copy(dep: Deployment, proto, sequence_length: int, input_ids_length: int | None):
    """Write ``model.onnx`` with re-declared input shapes to a temporary folder (external data linked).

    Yields the deployment's own file when it already declares these shapes (no copy).
    """
    if input_ids_length is not None and _declared(proto) == _declared(
        _redeclared_inputs(dep, proto, sequence_length, input_ids_length)
    ):
        yield dep.onnx_path
        return
    tmp = Path(tempfile.mkdtemp(prefix="owl-deploy-graph-"))
    try:
        for name in dep.external_files:
            src = (dep.folder / name).resolve()
            try:
                os.link(src, tmp / name)
            except OSError:  # another file system
                (tmp / name).symlink_to(src)
        with open(tmp / MODEL_ONNX, "wb") as fh:
            fh.write(_declare(dep, proto, sequence_length, input_ids_length))
        yield tmp / MODEL_ONNX
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the session
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
    ):
        self.deployment = dep
        self.engine = engine
        self.sequence_length = sequence_length
        self.prefill_length = prefill_length
        self.kv_cache = kv_cache
        self.compile_seconds = compile_seconds
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
    def capacity_left(self) -> int:
        return self.sequence_length - self.num_cached

    # -- running
    def forward(self, input_ids: Sequence[int]) -> np.ndarray:
        """Feed ``input_ids`` after the cached tokens; return their logits ``[len(input_ids), vocab]``."""
        ids = [int(t) for t in input_ids]
        if not ids:
            raise OwlError("forward() needs at least one token")
        if self.num_cached + len(ids) > self.sequence_length:
            raise OwlError(
                f"sequence too long: {self.num_cached} cached + {len(ids)} new tokens exceed "
                f"the sequence length {self.sequence_length}"
            )
        out = []
        pos = 0
        p = self.prefill_length
        while p > 1 and len(ids) - pos >= p:
            out.append(self._run(ids[pos : pos + p]))
            pos += p
        while pos < len(ids):
            out.append(self._run(ids[pos : pos + 1]))
            pos += 1
        return np.concatenate(out, axis=0)

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

        Stops after ``max_new_tokens``, at an end-of-sequence token (yielded), or when the sequence
        length is full.
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
            if token in stops or i == max_new_tokens - 1 or self.num_cached >= self.sequence_length:
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
        feeds = contract_feeds(ids, cached, total)
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


def compile(
    folder: str | os.PathLike,
    engine: str = "deepsparse",
    sequence_length: int | None = None,
    prefill_length: int = DEFAULT_PREFILL_LENGTH,
    kv_cache: str | None = None,
    num_threads: int | None = None,
) -> Session:
    """Compile a deployment folder with ``engine`` (``deepsparse`` or ``onnxruntime``).

    ``sequence_length`` defaults to the export's; ``prefill_length`` 1 disables the multi-token graph.
    ``kv_cache`` is ``internal`` (DeepSparse only, its default) or ``external``.
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
    if prefill_length < 1 or (prefill_length > 1 and prefill_length % 4):
        raise OwlError(f"prefill length {prefill_length} must be 1 or a multiple of 4")
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
        while prefill_length > 1 and 2 * prefill_length >= total:
            prefill_length = prefill_length - 4 if prefill_length > 4 else 1
    if prefill_length >= total:
        prefill_length = 1
    start = time.perf_counter()
    proto, dep.proto = dep.proto, None  # the session does not keep a second copy of the weights
    graphs: dict[int | None, _Graph] = {}
    if engine == "onnxruntime":
        graphs[None] = _OrtGraph(_declare(dep, proto, total, None), dep.folder, num_threads)
    else:
        for n in sorted({1, prefill_length}):
            with _declared_copy(dep, proto, total, n) as path:
                graphs[n] = _DeepSparseGraph(path, n, num_threads, kv_cache == "internal")
    seconds = time.perf_counter() - start
    return Session(dep, engine, total, prefill_length, kv_cache, graphs, seconds)


def _one_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def contract_feeds(ids: list[int], num_cached: int, total: int) -> dict[str, np.ndarray]:
    """The non-cache inputs of the export contract for ``ids`` after ``num_cached`` cached tokens:
    right-aligned ``attention_mask``, absolute ``positions`` and ``causal_mask`` (``[1, 1, n, total]``)."""
    n = len(ids)
    capacity = total - n
    attention_mask = np.zeros((1, total), dtype=np.int64)
    attention_mask[:, total - (num_cached + n) :] = 1
    if n == 1:
        causal = attention_mask.reshape(1, 1, 1, total).copy()
    else:
        causal = np.concatenate(
            [np.ones((1, 1, n, capacity), np.int64), np.tril(np.ones((1, 1, n, n), np.int64))], axis=-1
        )
        causal[..., : capacity - num_cached] = 0
    return {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": attention_mask,
        "positions": np.arange(num_cached, num_cached + n, dtype=np.int64)[None, :],
        "causal_mask": causal,
    }
