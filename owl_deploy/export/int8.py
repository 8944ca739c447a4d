"""int8 for DeepSparse: the MatMulInteger pattern its sparse int8 kernels run, with calibrated scales.

The pattern (``cpu-runtime.md``, "What makes DeepSparse fast here"), per projection ``y = x @ W``::

    x fp32 -> QuantizeLinear(s_x, zp=128 uint8) -> MatMulInteger(x_q, W_q uint8 [K, N], 128, 128)
           -> Cast(FLOAT) -> Mul(s_x * s_w[N]) -> y

* Weights: symmetric, one scale per output column (``s_w = max|W[:, n]| / 127``), stored as uint8
  with zero point 128, so a pruned weight is exactly 128 (zero) and stays one.  A DequantizeLinear on
  weights feeding a float MatMul is not recognised by DeepSparse (it runs far slower): never emit it.
* Activations: static, per tensor (one scalar per projection input, shared by q/k/v and by gate/up),
  symmetric around zero point 128, from the absolute maximum seen on *calibration* text.
* LLM activations have outlier channels, which make a per-tensor scale coarse for every other
  channel.  :func:`smooth_model` (SmoothQuant) moves part of each channel's range into the weights
  and folds the inverse into the op before (RMSNorm weight for q/k/v and gate/up, v_proj rows for
  o_proj, up_proj rows for down_proj).  The model computes the same function; multiplying by a
  positive scale keeps every pruned zero an exact zero.  Gemma's RMSNorms scale by ``1 + w`` (found by
  running the norm, :func:`norm_offset`), so the fold divides ``1 + w``; Gemma 3's gate/up read
  ``pre_feedforward_layernorm`` (its ``post_attention_layernorm`` normalises the attention output).
* Projections named in ``keep_fp32`` (and lm_head unless asked for) stay fp32 MatMuls, and so do the
  ``keep_fp32_worst`` ones int8 hurts most: :func:`int8_errors` ranks every int8 projection by its relative
  output error on calibration windows (SmoothQuant applied, nothing upstream quantized). What a static per-tensor
  scale costs is spread over the ``down_proj`` inputs (SwiGLU products; a few early and late blocks of
  Qwen2.5-Coder-1.5B lead the ranking); 8 of its 197 projections fp32 halve int8's perplexity cost
  (docs/results.md, "int8 that keeps its quality").

The pure parts (:func:`quantize_weight`, :func:`activation_scale`, :func:`smoothing_scales`) work on
plain arrays; :func:`quantize_graph` rewrites an exported fp32 ONNX graph in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from owl_deploy.configs import QuantizeConfig
from owl_deploy.contract import initializer_array
from owl_deploy.errors import OwlError

#: uint8 zero point of weights and activations (symmetric: the stored zero)
ZERO_POINT = 128
QMAX = 127


# ---------------------------------------------------------------- pure maths
def quantize_weight(w_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` fp32 (the ONNX ``x @ W`` layout) -> (uint8 ``[K, N]``, fp32 scale ``[N]``).

    ``q = clip(round(w / s), -127, 127) + 128`` with ``s = max|w[:, n]| / 127`` per output column; an
    all-zero column gets s = 1 (every entry 128).  Exact zeros map to exactly 128.
    """
    w = np.asarray(w_t, dtype=np.float32)
    if w.ndim != 2:
        raise OwlError(f"quantize_weight expects a 2-D [K, N] matrix, got shape {w.shape}")
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int32) + ZERO_POINT
    return q.astype(np.uint8), scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) - ZERO_POINT) * scale


