"""DeepSparse's KV-cache ONNX contract: the names, shapes and feeds of a decode graph, and reading one.

This is the one place that knows the contract (``deepsparse.TextGeneration`` and ``deepsparse.benchmark``
expect it); ``export/`` writes graphs in it, ``runtime`` and ``bench/`` read and feed them.

inputs, in this order (DeepSparse's pipeline relies on the order of the first four)
    ``input_ids``                 int64 [1, n]
    ``attention_mask``            int64 [1, L]          1 = attend (right-aligned: cache then new tokens)
    ``positions``                 int64 [1, n]          absolute positions of the n new tokens
    ``causal_mask``               int64 [1, 1, n, L]
    ``past_key_values.{i}.key``   fp32  [1, kv_heads, L - n, head_dim]   (then ``.value``), per layer
outputs
    ``logits``                    fp32  [1, n, vocab]
    ``present.{i}.key|value``     fp32  [1, kv_heads, L, head_dim]  = concat(past, new) on axis 2

``n`` (the input_ids length) and ``L`` (the sequence length) are declared static; a graph whose internal
shapes follow its inputs can be re-declared for another ``n`` (DeepSparse's multi-token prefill) or ``L``.
Projection weights are initializers named after the Hugging Face weight plus ``.T`` (``[in, out]``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from owl_deploy.errors import OwlError, one_line

MODEL_ONNX = "model.onnx"
EXPORT_JSON = "export.json"
EXTERNAL_DATA_FILE = "model.data"
#: key of the JSON metadata_props entry an owl_deploy export carries (spec, sequence lengths, attention)
META_KEY = "owl_deploy"
FIXED_INPUTS = ("input_ids", "attention_mask", "positions", "causal_mask")
#: the projections of a LLaMA-family block, by the last part of their Hugging Face module name
PROJECTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: DeepSparse's rule for the tokens of one multi-token (prefill) call
PREFILL_RULE = "1 or a multiple of 4"


#: tokens per prefill call wherever owl_deploy chooses (bench, eval of a deployment, serve): 128-token calls
#: measured 1.8-3.4x the prompt throughput of 16-token calls on 128/512-token prompts (docs/results.md)
LONG_PREFILL_LENGTH = 128


def valid_prefill_length(n: int) -> bool:
    """True when ``n`` tokens per call is something DeepSparse's multi-token engine accepts."""
    return isinstance(n, int) and (n == 1 or (n > 1 and n % 4 == 0))


