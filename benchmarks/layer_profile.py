"""Where a decode step's time goes, layer by layer, in DeepSparse and ONNX Runtime (used by sweep.py).

Layers are grouped by the weight they read (q/k/v/o/gate/up/down/lm_head), attention, and the rest
(shuffles, norms, element-wise), and by kernel kind (``ks_gevm_be`` = a sparse kernel, ``gemm`` ...)
with the kernel sparsity DeepSparse detected.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy import contract
from owl_deploy.analysis import analysis_layers, deepsparse_analysis
from owl_deploy.bench.weights import WEIGHT_OPS, ModelInfo
from owl_deploy.contract import weight_kind


def decode_feed(info: ModelInfo, context: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one decode step with ``context`` cached tokens (random cache values)."""
    rng = np.random.default_rng(seed)
    c = info.contract
    feed = contract.feeds([1], context, c.sequence_length)
    shape = (1, c.spec.num_kv_heads, c.sequence_length - 1, c.spec.head_dim)
    for name in c.input_names:
        if name.startswith("past_key_values."):
            feed[name] = (rng.standard_normal(shape) * 0.5).astype(c.kv_dtype)
    return feed


def _node_roles(info: ModelInfo) -> tuple[dict[str, str], dict[str, str]]:
    """ONNX output name -> role, node name -> role (role of the weight a node reads, else attention/other)."""
    import onnx

    proto = onnx.load(str(info.onnx_path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    by_output, by_node = {}, {}
    for node in proto.graph.node:
        role = None
        widx = WEIGHT_OPS.get(node.op_type)
        if widx is not None and len(node.input) > widx and node.input[widx] in inits:
            role = weight_kind(node.input[widx]) or ("lm_head" if "logits" in node.output else "matmul_weights")
        elif node.op_type == "Gather" and node.input and node.input[0] in inits:
            role = weight_kind(node.input[0]) or "gather"
        elif node.op_type in ("MatMul", "Softmax"):
            role = "attention"
        if role is None:
            role = "other"
        for o in node.output:
            by_output[o] = role
        by_node[node.name] = role
    return by_output, by_node


def deepsparse_layer_breakdown(
    info: ModelInfo, context: int, threads: int | None = None, iterations: int = 20, warmup: int = 5
) -> dict[str, Any]:
    """Per-layer DeepSparse time of one decode step (``DebugAnalysisEngine.analyze``, as debug_analysis).

    Layers are grouped by the weight they read (q/k/v/o/gate/up/down/lm_head), attention, other
    (shuffles, norms, element-wise), and by kernel kind (``ks_gevm_be`` = sparse kernel, ``gemm`` ...)
    with the kernel sparsity DeepSparse detected.
    """
    feed = decode_feed(info, context)
    by_output, _ = _node_roles(info)
    names = info.contract.input_names
    result = deepsparse_analysis(info.onnx_path, [feed[n] for n in names], threads, iterations, warmup)
    layers = []

    def visit(li):
        if "average_run_time_in_ms" not in li:
            return
        name = li["name"]
        kind = re.sub(r"-[0-9.]+%", "", name.rsplit("_", 1)[0]) if not name.startswith("Naive") else "naive subgraph"
        outs = [o.strip() for o in (li.get("canonical_name") or "").split(",") if o.strip() and o != "<none>"]
        roles = [by_output[o] for o in outs if o in by_output]
        weighted = [r for r in roles if r not in ("attention", "other")]
        role = weighted[0] if weighted else (roles[0] if roles else "other")
        layers.append(
            {
                "name": name,
                "kernel": kind,
                "role": role,
                "ms": float(li["average_run_time_in_ms"]),
                "kernel_sparsity": float(li.get("kernel_sparsity", 0.0)),
            }
        )

    for li in analysis_layers(result):
        if not li.get("sub_layer_info"):
            visit(li)
    return _group_layers(layers, engine="deepsparse", engine_total_ms=float(result.get("average_total_time", 0.0)))


def ort_layer_breakdown(info: ModelInfo, context: int, threads: int | None = None, iterations: int = 20) -> dict:
    """Per-node ONNX Runtime time of one decode step, from its profiler, grouped like DeepSparse's."""
    import onnxruntime as ort
    import psutil

    feed = decode_feed(info, context)
    _, by_node = _node_roles(info)
    with tempfile.TemporaryDirectory(prefix="owl-ortprof-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or psutil.cpu_count(logical=False) or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess0 = ort.InferenceSession(str(info.onnx_path), opts, providers=["CPUExecutionProvider"])
        for _ in range(5):
            sess0.run(None, feed)
        del sess0
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(info.onnx_path), opts, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(iterations):
            sess.run(None, feed)
        wall_ms = (time.perf_counter() - t0) * 1e3 / iterations
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        rec = per_node.setdefault(node, {"us": 0.0, "count": 0, "op": ev.get("args", {}).get("op_name", "?")})
        rec["us"] += float(ev.get("dur", 0))
        rec["count"] += 1
    runs = 3 + iterations
    layers = []
    for node, rec in per_node.items():
        # fused nodes keep their first member's name; fall back to the op type
        role = by_node.get(node) or by_node.get(node.split("_token_")[0]) or "other"
        layers.append({"name": node, "kernel": rec["op"], "role": role, "ms": rec["us"] / 1e3 / runs})
    return _group_layers(layers, engine="onnxruntime", engine_total_ms=wall_ms)


def _group_layers(layers: list[dict[str, Any]], engine: str, engine_total_ms: float) -> dict[str, Any]:
    by_role: dict[str, float] = {}
    by_kernel: dict[str, float] = {}
    sparsity: dict[str, list[float]] = {}
    for layer in layers:
        by_role[layer["role"]] = by_role.get(layer["role"], 0.0) + layer["ms"]
        by_kernel[layer["kernel"]] = by_kernel.get(layer["kernel"], 0.0) + layer["ms"]
        if "kernel_sparsity" in layer and layer["role"] not in ("attention", "other"):
            sparsity.setdefault(layer["role"], []).append(layer["kernel_sparsity"])
    total = sum(by_role.values())
    out = {
        "engine": engine,
        "summed_layer_ms": round(total, 4),
        "engine_total_ms": round(engine_total_ms, 4),
        "by_role_ms": {k: round(v, 4) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
        "by_kernel_ms": {k: round(v, 4) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])},
        "layers": len(layers),
    }
    if sparsity:
        out["detected_kernel_sparsity_by_role"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(sparsity.items())}
    return out