def activation_scale(absmax: float) -> float:
    """Static per-tensor activation scale: ``absmax / 127`` (zero point 128), never 0."""
    if not np.isfinite(absmax) or absmax < 0:
        raise OwlError(f"activation range must be a finite non-negative number, got {absmax}")
    return float(absmax) / QMAX if absmax > 0 else 1.0


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (1 where undefined).

    Dividing channel j of the activation by s_j and multiplying the weights' input column j by s_j
    leaves ``X W`` unchanged and balances the two ranges (α = 0.5: equal).
    """
    a = act_absmax.double().clamp(min=1e-5)
    w = weight_absmax.double().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.float()


def int8_output_error(x: torch.Tensor, w: torch.Tensor, act_range: float) -> tuple[float, float]:
    """(sum of squared errors, sum of squares) of ``x @ w.T`` done the deployment's int8 way: ``x`` [T, K] per
    tensor from ``act_range`` (:func:`activation_scale`, zero point 128: steps -128..127), ``w`` [N, K] (torch's
    layout) per output channel as :func:`quantize_weight` does. Their ratio ranks what int8 costs a projection.
    """
    x, w = x.float(), w.detach().float()
    wq = torch.from_numpy(dequantize_weight(*quantize_weight(w.T.numpy()))).T  # the export's own rounding
    s = activation_scale(act_range)
    xq = torch.clamp(torch.round(x / s), -ZERO_POINT, 255 - ZERO_POINT) * s
    y = x @ w.T
    return float(((xq @ wq.T - y) ** 2).sum()), float((y**2).sum())


def worst(errors: dict[str, float], n: int) -> list[str]:
    """The ``n`` names with the largest error (ties by name: the same errors always give the same choice)."""
    return sorted(errors, key=lambda name: (-errors[name], name))[:n]


# ---------------------------------------------------------------- calibration (torch)
def _projections(model: nn.Module) -> dict[str, nn.Linear]:
    """HF name (``model.layers.3.mlp.up_proj``) -> linear, for every block projection and lm_head."""
    from owl_deploy.model import named_block_linears

    out = named_block_linears(model)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        out["lm_head"] = head
    return out


@torch.inference_mode()
def activation_absmax(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every projection's input over the calibration ``windows`` [n, seqlen]."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, lin in _projections(model).items():

        def hook(_m, args, _out, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            stats[name] = torch.maximum(stats[name], x) if name in stats else x

        hooks.append((lin, hook))
    _run_hooked(model, windows, hooks)
    return stats


def _run_hooked(model: nn.Module, windows: torch.Tensor, hooks: list[tuple[nn.Module, Callable]]) -> None:
    """Run ``model`` on each window with the forward ``hooks`` attached; they are removed whatever happens."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        for ids in windows:
            model(input_ids=ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """0 for an RMSNorm that scales by ``w`` (LLaMA), 1 for one that scales by ``1 + w`` (Gemma).

    Found by running the norm on an all-ones row (rms 1, so the output is the multiplier up to eps), not from
    the model's name; anything else (a LayerNorm, a norm without a weight) cannot take a SmoothQuant fold.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        raise OwlError(f"int8: cannot fold SmoothQuant into {type(norm).__name__}: it has no per-channel weight")
    out = norm(torch.ones(1, w.numel(), dtype=w.dtype))[0].float() - w.float()
    tol = 1e-4 * (1.0 + float(w.abs().max()))
    for offset in (0.0, 1.0):
        if float((out - offset).abs().max()) <= tol:
            return offset
    raise OwlError(f"int8: cannot fold SmoothQuant into {type(norm).__name__}: it scales by neither w nor 1 + w")


def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """Divide the norm's multiplier (``w`` or ``1 + w``) by ``s``."""
    off = norm_offset(norm)
    w = norm.weight
    w.copy_(((w.float() + off) / s.float() - off).to(w.dtype))


#: a projection's weight smoothing: (multiplier of each input channel, divisor of each output channel), None = 1
WeightScales = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass
class Smoothing:
    """SmoothQuant's folds, split by size: ``ranges`` are the smoothed activation ranges; the norms and biases
    are folded in torch (small), while each projection weight's scaling (``weights``, by HF projection name)
    is applied where the weight is read one at a time (the ONNX rewrite), so no second copy of the model's
    weights is ever made (7 GB for a 1.5B model in fp32)."""

    ranges: dict[str, torch.Tensor]
    weights: dict[str, WeightScales]


def _add_weight_scales(plan: dict[str, WeightScales], name: str, mul: torch.Tensor | None, div: torch.Tensor | None):
    """Record one fold's scaling of ``name``'s weight: ``mul`` on its input channels or ``div`` on its output
    channels (the four folds give a projection at most one of each)."""
    old_mul, old_div = plan.get(name, (None, None))
    plan[name] = (mul.float() if mul is not None else old_mul, div.float() if div is not None else old_div)


@torch.no_grad()
def smoothing_plan(model: nn.Module, absmax: dict[str, torch.Tensor], alpha: float, fold: bool = True) -> Smoothing:
    """Fold SmoothQuant's scales into the norms and biases of a LLaMA-family model in place; return the smoothed
    activation ranges and each projection weight's scaling (apply it with :func:`scale_weight_t`, or in torch
    with :func:`apply_weight_scales`). Until the weights are scaled the model computes a different function.
    ``fold=False`` only computes the plan (the model untouched: :func:`int8_errors` runs it as it was).

    Four folds per block: input_layernorm -> q/k/v, the norm before the MLP (post_attention_layernorm, or
    Gemma 3's pre_feedforward_layernorm) -> gate/up, v_proj rows -> o_proj (one scale per kv head and dim,
    shared by the query heads of a group), up_proj rows -> down_proj; and the final norm -> lm_head (whose
    weight is scaled in its own graph initializer, so tied input embeddings keep their values).
    """
    from owl_deploy.model import blocks_prefix, decoder_blocks

    prefix = blocks_prefix(model)
    cfg = model.config
    out = dict(absmax)
    plan: dict[str, WeightScales] = {}
    for i, block in enumerate(decoder_blocks(model)):
        attn, mlp = block.self_attn, block.mlp
        p = f"{prefix}.{i}"

        def fold_norm(norm: nn.Module, linears: list[nn.Linear], names: list[str]) -> None:
            a = absmax[names[0]]
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            s = smoothing_scales(a, wmax, alpha)
            if fold:
                _fold_into_norm(norm, s)
            for lin, name in zip(linears, names, strict=True):
                _add_weight_scales(plan, name, s.to(lin.weight.dtype), None)
                out[name] = a / s

        qkv = [f"{p}.self_attn.{k}_proj" for k in "qkv"]
        fold_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], qkv)
        gate_up = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        # gemma3's post_attention_layernorm is a sandwich norm on the attention output, not the MLP's input
        mlp_norm = getattr(block, "pre_feedforward_layernorm", None) or block.post_attention_layernorm
        fold_norm(mlp_norm, [mlp.gate_proj, mlp.up_proj], gate_up)

        # v_proj -> o_proj: o's input channel h*hd + d comes from kv head h // group, dim d
        heads = cfg.num_attention_heads
        kvh = getattr(cfg, "num_key_value_heads", None) or heads
        hd = attn.o_proj.in_features // heads
        group = heads // kvh
        a_o = absmax[f"{p}.self_attn.o_proj"].view(kvh, group, hd).amax(1)
        w_o = attn.o_proj.weight.abs().amax(0).view(kvh, group, hd).amax(1)
        s_kv = smoothing_scales(a_o.reshape(-1), w_o.reshape(-1), alpha)  # [kvh * hd] = v_proj's rows
        _add_weight_scales(plan, f"{p}.self_attn.v_proj", None, s_kv)
        if fold and attn.v_proj.bias is not None:
            attn.v_proj.bias.div_(s_kv)
        s_o = s_kv.view(kvh, 1, hd).expand(kvh, group, hd).reshape(-1)
        _add_weight_scales(plan, f"{p}.self_attn.o_proj", s_o, None)
        out[f"{p}.self_attn.o_proj"] = absmax[f"{p}.self_attn.o_proj"] / s_o

        # up_proj -> down_proj: down's input is silu(gate) * up, linear in up's output
        s_d = smoothing_scales(absmax[f"{p}.mlp.down_proj"], mlp.down_proj.weight.abs().amax(0), alpha)
        _add_weight_scales(plan, f"{p}.mlp.up_proj", None, s_d)
        if fold and mlp.up_proj.bias is not None:
            mlp.up_proj.bias.div_(s_d)
        _add_weight_scales(plan, f"{p}.mlp.down_proj", s_d, None)
        out[f"{p}.mlp.down_proj"] = absmax[f"{p}.mlp.down_proj"] / s_d

    head, norm = model.get_output_embeddings(), getattr(getattr(model, "model", None), "norm", None)
    if isinstance(head, nn.Linear) and norm is not None and "lm_head" in absmax:
        s = smoothing_scales(absmax["lm_head"], head.weight.abs().amax(0), alpha)
        if fold:
            _fold_into_norm(norm, s)
        _add_weight_scales(plan, "lm_head", s.to(head.weight.dtype), None)
        out["lm_head"] = absmax["lm_head"] / s
    return Smoothing(out, plan)