def prefill_length_within(n: int, limit: int) -> int:
    """``n`` tokens per call, or the longest valid length up to ``limit`` when ``n`` does not fit (1 at least)."""
    return min(n, limit // 4 * 4) or 1


def weight_kind(name: str) -> str | None:
    """The role of an initializer or module name: a projection kind, ``lm_head``, ``embed``, or None."""
    for kind in (*PROJECTION_KINDS, "lm_head", "embed"):
        if kind in name:
            return kind
    return None


@dataclass(frozen=True)
class GraphSpec:
    """The shapes a decode graph is built for (everything needed to feed it)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    #: attention window of sliding-window layers (0: none); the graph is exact up to this length
    sliding_window: int = 0

    def input_names(self) -> list[str]:
        names = list(FIXED_INPUTS)
        for i in range(self.num_layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names


# ---------------------------------------------------------------- declared shapes
def _set_dims(value_info, dims: list[int | str]) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = int(d)


def set_input_shapes(
    proto, spec: GraphSpec, sequence_length: int, input_ids_length: int | None, batch: int = 1
) -> None:
    """Declare the input shapes (the rewrite DeepSparse's pipeline applies in place).

    ``input_ids_length=None`` leaves ``n`` (and the past length) symbolic, which ONNX Runtime takes.
    """
    n: int | str = "n" if input_ids_length is None else input_ids_length
    past: int | str = "past" if input_ids_length is None else sequence_length - input_ids_length
    shapes: dict[str, list[int | str]] = {
        "input_ids": [batch, n],
        "positions": [batch, n],
        "attention_mask": [batch, sequence_length],
        "causal_mask": [batch, 1, n, sequence_length],
    }
    for inp in proto.graph.input:
        if inp.name.startswith("past_key_values."):
            _set_dims(inp, [batch, spec.num_kv_heads, past, spec.head_dim])
        elif inp.name in shapes:
            _set_dims(inp, shapes[inp.name])
    # intermediate shapes recorded at trace time would contradict a re-declaration
    del proto.graph.value_info[:]


def set_output_shapes(proto, spec: GraphSpec) -> None:
    """Outputs stay symbolic in n and L: they follow whatever the inputs are declared to."""
    for out in proto.graph.output:
        if out.name == "logits":
            _set_dims(out, [1, "input_ids_length", spec.vocab_size])
        else:
            _set_dims(out, [1, spec.num_kv_heads, "sequence_length", spec.head_dim])


def set_batch(proto, batch: int) -> None:
    """Make the graph compute ``batch`` independent sequences: the batch dimension of every output and of
    the ``Reshape`` shapes that carry it (our graphs reshape with a constant batch and one -1, never Shape
    ops, which DeepSparse's internal KV cache cannot compile). Inputs are declared by set_input_shapes."""
    from onnx import numpy_helper

    g = proto.graph
    constants = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    initializers = {i.name: i for i in g.initializer}
    for node in g.node:
        if node.op_type != "Reshape":
            continue
        source = constants.get(node.input[1])
        tensor = source.attribute[0].t if source is not None else initializers.get(node.input[1])
        if tensor is None:
            raise OwlError(f"cannot batch the graph: Reshape {node.name} has a computed shape")
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim != 1 or shape[0] not in (1, batch):
            raise OwlError(f"cannot batch the graph: Reshape {node.name} to {shape.tolist()} has no batch dimension")
        shape[0] = batch
        tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
    for out in g.output:
        dims = out.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch


def last_logits(proto, spec: GraphSpec) -> None:
    """Compute ``logits`` for the last input token only: a ``Slice`` of the lm_head's input to its last position.

    A prompt needs the logits after its last token, and a multi-token call otherwise multiplies every
    position by the ``vocab x hidden`` lm_head (SmolLM2: 3.6 of a 64-token chunk's GFLOP go there). The
    projections before the lm_head work per token (int8 activations use static scales), so the last row is
    the same numbers the full graph computes. ``logits`` becomes ``[batch, 1, vocab]``.
    """
    g = proto.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    weights = {i.name: list(i.dims) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    node, tensor = producer.get("logits"), "logits"
    while node is not None:  # back through the lm_head's rescale/cast ops to its MatMul
        if node.op_type in ("MatMul", "MatMulInteger") and (weights.get(node.input[1]) or [0])[-1] == spec.vocab_size:
            break
        live = [t for t in node.input if t and t not in consts]
        if len(live) != 1:
            node = None
            break
        tensor = live[0]
        node = producer.get(tensor)
    if node is None:
        raise OwlError(f"cannot find the lm_head MatMul behind 'logits' (last input tensor {tensor!r})")
    consumer, x = node, node.input[0]
    quant = producer.get(x)
    if quant is not None and quant.op_type == "QuantizeLinear" and all(t in consts for t in quant.input[1:]):
        consumer, x = quant, quant.input[0]  # static scales: slice before the quantization, same rows
    from onnx import helper, numpy_helper

    names = [f"owl_last_logits.{k}" for k in ("starts", "ends", "axes", "out")]
    for name, value in zip(names[:3], ([-1], [np.iinfo(np.int64).max], [1]), strict=True):
        g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    at = list(g.node).index(consumer)
    g.node.insert(at, helper.make_node("Slice", [x, *names[:3]], [names[3]], name="owl_last_logits.slice"))
    consumer.input[0] = names[3]
    for out in g.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_param")
                dims[1].dim_value = 1


def _declared(value_infos) -> list:
    return [(v.name, [(d.dim_value, d.dim_param) for d in v.type.tensor_type.shape.dim]) for v in value_infos]


# ---------------------------------------------------------------- feeds
def feeds(ids: list[int], num_cached: int, sequence_length: int) -> dict[str, np.ndarray]:
    """The non-cache inputs for ``ids`` after ``num_cached`` cached tokens: right-aligned
    ``attention_mask``, absolute ``positions`` and ``causal_mask`` (``[1, 1, n, sequence_length]``)."""
    n, total = len(ids), sequence_length
    capacity = total - n
    if num_cached > capacity:
        raise OwlError(f"{num_cached} cached + {n} new tokens exceed the sequence length {total}")
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


# ---------------------------------------------------------------- reading a graph
@dataclass
class Contract:
    """What a graph in the contract declares, read from its inputs, outputs and owl_deploy metadata."""

    spec: GraphSpec
    sequence_length: int  # the declared (static) sequence length
    max_sequence_length: int  # the longest one the graph can be re-declared to (RoPE table rows)
    input_ids_length: int | str  # declared n (1 for the decode graph we export)
    past_length: int | str
    kv_dtype: str
    input_names: list[str]
    output_names: list[str]
    meta: dict = field(default_factory=dict)


def _dims(value_info) -> list[int | str]:
    return [
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


def read_contract(proto, path: Path | str) -> Contract:
    """Check that ``proto`` follows the contract (one-line OwlError naming ``path`` when not); read it."""
    import onnx

    initializers = {i.name for i in proto.graph.initializer}
    inputs = {i.name: i for i in proto.graph.input if i.name not in initializers}
    names = list(inputs)
    missing = [n for n in FIXED_INPUTS if n not in inputs]
    past = [n for n in names if n.startswith("past_key_values.")]
    outputs = [o.name for o in proto.graph.output]
    if missing or not past:
        what = ", ".join(missing) if missing else "past_key_values.*"
        raise OwlError(f"{path} does not follow the KV-cache contract: missing input(s) {what}")
    if not outputs or outputs[0] != "logits" or not any(o.startswith("present.") for o in outputs):
        raise OwlError(f"{path} does not follow the KV-cache contract: outputs must be logits, present.*")
    layers = len([n for n in past if n.endswith(".key")])
    expected = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    if sorted(past) != sorted(expected):
        raise OwlError(f"{path} does not follow the KV-cache contract: past_key_values inputs are not 0..{layers - 1}")
    presents = [o for o in outputs if o.startswith("present.")]
    if sorted(presents) != sorted(n.replace("past_key_values", "present") for n in expected):
        raise OwlError(f"{path} does not follow the KV-cache contract: present outputs do not match the past inputs")
    dims = _dims(inputs[past[0]])
    if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
        raise OwlError(f"{path}: past_key_values inputs must be [batch, kv_heads, past, head_dim], got {dims}")
    for name in expected:
        other = _dims(inputs[name])
        if len(other) != 4 or (other[1], other[3]) != (dims[1], dims[3]):
            raise OwlError(f"{path}: wrong shape {other} for {name} (the other caches are {dims})")
    meta: dict = {}
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            with contextlib.suppress(ValueError):
                meta = json.loads(prop.value)
    if meta and (meta.get("num_kv_heads"), meta.get("head_dim")) != (dims[1], dims[3]):
        raise OwlError(
            f"{path}: wrong cache shape {dims}: the export recorded {meta.get('num_kv_heads')} KV heads "
            f"of {meta.get('head_dim')}"
        )
    mask = _dims(inputs["attention_mask"])
    declared = mask[1] if len(mask) == 2 and isinstance(mask[1], int) else 0
    seq_len = int(meta.get("sequence_length") or declared or 0)
    if seq_len <= 1:
        raise OwlError(f"{path}: cannot tell the sequence length (attention_mask has no static length)")
    logits = _dims(proto.graph.output[0])
    vocab = logits[-1] if logits and isinstance(logits[-1], int) else 0
    spec = GraphSpec(
        num_layers=layers,
        num_heads=int(meta.get("num_heads", 0)),
        num_kv_heads=int(dims[1]),
        head_dim=int(dims[3]),
        hidden_size=int(meta.get("hidden_size", 0)),
        vocab_size=int(meta.get("vocab_size", 0) or vocab),
        max_positions=int(meta.get("max_positions", 0)),
        sliding_window=int(meta.get("sliding_window", 0)),
    )
    ids = _dims(inputs["input_ids"])
    return Contract(
        spec=spec,
        sequence_length=seq_len,
        max_sequence_length=int(meta.get("max_sequence_length") or seq_len),
        input_ids_length=ids[1] if len(ids) == 2 else "?",
        past_length=dims[2],
        kv_dtype=onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[inputs[past[0]].type.tensor_type.elem_type].name,
        input_names=names,
        output_names=outputs,
        meta=meta,
    )


def load_graph(path: Path | str):
    """The graph of ``path`` without its external data (weights are read one at a time, when needed)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise OwlError(f"{path} is corrupted: not a readable ONNX model ({one_line(exc)})") from exc
    except Exception as exc:  # protobuf raises several types for garbage
        raise OwlError(f"{path} is corrupted: not a readable ONNX model ({one_line(exc)})") from exc
    if not proto.graph.node:
        raise OwlError(f"{path} is corrupted: the ONNX graph has no nodes")
    return proto


# ---------------------------------------------------------------- weights
def external_info(tensor) -> dict[str, str]:
    """Where an external initializer's bytes live: its ``location`` (and ``offset``, ``length`` when given)."""
    return {e.key: e.value for e in tensor.external_data}


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refusing a name that leaves the folder (absolute, ``..`` or a link out)."""
    path = (folder / name).resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_relative_to(folder.resolve()):
        raise OwlError(f"{folder / MODEL_ONNX} names external data {name!r} outside its folder; refusing to read it")
    return path


def external_data_files(proto, folder: Path) -> list[str]:
    """The external data files the graph's initializers live in; each must exist inside ``folder``."""
    import onnx

    names = sorted(
        {
            external_info(init)["location"]
            for init in proto.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL and "location" in external_info(init)
        }
    )
    for name in names:
        if not _inside(folder, name).is_file():
            raise OwlError(f"{folder / MODEL_ONNX} keeps its weights in {name}, which is missing from {folder}")
    return names


def itemsize(tensor) -> int:
    import onnx

    return np.dtype(onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[tensor.data_type]).itemsize


def tensor_nbytes(tensor) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(math.prod(tensor.dims)) * itemsize(tensor)


def initializer_array(tensor, folder: Path, mmap: bool = False) -> np.ndarray:
    """One initializer as numpy, reading only its own bytes when it lives in external data
    (memory-mapped with ``mmap``: nothing is read until it is used)."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    dtype = np.dtype(onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[tensor.data_type])
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    offset = int(info.get("offset", 0))
    path = _inside(Path(folder), info["location"])
    if mmap:
        if path.stat().st_size < offset + count * dtype.itemsize:
            raise OwlError(f"{tensor.name}: its external data ends early ({path.name} is shorter than it says)")
        arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
    else:
        arr = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if arr.size != count:
            raise OwlError(f"{tensor.name}: its external data ends early ({arr.size} of {count} values in {path.name})")
    return arr.reshape(tuple(tensor.dims))


# ---------------------------------------------------------------- a re-declared copy
def redeclare(
    proto, spec: GraphSpec, sequence_length: int, input_ids_length: int | None, batch: int = 1, last: bool = False
) -> None:
    """In place: the input shapes declared for ``n`` and ``L``, ``batch`` sequences, and (``last``) logits of the
    last token only — what :func:`declared_copy` writes and :func:`serialized` serialises."""
    set_input_shapes(proto, spec, sequence_length, input_ids_length, batch)
    if batch != 1:
        set_batch(proto, batch)
    if last:
        last_logits(proto, spec)


@contextlib.contextmanager
def declared_copy(
    folder: Path,
    proto,
    spec: GraphSpec,
    sequence_length: int,
    input_ids_length: int | None,
    batch: int = 1,
    last: bool = False,
) -> Iterator[Path]:
    """``model.onnx`` of ``folder`` with re-declared input shapes (and ``batch`` sequences; ``last``: logits of
    the last token only, see :func:`last_logits`), in a temporary folder (external data linked, not copied);
    yields the folder's own file when it already declares these."""
    import onnx

    shell = onnx.ModelProto()
    shell.graph.input.extend(proto.graph.input)
    set_input_shapes(shell, spec, sequence_length, input_ids_length, batch)
    if batch == 1 and not last and _declared(shell.graph.input) == _declared(proto.graph.input):
        yield Path(folder) / MODEL_ONNX
        return
    external = external_data_files(proto, Path(folder))
    tmp = Path(tempfile.mkdtemp(prefix="owl-deploy-graph-"))
    try:
        for name in external:
            src = _inside(Path(folder), name)
            try:
                os.link(src, tmp / name)
            except OSError:  # another file system
                (tmp / name).symlink_to(src)
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        redeclare(copy, spec, sequence_length, input_ids_length, batch, last)
        with open(tmp / MODEL_ONNX, "wb") as fh:
            fh.write(copy.SerializeToString())
        del copy
        yield tmp / MODEL_ONNX
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def serialized(
    proto, spec: GraphSpec, sequence_length: int, input_ids_length: int | None, batch: int = 1, last: bool = False
) -> bytes:
    """``proto`` re-declared and serialised (for an engine that loads from memory: ONNX Runtime)."""
    redeclare(proto, spec, sequence_length, input_ids_length, batch, last)
    return proto.SerializeToString()


def describe(proto) -> dict:
    """Names, dtypes and declared shapes of the graph inputs and outputs (the first few of each kind)."""
    import onnx

    def describe_values(values):
        items = list(values)
        shown = items[:6] if len(items) > 8 else items
        desc = {
            v.name: {"dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type), "shape": _dims(v)}
            for v in shown
        }
        if len(items) > len(shown):
            desc["..."] = f"{len(items) - len(shown)} more past_key_values / present tensors"
        return desc

    return {"inputs": describe_values(proto.graph.input), "outputs": describe_values(proto.graph.output)}
