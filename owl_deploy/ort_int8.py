"""ONNX Runtime's fast form of our int8 graphs: the same integers, with signed weights.

The int8 export stores weights as uint8 with zero point 128 (``export/int8.py``: the pattern DeepSparse's
sparse int8 kernels run). ONNX Runtime's MLAS runs that uint8 x uint8 product with widening kernels; given
int8 weights with zero point 0 it takes its uint8 x int8 kernels, which on CPUs with VNNI (``vpdpbusd``)
are faster and exact: ``(x - 128)(w_u8 - 128) == (x - 128) w_s8`` with ``w_s8 = w_u8 - 128``, summed in
int32 either way. Measured on SmolLM2-135M 70% int8, Xeon with AVX512-VNNI, 2 threads: a 128-token prefill
0.24 -> 0.13 s, a batch-16 decode step 81-86 -> 69-74 ms, logits and caches bit-identical. Without VNNI
(AVX2, AVX-512 without VNNI) MLAS's uint8 x int8 kernels sum pairs of products in saturating int16
(``vpmaddubsw``) and can round, so the rewrite is left off there. The deployment's own files never change
(DeepSparse keeps the uint8 pattern): inline weights are re-signed in ONNX Runtime's copy of the graph in memory,
and weights stored outside the graph (a graph past the export's 1.8 GB threshold, such as Qwen2.5-Coder-1.5B int8)
are read from a re-signed companion file written once beside them (:func:`companion`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from owl_deploy.errors import OwlError

#: ``1`` forces the rewrite, ``0`` turns it off; unset: on where the CPU has VNNI
ENV = "OWL_ORT_SIGNED_INT8"
#: the CPU flags with an exact uint8 x int8 dot product (AMX CPUs have AVX512-VNNI too)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
SIGNED_ZERO_POINT = "owl_ort_int8.zero_point"
#: the re-signed copy of a deployment's external int8 weights, and what it was made from
COMPANION = "model.ort-s8.data"
COMPANION_INDEX = "model.ort-s8.json"
#: companion offsets are aligned so ONNX Runtime can map each weight from the file
ALIGN = 65536

log = logging.getLogger("owl_deploy.ort_int8")


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


def sign_weights(proto, folder: Path | str | None = None) -> int:
    """Rewrite ``proto`` in place: every MatMulInteger weight that is a uint8 initializer with an inline zero
    point of 128, used nowhere else, becomes int8 with zero point 0. Returns how many weights changed.

    Weights held as external data are re-signed only given the deployment ``folder``: they are then read from
    the companion file there (written on first use, :func:`companion`); without it, or where it cannot be
    written, they stay uint8. Left alone too (still correct, just the slower kernel): zero points other than
    128 and initializers some other node also reads.
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
        if t is None or t.data_type != TensorProto.UINT8:
            return False
        if t.data_location == TensorProto.EXTERNAL and folder is None:
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
    outside = [inits[w] for w in changed if inits[w].data_location == TensorProto.EXTERNAL]
    placed = companion(Path(folder), outside) if outside else {}
    if placed is None:  # no companion here: the external weights keep the slower kernel
        changed = [w for w in changed if inits[w].data_location != TensorProto.EXTERNAL]
        placed = {}
    for name in changed:
        tensor = inits[name]
        if name in placed:
            tensor.data_type = TensorProto.INT8
            offset, length = placed[name]
            del tensor.external_data[:]
            for key, value in (("location", COMPANION), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        else:
            tensor.CopyFrom(numpy_helper.from_array(signed(numpy_helper.to_array(tensor)), name))
        for node, _ in readers[name]:
            node.input[3] = SIGNED_ZERO_POINT
    if changed and SIGNED_ZERO_POINT not in inits:
        graph.initializer.append(helper.make_tensor(SIGNED_ZERO_POINT, TensorProto.INT8, [], [0]))
    return len(changed)


def companion(folder: Path, tensors: list) -> dict[str, tuple[int, int]] | None:
    """Where each of ``tensors`` (external uint8 weights of the deployment in ``folder``) sits, re-signed, in
    ``folder/COMPANION``: {name: (offset, length)}. Written once (``COMPANION_INDEX`` records the source files'
    size and mtime, so a re-export rebuilds it); ``None`` where it cannot be written (a read-only folder, a full
    disk), after one warning. Two processes opening the folder at once write it once (the second waits on a lock
    on the folder, then reads the first's). Re-signing in memory instead would keep a second copy of the weights in the
    process (measured on Qwen2.5-Coder-1.5B int8: 5.0 GB against 2.0); a file costs their size on disk once.
    """
    from owl_deploy import contract
    from owl_deploy.io import atomic_file, waiting, write_json

    folder = Path(folder)
    layout = []  # (tensor, where its uint8 bytes are, where its re-signed bytes go)
    end = 0
    for t in sorted(tensors, key=lambda t: t.name):
        at = -(-end // ALIGN) * ALIGN
        layout.append((t, contract.external_info(t), at))
        end = at + contract.tensor_nbytes(t)
    try:
        stats = {info["location"]: (folder / info["location"]).stat() for _, info, _ in layout}
    except OSError:
        return None
    key = {
        "sources": {loc: [st.st_size, st.st_mtime_ns] for loc, st in sorted(stats.items())},
        "weights": [[t.name, info["location"], info.get("offset", "0"), at] for t, info, at in layout],
    }
    placed = {t.name: (at, contract.tensor_nbytes(t)) for t, _, at in layout}
    index, data = folder / COMPANION_INDEX, folder / COMPANION

    def current() -> bool:
        try:
            return json.loads(index.read_text()) == key and data.stat().st_size >= end
        except (OSError, ValueError):
            return False

    if current():
        return placed
    try:  # one writer per folder: a second process waits for the first's file instead of writing its own
        with waiting(folder, lambda: log.info("waiting for another process writing %s in %s", COMPANION, folder)):
            if current():
                return placed
            with atomic_file(data, "wb") as out:
                for t, _, at in layout:
                    out.seek(at)
                    out.write(signed(contract.initializer_array(t, folder)).tobytes())
            write_json(index, key)
    except OSError as exc:
        log.warning("ONNX Runtime keeps the uint8 int8 weights of %s (cannot write %s: %s)", folder, COMPANION, exc)
        return None
    return placed


def describe() -> str:
    """What reports record of the rule on this machine (each session's count: ``Session.signed_weights``)."""
    if not enabled():
        return "uint8 (as exported)"
    return f"re-signed to int8 (inline weights in memory, external ones from {COMPANION})"