def scale_weight_t(w_t: np.ndarray, scales: WeightScales) -> np.ndarray:
    """A projection's ``[in, out]`` weight (the ONNX layout) with its smoothing: input channel j (row j) times
    ``mul[j]``, then output channel c (column c) divided by ``div[c]`` — the same fp32 operations, in the same
    order, as :func:`apply_weight_scales` on the ``[out, in]`` torch weight, so the same bits."""
    mul, div = scales
    w = np.asarray(w_t, dtype=np.float32)
    if mul is not None:
        w = w * mul.numpy()[:, None]
    if div is not None:
        w = w / div.numpy()[None, :]
    return w


#: columns per slice when a weight is smoothed and quantized (per-column maths: slices give the same bits)
COLUMNS_PER_SLICE = 4096


def smooth_and_quantize(w_t: np.ndarray, scales: WeightScales = (None, None)) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`scale_weight_t` then :func:`quantize_weight`, slice of columns by slice of columns, so a large weight
    (a 150k-vocabulary lm_head: 0.9 GB in fp32) never has its fp32 temporaries made whole; ``w_t`` may be a
    memory map. Returns (uint8 ``[K, N]``, scale ``[N]``, exact zeros of the unscaled weight)."""
    mul, div = scales
    k, n = w_t.shape
    q = np.empty((k, n), dtype=np.uint8)
    scale = np.empty(n, dtype=np.float32)
    zeros = 0
    for a in range(0, n, COLUMNS_PER_SLICE):
        b = min(a + COLUMNS_PER_SLICE, n)
        block = np.asarray(w_t[:, a:b], dtype=np.float32)
        zeros += int(np.count_nonzero(block == 0))
        block = scale_weight_t(block, (mul, None if div is None else div[a:b]))
        q[:, a:b], scale[a:b] = quantize_weight(block)
    return q, scale, zeros


@torch.no_grad()
def apply_weight_scales(model: nn.Module, plan: Smoothing) -> None:
    """The weights' part of the plan applied to the torch model in place (tests; a resident model). Unties a
    tied lm_head first, so the input embeddings keep their values."""
    projections = _projections(model)
    head = model.get_output_embeddings()
    if "lm_head" in plan.weights and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for name, (mul, div) in plan.weights.items():
        w = projections[name].weight
        if mul is not None:
            w.mul_(mul.to(w.dtype))
        if div is not None:
            w.div_(div.to(w.dtype)[:, None])


def smooth_model(model: nn.Module, absmax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """All of SmoothQuant folded into the torch model in place (the same function); the smoothed ranges."""
    plan = smoothing_plan(model, absmax, alpha)
    apply_weight_scales(model, plan)
    return plan.ranges


@torch.inference_mode()
def int8_errors(
    model: nn.Module, windows: torch.Tensor, plan: Smoothing | None, ranges: dict[str, float]
) -> dict[str, float]:
    """Relative output error int8 gives each projection in ``ranges`` (name -> smoothed activation range) on
    ``windows``: ``model`` runs unquantized and *unfolded* (``smoothing_plan(..., fold=False)``), and each
    projection's input and weight are smoothed by ``plan`` and quantized in a hook, so one projection's error
    never feeds the next one's input. Relative: sum of squared errors over sum of squares of the output."""
    projs = _projections(model)
    sums: dict[str, tuple[float, float]] = {}
    hooks = []
    for name, act_range in ranges.items():
        mul, div = plan.weights.get(name, (None, None)) if plan is not None else (None, None)

        def hook(lin, args, _out, name=name, act_range=act_range, mul=mul, div=div):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            w = lin.weight.float()
            if mul is not None:
                x, w = x / mul, w * mul
            if div is not None:
                w = w / div[:, None]
            err, norm = int8_output_error(x, w, act_range)
            e0, n0 = sums.get(name, (0.0, 0.0))
            sums[name] = (e0 + err, n0 + norm)

        hooks.append((projs[name], hook))
    _run_hooked(model, windows, hooks)
    return {name: err / norm if norm > 0 else 0.0 for name, (err, norm) in sums.items()}


