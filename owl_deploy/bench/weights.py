"""What a deployment costs per decoded token: weight counts, zeros, and bytes read (the physical ceiling).

Decode reads every weight once per token, so ``tokens/s <= memory read bandwidth / bytes per token``.
Bytes per token come from the ONNX initializers: weights feeding a MatMul are read whole (dense:
``numel x itemsize``; a sparse kernel with a bitmask: ``nnz x itemsize + numel / 8``, whichever is
smaller), a Gather table one row per token, the KV cache whole (static shapes: attention always
covers the full sequence length).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy.contract import (
    EXPORT_JSON,
    MODEL_ONNX,
    Contract,
    initializer_array,
    itemsize,
    load_graph,
    read_contract,
    weight_kind,
)
from owl_deploy.errors import OwlError

WEIGHT_OPS = {"MatMul": 1, "MatMulInteger": 1, "Gemm": 1, "Conv": 1}  # op -> index of its weight input


@dataclass
class ModelInfo:
    """One deployment folder as the benchmark sees it: its contract, export.json, weights and bytes."""

    label: str
    folder: Path
    onnx_path: Path
    contract: Contract
    export: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    bytes_per_token: dict[str, int] = field(default_factory=dict)

    @property
    def sequence_length(self) -> int:
        return self.contract.sequence_length

    @property
    def vocab_size(self) -> int | None:
        return self.contract.spec.vocab_size or self.weights.get("vocab_size")

    def describe(self) -> dict[str, Any]:
        spec = self.contract.spec
        return {
            "path": str(self.folder),
            "onnx_bytes": self.onnx_path.stat().st_size,
            "sequence_length": self.sequence_length,
            "num_layers": spec.num_layers,
            "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "vocab_size": self.vocab_size,
            "export": self.export,
            "weights": self.weights,
            "bytes_per_token": self.bytes_per_token,
        }


def load_model_info(folder: Path | str, label: str, with_weights: bool = True) -> ModelInfo:
    """Check that ``folder`` holds a single-token decode graph in the contract; read its weight statistics."""
    folder = Path(folder)
    if not folder.exists():
        raise OwlError(f"model {label!r}: {folder}: no such folder")
    if folder.is_file() and folder.suffix == ".onnx":
        onnx_path, folder = folder, folder.parent
    elif folder.is_dir():
        onnx_path = folder / MODEL_ONNX
    else:
        raise OwlError(f"model {label!r}: {folder}: not a deployment folder (expected a folder with {MODEL_ONNX})")
    if not onnx_path.is_file():
        raise OwlError(
            f"model {label!r}: {folder}: not a deployment folder (no {MODEL_ONNX}; run `owl-deploy export` first)"
        )
    export: dict[str, Any] = {}
    ej = folder / EXPORT_JSON
    if ej.is_file():
        try:
            raw = json.loads(ej.read_text())
        except (OSError, ValueError) as exc:
            raise OwlError(f"model {label!r}: {ej}: unreadable ({exc})") from exc
        if isinstance(raw, dict):
            export = {k: v for k, v in raw.items() if isinstance(v, str | int | float | bool) or v is None}
    try:
        proto = load_graph(onnx_path)
        contract = read_contract(proto, onnx_path)
    except OwlError as exc:
        raise OwlError(f"model {label!r}: {exc}") from None
    if contract.input_ids_length != 1:
        raise OwlError(
            f"model {label!r}: {onnx_path}: expected a single-token decode graph (input_ids length 1), "
            f"got {contract.input_ids_length}"
        )
    if contract.past_length != contract.sequence_length - 1:
        raise OwlError(
            f"model {label!r}: {onnx_path}: the graph needs static shapes: past length {contract.past_length} != "
            f"sequence length {contract.sequence_length} - 1"
        )
    if "sequence_length" in export and int(export["sequence_length"]) != contract.sequence_length:
        raise OwlError(
            f"model {label!r}: export.json says sequence length {export['sequence_length']}, "
            f"model.onnx {contract.sequence_length}"
        )
    info = ModelInfo(label=label, folder=folder, onnx_path=onnx_path, contract=contract, export=export)
    if with_weights:
        info.weights, info.bytes_per_token = weight_statistics(proto, onnx_path.parent, contract)
    del proto
    return info


def weight_statistics(proto, base_dir: Path, contract: Contract) -> tuple[dict[str, Any], dict[str, int]]:
    """Count weights and nonzeros in the initializers; bytes read per decode token under two encodings
    (:func:`initializer_statistics`), plus the KV cache, read whole: attention covers the full static
    sequence length.
    """
    weights, dense_b, bitmask_b = initializer_statistics(proto, base_dir)
    spec = contract.spec
    kv_itemsize = np.dtype(contract.kv_dtype).itemsize
    kv = 2 * spec.num_layers * spec.num_kv_heads * contract.sequence_length * spec.head_dim * kv_itemsize
    return weights, bytes_per_token(dense_b, bitmask_b, kv)


def bytes_per_token(weights_dense: int, weights_bitmask: int, kv_cache: int) -> dict[str, int]:
    """The bytes-per-token record of results.json from the weight bytes (two encodings) and the KV cache."""
    return {
        "weights_dense": int(weights_dense),
        "weights_bitmask": int(weights_bitmask),
        "kv_cache": int(kv_cache),
        "dense": int(weights_dense + kv_cache),
        "bitmask": int(weights_bitmask + kv_cache),
    }


def initializer_statistics(proto, base_dir: Path) -> tuple[dict[str, Any], int, int]:
    """Weights, nonzeros and the weight bytes read per decode token of any ONNX graph: (statistics,
    dense bytes, bitmask bytes).

    A MatMul/Gemm weight is read whole every token: ``dense`` = numel x itemsize; ``bitmask`` = nnz x
    itemsize + numel/8 (values plus a one-bit-per-weight mask; a kernel would keep the dense layout
    where that is smaller).  For MatMulInteger a "zero" is the weight's zero point.  A table only
    gathered from (the embedding) costs one row per token; other initializers are read whole.
    """
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in proto.graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))
    inits = {t.name: t for t in proto.graph.initializer}
    dense_b = bitmask_b = 0
    numel_all = nnz_all = 0
    numel_prunable = nnz_prunable = 0
    lm_head = {"numel": 0, "nnz": 0}
    per_role: dict[str, dict[str, int]] = {}
    n_weights = 0
    vocab = None
    for name, t in inits.items():
        uses = consumers.get(name, [])
        size = itemsize(t)
        numel = int(np.prod(t.dims)) if t.dims else 1
        weight_use = [(n, i) for n, i in uses if WEIGHT_OPS.get(n.op_type) == i]
        gather_use = [(n, i) for n, i in uses if n.op_type == "Gather" and i == 0]
        if len(gather_use) != len(uses):  # also read another way (a tied lm_head through Transpose): whole
            gather_use = []
        if weight_use and numel > 1:
            arr = initializer_array(t, base_dir, mmap=True)
            zero = 0
            node = weight_use[0][0]
            if node.op_type == "MatMulInteger" and len(node.input) > 3 and node.input[3] in inits:
                zp = initializer_array(inits[node.input[3]], base_dir)
                zero = int(zp.reshape(-1)[0]) if zp.size else 0
            nnz = int(np.count_nonzero(arr != zero)) if zero else int(np.count_nonzero(arr))
            del arr
            dense = numel * size
            dense_b += dense
            bitmask_b += min(dense, nnz * size + math.ceil(numel / 8))
            numel_all += numel
            nnz_all += nnz
            n_weights += 1
            is_head = "logits" in node.output or weight_kind(name) == "lm_head"
            if is_head:
                lm_head["numel"] += numel
                lm_head["nnz"] += nnz
                vocab = int(t.dims[-1]) if t.dims else None
            else:
                numel_prunable += numel
                nnz_prunable += nnz
            role = weight_kind(name) or ("lm_head" if is_head else "other")
            agg = per_role.setdefault(role, {"numel": 0, "nnz": 0})
            agg["numel"] += numel
            agg["nnz"] += nnz
        elif gather_use and len(t.dims) >= 2:
            row = int(np.prod(t.dims[1:])) * size
            dense_b += row
            bitmask_b += row
        else:
            nbytes = numel * size
            dense_b += nbytes
            bitmask_b += nbytes

    def _sp(numel: int, nnz: int) -> float | None:
        return None if numel == 0 else 1.0 - nnz / numel

    weights = {
        "matmul_weights": n_weights,
        "numel": numel_all,
        "nnz": nnz_all,
        "sparsity": _sp(numel_all, nnz_all),
        "sparsity_excluding_lm_head": _sp(numel_prunable, nnz_prunable),
        "lm_head_sparsity": _sp(lm_head["numel"], lm_head["nnz"]),
        "sparsity_by_role": {r: _sp(v["numel"], v["nnz"]) for r, v in sorted(per_role.items())},
        "vocab_size": vocab,
    }
    return weights, int(dense_b), int(bitmask_b)
