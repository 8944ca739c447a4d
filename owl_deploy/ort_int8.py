"""ONNX Runtime's fast form of our int8 graphs: the same integers, with signed weights.

The int8 export stores weights as uint8 with zero point 128 (``export/int8.py``: the pattern DeepSparse's
sparse int8 kernels run). ONNX Runtime's MLAS runs that uint8 x uint8 product with widening kernels; given
int8 weights with zero point 0 it takes its uint8 x int8 kernels, which on CPUs with VNNI (``vpdpbusd``)
are faster and exact: ``(x - 128)(w_u8 - 128) == (x - 128) w_s8`` with ``w_s8 = w_u8 - 128``, summed in
int32 either way. Measured on SmolLM2-135M 70% int8, Xeon with AVX512-VNNI, 2 threads: a 128-token prefill
0.24 -> 0.13 s, a batch-16 decode step 81-86 -> 69-74 ms, logits and caches bit-identical. Without VNNI
(AVX2, AVX-512 without VNNI) MLAS's uint8 x int8 kernels sum pairs of products in saturating int16
(``vpmaddubsw``) and can round, so the rewrite is left off there (and on weights stored outside the graph,
see :func:`sign_weights`). The deployment on disk never changes:
ONNX Runtime's sessions are rewritten in memory (DeepSparse keeps the uint8 pattern).
"""

from __future__ import annotations

import os

import numpy as np

from owl_deploy.errors import OwlError

#: ``1`` forces the rewrite, ``0`` turns it off; unset: on where the CPU has VNNI
ENV = "OWL_ORT_SIGNED_INT8"
#: the CPU flags with an exact uint8 x int8 dot product (AMX CPUs have AVX512-VNNI too)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
SIGNED_ZERO_POINT = "owl_ort_int8.zero_point"


def signed(q: np.ndarray) -> np.ndarray:
    """uint8 with zero point 128 -> int8 with zero point 0 (the same integers)."""
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise OwlError(f"signed() expects uint8 weights, got {q.dtype}")
    return (q ^ np.uint8(0x80)).view(np.int8)  # flipping the top bit is q - 128 in two's complement


def enabled(flags: set[str] | None = None, env: dict | None = None) -> bool:
    """Whether ONNX Runtime sessions take signed weights: ``OWL_ORT_SIGNED_INT8`` when set, else VNNI."""
    env = os.environ if env is None else env
    value = env.get(ENV)
    if value is not None and value.strip() != "":
        if value.strip() not in ("0", "1"):
            raise OwlError(f"{ENV} must be 0 or 1 (got {value!r})")
        return value.strip() == "1"
    if flags is None:
        from owl_deploy.versions import cpu_info

        flags = cpu_info()["flags"]
    return any(f in flags for f in VNNI_FLAGS)


def _uint8_128(tensor) -> bool:
    """Whether ``tensor`` is an inline scalar uint8 zero point of 128."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_type != TensorProto.UINT8 or tensor.data_location == TensorProto.EXTERNAL:
        return False
    return int(np.prod(tensor.dims)) == 1 and int(numpy_helper.to_array(tensor).reshape(-1)[0]) == 128


def sign_weights(proto) -> int:
    """Rewrite ``proto`` in place: every MatMulInteger weight that is an inline uint8 initializer with zero
    point 128, used nowhere else, becomes int8 with zero point 0. Returns how many weights changed.

    Left alone (still correct, just the slower kernel): zero points other than 128, initializers some other
    node also reads, and weights held as external data (a graph past the export's 1.8 GB threshold, such as
    Qwen2.5-Coder-1.5B int8). Those would gain most (its 128-token prefill 1.79-1.97 -> 0.61-0.94 s, measured,
    bit-identical), but re-signed copies cost memory: kept inline, the session peaked at 8.2-9.2 GB against 4.2
    (perplexity scoring); handed to ONNX Runtime as shared initializers, 5.0 GB against 2.0 and 6 s more setup.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))

    def convertible(name: str) -> bool:
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.UINT8 or t.data_location == TensorProto.EXTERNAL:
            return False
        for node, i in readers[name]:
            if node.op_type != "MatMulInteger" or i != 1 or len(node.input) < 4:
                return False
            zp = inits.get(node.input[3])
            if zp is None or not _uint8_128(zp):
                return False
        return True

    weights = sorted({n.input[1] for n in graph.node if n.op_type == "MatMulInteger" and len(n.input) >= 4})
    changed = [w for w in weights if convertible(w)]
    for name in changed:
        tensor = inits[name]
        tensor.CopyFrom(numpy_helper.from_array(signed(numpy_helper.to_array(tensor)), name))
        for node, _ in readers[name]:
            node.input[3] = SIGNED_ZERO_POINT
    if changed and SIGNED_ZERO_POINT not in inits:
        graph.initializer.append(helper.make_tensor(SIGNED_ZERO_POINT, TensorProto.INT8, [], [0]))
    return len(changed)


def describe() -> str:
    """What reports record of the rule on this machine (each session's count: ``Session.signed_weights``)."""
    return "re-signed to int8 in memory where the graph holds them" if enabled() else "uint8 (as exported)"