# ---------------------------------------------------------------- the ONNX rewrite
def quantize_graph(
    proto,
    act_absmax: dict[str, float],
    weights: dict[str, str],
    base_dir: str | Path,
    scales: dict[str, WeightScales] | None = None,
) -> dict:
    """Rewrite ``proto`` in place: each MatMul whose weight is listed becomes the MatMulInteger pattern.

    ``act_absmax``: HF projection name -> activation range; ``weights``: HF weight name (``...weight``)
    -> ONNX initializer name (export_onnx's map); weights stored as external data are read from ``base_dir``
    one at a time, and every rewritten weight is written to ``base_dir/owl_int8.data`` (external data).
    ``scales`` (HF projection name -> its SmoothQuant weight scaling, :class:`Smoothing`) are
    applied to each weight as it is read, quantized or kept fp32.  MatMuls sharing an input share one
    QuantizeLinear.  Returns {HF name: {"onnx_name", "act_scale", "zero_weights"}} for the report.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    by_init = {weights[f"{hf}.weight"]: hf for hf in act_absmax if f"{hf}.weight" in weights}
    missing = [hf for hf in act_absmax if f"{hf}.weight" not in weights]
    if missing:
        raise OwlError(f"int8: no ONNX weight for {missing[0]}")
    scales = scales or {}
    unknown = [hf for hf in scales if f"{hf}.weight" not in weights]
    if unknown:
        raise OwlError(f"int8: no ONNX weight for {unknown[0]}")
    with _SideFile(Path(base_dir)) as side:
        for hf, sc in scales.items():  # the projections that stay fp32 still carry their share of the smoothing
            name = weights[f"{hf}.weight"]
            if name not in by_init:
                side.put(inits[name], scale_weight_t(initializer_array(inits[name], Path(base_dir)), sc))
        zp = "owl_int8.zero_point"
        g.initializer.append(numpy_helper.from_array(np.array(ZERO_POINT, dtype=np.uint8), zp))
        quantized_inputs: dict[tuple[str, float], str] = {}
        new_nodes = []
        report = {}
        for node in g.node:
            if node.op_type != "MatMul" or node.input[1] not in by_init:
                new_nodes.append(node)
                continue
            hf = by_init[node.input[1]]
            x_name, w_name = node.input[0], node.input[1]
            s_x = activation_scale(float(act_absmax[hf]))
            key = (x_name, s_x)
            if key not in quantized_inputs:
                tag = f"owl_int8.{len(quantized_inputs)}"
                g.initializer.append(numpy_helper.from_array(np.array(s_x, dtype=np.float32), f"{tag}.x_scale"))
                new_nodes.append(
                    helper.make_node(
                        "QuantizeLinear", [x_name, f"{tag}.x_scale", zp], [f"{tag}.x_q"], name=f"{tag}.quant"
                    )
                )
                quantized_inputs[key] = f"{tag}.x_q"
            xq = quantized_inputs[key]
            init = inits[w_name]
            # its own bytes, mapped and read a slice at a time; the result goes to a file beside the traced weights,
            # never into the proto (protobuf's arena would keep every quantized weight until the graph is freed)
            w = initializer_array(init, Path(base_dir), mmap=True)
            q, s_w, source_zeros = smooth_and_quantize(w, scales.get(hf, (None, None)))
            del w
            side.put(init, q)
            base = node.name or w_name
            g.initializer.append(numpy_helper.from_array((s_x * s_w).astype(np.float32), f"{w_name}.scale"))
            new_nodes += [
                helper.make_node("MatMulInteger", [xq, w_name, zp, zp], [f"{base}.i32"], name=f"{base}.matmul_integer"),
                helper.make_node("Cast", [f"{base}.i32"], [f"{base}.f32"], to=TensorProto.FLOAT, name=f"{base}.cast"),
                helper.make_node("Mul", [f"{base}.f32", f"{w_name}.scale"], list(node.output), name=f"{base}.rescale"),
            ]
            report[hf] = {
                "onnx_name": w_name,
                "act_scale": s_x,
                "zero_weights": int(np.count_nonzero(q == ZERO_POINT)),
                "source_zero_weights": source_zeros,
            }
    del g.node[:]
    g.node.extend(new_nodes)
    return report


class _SideFile:
    """Initializers whose new values are written to one external-data file in ``folder`` as they are made."""

    NAME = "owl_int8.data"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME

    def __enter__(self) -> _SideFile:
        self.fh = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def put(self, init, array: np.ndarray) -> None:
        from onnx import TensorProto, helper

        offset = self.fh.tell()
        self.fh.write(np.ascontiguousarray(array).tobytes())
        new = TensorProto(name=init.name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        new.dims.extend(array.shape)
        for key, value in (("location", self.NAME), ("offset", offset), ("length", array.nbytes)):
            new.external_data.add(key=key, value=str(value))
        new.data_location = TensorProto.EXTERNAL
        init.CopyFrom(new)


def quantize_targets(model: nn.Module, cfg: QuantizeConfig) -> list[str]:
    """The HF projection names that go int8 under ``cfg`` (everything not matched by ``keep_fp32``)."""
    import fnmatch

    names = []
    for name in _projections(model):
        kind = name.rsplit(".", 1)[-1]
        if name == "lm_head" and not cfg.lm_head:
            continue
        if any(kind == k or fnmatch.fnmatchcase(name, k) for k in cfg.keep_fp32):
            continue
        names.append(name)
    return names
