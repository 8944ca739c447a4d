"""Proof that an export is faithful: zeros survive, the engine sees the sparsity, logits match torch.

* :func:`zeros_report` counts the exact zeros of every pruned linear in torch and in its ONNX
  initializer (read straight from the file, external data included).
* :func:`engine_sparsity` compiles the single-token graph in DeepSparse's debug-analysis mode (as
  ``deepsparse.debug_analysis`` does, internal KV cache on) and records, per projection, the kernel
  DeepSparse chose and the weight sparsity it detected (e.g. ``ks_gevm_be`` at 69.9 %).
* :func:`engine_prompt_logits` runs real prompts through a compiled session (ONNX Runtime or DeepSparse:
  the multi-token prefill graph and the single-token decode graph with its KV cache);
  :func:`compare_logits` compares every position with the torch model (:func:`torch_logits`), or, for
  int8, :func:`int8_engine_check` compares the engines with each other; :func:`torch_greedy` gives the
  reference greedy continuation.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from owl_deploy.contract import initializer_array

#: Real prompts for the logits check; the long one exercises the multi-token prefill graph.
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter "
    "who had three sons. The youngest",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
)
#: max |logits(engine) - logits(torch)| accepted by the export check
LOGITS_TOLERANCE = 1e-3
#: int8: max |logits(DeepSparse) - logits(ONNX Runtime)| of the decode graph on the same int8 graph.
#: Integer products are exact in both, but an fp32 difference of 1 ulp before a QuantizeLinear can flip
#: one rounding.  (DeepSparse's *sparse* int8 multi-token kernels are not exact: recorded, not checked.)
INT8_ENGINE_TOLERANCE = 5e-2
#: ... or, failing that, the share of positions whose argmax agrees.  DeepSparse's *sparse* int8 kernels are
#: not bit-exact with ONNX Runtime (a few positions differ by about a logit; docs/results.md, "int8"), while its dense
#: int8 ones are.
INT8_ENGINE_MIN_ARGMAX_AGREEMENT = 0.9
#: ... or, failing both, the engine is within the quantization error: its distance to the first engine is at
#: most this share of the first engine's distance to fp32 torch, and it agrees with fp32 torch's argmax at
#: least as often as the first engine does (the case of a 70% 1.5B model; docs/results.md, "Qwen2.5-Coder-1.5B").
INT8_ENGINE_MAX_SHARE_OF_QUANT_ERROR = 0.5


# ---------------------------------------------------------------- zeros
def zeros_report(model: nn.Module, onnx_file: Path, weights: dict[str, str]) -> dict:
    """Exact zeros per pruned linear: torch weight vs ONNX initializer (``weights``: HF name → ONNX name).

    Preserved = every zero of the torch weight is a stored zero at the same position (0.0 in fp32, the
    zero point 128 in int8) and, in fp32, no other entry is.
    """
    import onnx

    from owl_deploy.model import named_block_linears

    proto = onnx.load(str(onnx_file), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    tensors = {}
    for module_name, linear in named_block_linears(model).items():
        hf = f"{module_name}.weight"
        w = linear.weight.detach()
        torch_zeros = int((w == 0).sum())
        onnx_name = weights.get(hf)
        entry = {
            "onnx_name": onnx_name,
            "shape": list(w.shape),
            "numel": int(w.numel()),
            "torch_zeros": torch_zeros,
            "onnx_zeros": None,
            "sparsity": round(torch_zeros / max(1, w.numel()), 6),
        }
        entry["preserved"] = False
        if onnx_name in inits:
            arr = initializer_array(inits[onnx_name], onnx_file.parent)
            stored_zero = _stored_zero(arr)
            entry["onnx_dtype"] = str(arr.dtype)
            entry["onnx_zeros"] = int(np.count_nonzero(stored_zero))
            entry["onnx_shape"] = list(arr.shape)
            torch_zero = (w == 0).numpy()
            if stored_zero.shape == torch_zero.shape[::-1]:  # MatMul layout [in, out] = W.T
                torch_zero = torch_zero.T
            kept = stored_zero.shape == torch_zero.shape and bool(np.all(stored_zero[torch_zero]))
            # fp32 must match exactly; int8 may round further small weights to zero (counted, not hidden)
            entry["extra_zeros"] = entry["onnx_zeros"] - torch_zeros if kept else None
            entry["preserved"] = kept and (arr.dtype == np.uint8 or entry["extra_zeros"] == 0)
        tensors[hf] = entry
    total_torch = sum(t["torch_zeros"] for t in tensors.values())
    total_onnx = sum(t["onnx_zeros"] or 0 for t in tensors.values())
    numel = sum(t["numel"] for t in tensors.values())
    return {
        "zeros_preserved": bool(tensors) and all(t["preserved"] for t in tensors.values()),
        "num_tensors": len(tensors),
        "total_torch_zeros": total_torch,
        "total_onnx_zeros": total_onnx,
        "extra_onnx_zeros": sum(t.get("extra_zeros") or 0 for t in tensors.values()),
        "overall_sparsity": round(total_torch / max(1, numel), 6),
        "tensors": tensors,
    }


def _stored_zero(arr: np.ndarray) -> np.ndarray:
    """Where a stored weight means 0: 0 for float, the zero point 128 for our uint8 int8 weights."""
    from owl_deploy.export.int8 import ZERO_POINT

    return arr == (ZERO_POINT if arr.dtype == np.uint8 else 0)


# ---------------------------------------------------------------- engine sparsity
_KERNEL = re.compile(r"^(?P<kernel>.+?)(?:-(?P<pct>[\d.]+)%)?_(?P<idx>\d+)$")


def engine_sparsity(folder: Path, sequence_length: int, threads: int | None = None) -> dict:
    """Kernel and detected weight sparsity per projection, from DeepSparse's debug analysis of the
    single-token graph with its internal KV cache (as ``deepsparse.debug_analysis`` runs it)."""
    from deepsparse.utils.onnx import generate_random_inputs

    from owl_deploy import contract
    from owl_deploy.analysis import analysis_layers, deepsparse_analysis
    from owl_deploy.runtime import open_deployment, quiet_stdout

    dep = open_deployment(folder)
    proto = dep.proto
    weight_of = _matmul_weights(proto)
    start = time.perf_counter()
    with contract.declared_copy(dep.folder, proto, dep.spec, sequence_length, 1) as path:
        with quiet_stdout():
            inputs = generate_random_inputs(str(path), 1)
        result = deepsparse_analysis(path, inputs, threads, internal_cache=True)
    seconds = time.perf_counter() - start
    layers = {}
    for li in analysis_layers(result):
        weight = weight_of.get(li.get("canonical_name", ""))
        if weight is None:
            continue
        m = _KERNEL.match(li.get("name", ""))
        layers[weight] = {
            "kernel": m.group("kernel") if m else li.get("name"),
            "engine_layer": li.get("name"),
            "detected_sparsity": round(float(li.get("kernel_sparsity", 0.0)), 4),
        }
    sparse = [v for v in layers.values() if v["kernel"].startswith("ks_")]
    return {
        "source": "deepsparse DebugAnalysisEngine (as deepsparse.debug_analysis), input_ids_length 1",
        "sequence_length": sequence_length,
        "compile_seconds": round(seconds, 2),
        "num_layers_reported": len(layers),
        "num_sparse_kernels": len(sparse),
        "mean_detected_sparsity": round(float(np.mean([v["detected_sparsity"] for v in layers.values()])), 4)
        if layers
        else None,
        "layers": layers,
    }


def _matmul_weights(proto) -> dict[str, str]:
    """ONNX node output name → name of the weight initializer the MatMul multiplies by."""
    inits = {i.name for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(node.input) > 1 and node.input[1] in inits:
            name = node.input[1]
            out[node.output[0]] = name[: -len(".T")] if name.endswith(".T") else name
    return out


# ---------------------------------------------------------------- logits and greedy tokens
@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run torch with ``n`` intra-op threads (None: unchanged).

    On a shared 2-core machine, two OpenMP threads that wait for each other at every op collapse
    (seconds per token) as soon as another process holds a core; one thread does not.
    """
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_logits(model: nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def torch_greedy(model: nn.Module, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from torch with its own KV cache (no stop at end-of-sequence)."""
    import inspect

    # transformers 5.24 renamed past_key_values to cache (the old name still works, with a warning)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            past = getattr(res, "cache", None) or res.past_key_values
            res = model(torch.tensor([[token]]), use_cache=True, **{name: past})
    return out


def engine_prompt_logits(session, prompts: list[list[int]], decode_only: bool = False) -> list[np.ndarray]:
    """Every position's logits for each prompt, fed in two calls (all but the last 3 tokens, then those 3)
    from an empty cache, so the multi-token prefill graph (for a prefix of ≥ prefill_length tokens) and
    the single-token decode graph with a filled KV cache are both exercised; ``decode_only``: one token
    per call (the decode graph alone)."""
    out = []
    for ids in prompts:
        session.reset()
        if decode_only:
            out.append(np.stack([session.step(t) for t in ids]))
            continue
        cut = max(1, len(ids) - 3)
        got = session.forward(ids[:cut])
        if cut < len(ids):
            got = np.concatenate([got, session.forward(ids[cut:])])
        out.append(got)
    return out


def compare_logits(got: list[np.ndarray], refs: list[np.ndarray], tolerance: float = LOGITS_TOLERANCE) -> dict:
    """max |got - ref| over every position of every prompt, and how often the argmax agrees."""
    diffs = [float(np.abs(g - r).max()) for g, r in zip(got, refs, strict=True)]
    same = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, refs, strict=True))
    total = sum(len(r) for r in refs)
    return {
        "max_abs_diff": max(diffs),
        "per_prompt": diffs,
        "argmax_agreement": f"{same}/{total}",
        "argmax_agreement_fraction": same / total if total else 1.0,
        "tolerance": tolerance,
        "ok": max(diffs) <= tolerance,
    }


def int8_engine_check(
    got: list[np.ndarray],
    decode: list[np.ndarray],
    torch_refs: list[np.ndarray],
    first: tuple[list[np.ndarray], list[np.ndarray]] | None,
) -> dict:
    """One engine's check of an int8 export; ``first`` = (prompt logits, decode-only logits) of the first engine.

    The distance to the fp32 torch model is the quantization error: recorded, never a failure.  The check is
    the single-token decode graph (what is deployed and benchmarked) against the first engine on the same
    int8 graph; the multi-token (prefill) difference is recorded beside it.
    """
    res = {"vs_torch_fp32": compare_logits(got, torch_refs), "ok": True}
    if first is None:
        return res | {"reference": True}
    res |= compare_logits(decode, first[1], INT8_ENGINE_TOLERANCE)
    quant = compare_logits(first[0], torch_refs)  # the first engine's own distance to fp32: the int8 error
    res["first_engine_vs_torch_fp32"] = quant
    if not res["ok"] and res["argmax_agreement_fraction"] >= INT8_ENGINE_MIN_ARGMAX_AGREEMENT:
        res["ok"], res["accepted_by"] = True, "argmax_agreement"
    elif (
        not res["ok"]
        and res["max_abs_diff"] <= INT8_ENGINE_MAX_SHARE_OF_QUANT_ERROR * quant["max_abs_diff"]
        and res["vs_torch_fp32"]["argmax_agreement_fraction"] >= quant["argmax_agreement_fraction"]
    ):
        res["ok"], res["accepted_by"] = True, "within_quantization_error"
    res["with_prefill"] = compare_logits(got, first[0], INT8_ENGINE_TOLERANCE)
    return res
