"""torch → ONNX: one KV-cache decoder graph in DeepSparse's text-generation contract.

The graph is *our own* small decoder module (:class:`DecoderGraph`) built around the Hugging Face
model's weights (views, not copies), not a trace of the HF forward.  That keeps the ONNX simple and
lets a later stage swap the attention or the projections (e.g. int8 MatMulInteger) without touching
the HF code.  Every projection is a plain ``MatMul`` with a ``[in, out]`` fp32 initializer
named after the HF weight (``model.layers.0.self_attn.q_proj.weight.T``), so pruned zeros are copied
bit for bit and can be counted by name.

The graph follows DeepSparse's KV-cache contract (``owl_deploy.contract``): ``n`` (the input_ids
length) and ``L`` (the sequence length) are declared static (n = 1, L = the export's sequence length)
but every internal shape is computed from the inputs, so DeepSparse's own
``overwrite_onnx_model_inputs_for_kv_cache_models`` can re-declare the same file for its multi-token
prefill engine (n = 16) — exactly what its pipeline does.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from owl_deploy.configs import ATTENTION_KINDS
from owl_deploy.contract import (
    EXTERNAL_DATA_FILE,
    META_KEY,
    MODEL_ONNX,
    PROJECTION_KINDS,
    GraphSpec,
    describe,
    set_input_shapes,
    set_output_shapes,
    tensor_nbytes,
)
from owl_deploy.errors import OwlError, one_line
from owl_deploy.model import blocks_prefix

#: model_type values whose decoder blocks this module knows how to rebuild.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")
#: the Gemma families (embedding scale, (1 + w) RMSNorms, GeGLU): rebuilt by _GemmaBlock
GEMMA_MODEL_TYPES = ("gemma", "gemma3_text")
#: families owl_deploy prunes but does not export, and exactly why (the export error says it)
REFUSED_MODEL_TYPES = {
    "opt": "OPT blocks (LayerNorm with bias, learned position embeddings, ReLU fc1/fc2, out_proj) are not "
    "rebuilt by the ONNX graph, which covers RMSNorm/RoPE decoders (LLaMA, Mistral, Qwen2/3, Gemma, Gemma 3); "
    "prune, evaluate and tune work on OPT",
    "gemma2": "Gemma 2's attention and final-logit soft-capping (tanh) are not in the ONNX graph",
    "gemma3": "this is the multimodal Gemma 3 (vision tower); export its text decoder (model_type gemma3_text, "
    "Gemma3ForCausalLM), e.g. the gemma3-270m asset",
}
#: MLP activations the graph implements (the HF config's hidden_act / hidden_activation)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu_pytorch_tanh": functools.partial(nn.functional.gelu, approximate="tanh"),
}
#: ONNX opset; DeepSparse 1.8 and ORT both take it.
OPSET = 14
#: Models whose weights pass this size are written with ONNX external data (protobuf caps at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MAX_ROPE_ROWS = 32768
#: additive mask value for blocked positions; exp() of it underflows to exactly 0 like HF's finfo.min.
_NEG = -1.0e9


# ---------------------------------------------------------------- the decoder module
class _Proj(nn.Module):
    """``y = x @ W.T + b`` stored as ``weight_t`` = W.T ([in, out]) so ONNX gets a plain MatMul."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        # a transposed *view* of the HF weight: no copy until the exporter serialises it
        self.weight_t = nn.Parameter(linear.weight.detach().float().t(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class _RMSNorm(nn.Module):
    """``weight * x / rms(x)``; Gemma's norms scale by ``1 + w``: pass ``offset=1`` (the sum is taken once here,
    in fp32 as HF does, so the graph multiplies by the same numbers)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float() + offset, requires_grad=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm_eps(norm: nn.Module, default: float) -> float:
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", default)))


class _Block(nn.Module):
    """One LLaMA-family block: pre-norm attention (RoPE, optional q/k norms) and a SwiGLU MLP."""

    #: added to every RMSNorm weight (Gemma: 1, its norms scale by 1 + w)
    norm_offset = 0.0

    def __init__(self, block: nn.Module, spec: GraphSpec, attention: str, eps: float, act: str = "silu"):
        super().__init__()
        attn, mlp = block.self_attn, block.mlp
        off = self.norm_offset
        self.input_norm = _RMSNorm(block.input_layernorm.weight, eps, off)
        self.post_norm = _RMSNorm(block.post_attention_layernorm.weight, eps, off)
        self.q_proj, self.k_proj = _Proj(attn.q_proj), _Proj(attn.k_proj)
        self.v_proj, self.o_proj = _Proj(attn.v_proj), _Proj(attn.o_proj)
        self.gate_proj, self.up_proj, self.down_proj = _Proj(mlp.gate_proj), _Proj(mlp.up_proj), _Proj(mlp.down_proj)
        # qwen3, gemma3: per-head RMSNorm of queries and keys before RoPE
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = None if qn is None else _RMSNorm(qn.weight, _norm_eps(qn, eps), off)
        self.k_norm = None if kn is None else _RMSNorm(kn.weight, _norm_eps(kn, eps), off)
        self.h, self.kvh, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.group = spec.num_heads // spec.num_kv_heads
        # the HF module's own score scale (gemma3: query_pre_attn_scalar^-0.5, not head_dim^-0.5)
        self.scale = float(getattr(attn, "scaling", spec.head_dim**-0.5))
        self.act = ACTIVATIONS[act]
        self.attention = attention

    def forward(self, x, cos, sin, mask_bias, past_k, past_v):
        out, present_k, present_v = self._attend(self.input_norm(x), cos, sin, mask_bias, past_k, past_v)
        x = x + self.o_proj(out)
        h = self.post_norm(x)
        x = x + self._mlp(h)
        return x, present_k, present_v

    def _mlp(self, h):
        return self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))

    def _attend(self, h, cos, sin, mask_bias, past_k, past_v):
        """Attention of the normed input ``h`` up to o_proj's input; returns (out, present_k, present_v)."""
        # Every reshape uses constants and at most one -1 (batch is 1): no Shape ops in the graph.
        # Shape arithmetic from Shape/Gather/Concat made DeepSparse's internal KV cache compile fail
        # intermittently (engine assertions in setup_cached_concat) for grouped-query models.
        q = self.q_proj(h).reshape(1, -1, self.h, self.hd)  # [1, n, heads, hd]
        k = self.k_proj(h).reshape(1, -1, self.kvh, self.hd)
        v = self.v_proj(h).reshape(1, -1, self.kvh, self.hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        # RoPE in [1, n, heads, hd] layout; cos/sin are [1, n, 1, hd]
        half = self.hd // 2
        q = q * cos + _rotate_half(q, half) * sin
        k = k * cos + _rotate_half(k, half) * sin
        present_k = torch.cat((past_k, k.transpose(1, 2)), dim=2)  # [1, kvh, L, hd]
        present_v = torch.cat((past_v, v.transpose(1, 2)), dim=2)
        if self.attention == "grouped":
            out = self._grouped(q, present_k, present_v, mask_bias)
        else:
            out = self._repeat(q, present_k, present_v, mask_bias)
        return out, present_k, present_v

    def _grouped(self, q, k, v, mask_bias):
        """Grouped-query attention without expanding K/V: 5-D MatMuls that broadcast over the group.

        q [1, kvh, g, n, hd] @ kᵀ [1, kvh, 1, hd, L] → scores [1, kvh, g, n, L]; ``mask_bias`` arrives as
        [1, 1, 1, n, L].  Keeping the token axis at -2 (rather than stacking g*n rows) is what lets
        DeepSparse's internal KV cache compile a model with several layers.
        """
        qg = q.reshape(1, -1, self.kvh, self.group, self.hd).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(qg, k.transpose(2, 3).unsqueeze(2)) * self.scale
        probs = torch.softmax(scores + mask_bias, dim=-1)
        out = torch.matmul(probs, v.unsqueeze(2))  # [1, kvh, g, n, hd]
        return out.permute(0, 3, 1, 2, 4).reshape(1, -1, self.h * self.hd)

    def _repeat(self, q, k, v, mask_bias):
        """The HF layout: K/V repeated to every query head (DeepSparse's internal cache rejects it)."""
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3)) * self.scale  # [1, h, n, L]
        probs = torch.softmax(scores + mask_bias, dim=-1)
        out = torch.matmul(probs, v)  # [1, h, n, hd]
        return out.transpose(1, 2).reshape(1, -1, self.h * self.hd)


class _GemmaBlock(_Block):
    """A Gemma / Gemma 3 block: (1 + w) RMSNorms, GeGLU, and Gemma 3's sandwich norms.

    Gemma 3: ``x + post_attention_norm(attn(input_norm(x)))`` then ``x + post_feedforward_norm(mlp(
    pre_feedforward_norm(x)))``; Gemma (v1) has no sandwich norms and feeds the MLP from post_attention_layernorm
    as LLaMA does.
    """

    norm_offset = 1.0

    def __init__(self, block: nn.Module, spec: GraphSpec, attention: str, eps: float, act: str = "gelu_pytorch_tanh"):
        super().__init__(block, spec, attention, eps, act)
        pre_ff, post_ff = (
            getattr(block, "pre_feedforward_layernorm", None),
            getattr(block, "post_feedforward_layernorm", None),
        )
        self.sandwich = pre_ff is not None
        if self.sandwich:
            if post_ff is None:
                raise OwlError(
                    "cannot export a Gemma block with pre_feedforward_layernorm but no post_feedforward_layernorm"
                )
            self.pre_ff_norm = _RMSNorm(pre_ff.weight, _norm_eps(pre_ff, eps), 1.0)
            self.post_ff_norm = _RMSNorm(post_ff.weight, _norm_eps(post_ff, eps), 1.0)

    def forward(self, x, cos, sin, mask_bias, past_k, past_v):
        if not self.sandwich:
            return super().forward(x, cos, sin, mask_bias, past_k, past_v)
        out, present_k, present_v = self._attend(self.input_norm(x), cos, sin, mask_bias, past_k, past_v)
        x = x + self.post_norm(self.o_proj(out))  # post_attention_layernorm normalises the attention output
        x = x + self.post_ff_norm(self._mlp(self.pre_ff_norm(x)))
        return x, present_k, present_v


def _rope_tables(rotary: nn.Module, kind: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[rows, hd]`` (the HF layout, ``attention_scaling`` applied) of one RoPE kind.

    ``kind`` is ``default`` (``rotary.inv_freq``) or a layer type with its own base (Gemma 3's
    ``rotary.sliding_attention_inv_freq``: local base 10k, ``full_attention_inv_freq``: global base 1M).
    """
    prefix = "" if kind == "default" else f"{kind}_"
    inv_freq = getattr(rotary, f"{prefix}inv_freq")
    freqs = torch.arange(rows, dtype=torch.float32)[:, None] * inv_freq.detach().float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    return emb.cos() * scale, emb.sin() * scale


def _rope_kinds(model: nn.Module) -> list[str]:
    """The RoPE table each block uses: its layer type where the rotary module has one per type, else default."""
    rotary, cfg = model.model.rotary_emb, model.config
    types = list(getattr(cfg, "layer_types", None) or [])
    n = len(model.model.layers)
    if len(types) == n and all(hasattr(rotary, f"{t}_inv_freq") for t in types):
        return types
    return ["default"] * n


class DecoderGraph(nn.Module):
    """One KV-cache step of a LLaMA-family decoder with the DeepSparse input/output contract."""

    def __init__(self, model: nn.Module, sequence_length: int, attention: str = "grouped"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise OwlError(f"unknown attention layout {attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        self.spec, eps = graph_spec(model)
        core, cfg = model.model, model.config
        self.embed = nn.Parameter(core.embed_tokens.weight.detach().float(), requires_grad=False)
        # Gemma multiplies the embeddings by sqrt(hidden) in the weights' dtype (HF's embed_scale buffer)
        scale = getattr(core.embed_tokens, "embed_scale", None)
        self.embed_scale = None if scale is None else float(torch.as_tensor(scale).to(self.embed.dtype))
        self.attention = attention
        gemma = cfg.model_type in GEMMA_MODEL_TYPES
        block_cls = _GemmaBlock if gemma else _Block
        act = _activation(cfg)
        self.blocks = nn.ModuleList(block_cls(blk, self.spec, attention, eps, act) for blk in core.layers)
        self.norm = _RMSNorm(core.norm.weight, eps, block_cls.norm_offset)
        self.lm_head = _Proj(model.lm_head)  # tied (qwen3, gemma): its own [in, out] initializer
        # RoPE as cos/sin tables gathered by ``positions``: DeepSparse's internal KV cache cannot
        # compile Cos/Sin computed from the positions input (engine assertion), a Gather it can.
        # One pair of tables per RoPE kind (Gemma 3: local and global bases), each gathered once per step.
        rows = rope_table_rows(self.spec, sequence_length)
        self.rope_kinds = _rope_kinds(model)
        for kind in dict.fromkeys(self.rope_kinds):
            cos, sin = _rope_tables(core.rotary_emb, kind, rows)
            suffix = "" if kind == "default" else f"_{kind}"
            self.register_buffer(f"rope_cos{suffix}", cos, persistent=False)
            self.register_buffer(f"rope_sin{suffix}", sin, persistent=False)
        #: HF weight name of every projection, by our parameter name (used to name ONNX initializers)
        self.hf_names: dict[str, str] = {}
        prefix = blocks_prefix(model)
        for i, _ in enumerate(core.layers):
            for ours, theirs in _PROJ_NAMES.items():
                self.hf_names[f"blocks.{i}.{ours}.weight_t"] = f"{prefix}.{i}.{theirs}.weight.T"
                self.hf_names[f"blocks.{i}.{ours}.bias"] = f"{prefix}.{i}.{theirs}.bias"
        self.hf_names["lm_head.weight_t"] = "lm_head.weight.T"
        self.hf_names["lm_head.bias"] = "lm_head.bias"
        self.hf_names["embed"] = "model.embed_tokens.weight"

    def forward(self, input_ids, attention_mask, positions, causal_mask, *past):
        x = self.embed[input_ids]  # Gather → [b, n, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        rope = {}
        for kind in dict.fromkeys(self.rope_kinds):
            suffix = "" if kind == "default" else f"_{kind}"
            cos = getattr(self, f"rope_cos{suffix}")[positions].unsqueeze(2)  # Gather → [b, n, 1, hd]
            rope[kind] = (cos, getattr(self, f"rope_sin{suffix}")[positions].unsqueeze(2))
        allowed = causal_mask * attention_mask.unsqueeze(1).unsqueeze(1)  # [b, 1, n, L]
        mask_bias = (1 - allowed).float() * _NEG
        if self.attention == "grouped":
            mask_bias = mask_bias.unsqueeze(2)  # [1, 1, 1, n, L], broadcast over (kv head, group)
        presents = []
        for i, block in enumerate(self.blocks):
            cos, sin = rope[self.rope_kinds[i]]
            x, pk, pv = block(x, cos, sin, mask_bias, past[2 * i], past[2 * i + 1])
            presents += [pk, pv]
        logits = self.lm_head(self.norm(x))
        return (logits, *presents)


#: our projection -> its Hugging Face module inside a block (LLaMA-family naming)
_PROJ_NAMES = {
    k: ("mlp." if k in ("gate_proj", "up_proj", "down_proj") else "self_attn.") + k for k in PROJECTION_KINDS
}


def graph_spec(model: nn.Module) -> tuple[GraphSpec, float]:
    """Check that ``model`` is a decoder this module can rebuild; return its shapes and RMSNorm eps."""
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype in REFUSED_MODEL_TYPES:
        raise OwlError(f"cannot export model_type {mtype!r}: {REFUSED_MODEL_TYPES[mtype]}")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise OwlError(
            f"cannot export model_type {mtype!r}: the ONNX graph supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = _activation(cfg)
    expected = "gelu_pytorch_tanh" if mtype in GEMMA_MODEL_TYPES else "silu"
    if act != expected:
        raise OwlError(f"cannot export a {mtype} model with hidden_act {act!r}: the ONNX graph implements {expected}")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key, None):
            raise OwlError(f"cannot export {key}={getattr(cfg, key)}: the ONNX graph has no soft-capping")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise OwlError("cannot export use_bidirectional_attention=True: the ONNX graph is a causal decoder")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    # gemma3: one parameter set per layer type ({"sliding_attention": {...}, "full_attention": {...}})
    sets = [r for r in rope.values() if isinstance(r, dict)] if isinstance(rope, dict) else []
    for params in sets or [rope if isinstance(rope, dict) else {}]:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise OwlError(f"cannot export rope_type {rope_type!r}: its frequencies depend on the sequence length")
    core = getattr(model, "model", None)
    if core is None or not hasattr(core, "layers") or not hasattr(core, "rotary_emb"):
        raise OwlError(f"cannot export {type(model).__name__}: expected .model.layers and .model.rotary_emb")
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv:
        raise OwlError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    window = 0
    sliding_layers = "sliding_attention" in (getattr(cfg, "layer_types", None) or [])  # gemma3: 5 of every 6
    if (getattr(cfg, "use_sliding_window", mtype == "mistral") or sliding_layers) and getattr(
        cfg, "sliding_window", None
    ):
        window = int(cfg.sliding_window)
    spec = GraphSpec(
        sliding_window=window,
        num_layers=len(core.layers),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0),
    )
    return spec, float(getattr(cfg, "rms_norm_eps", 1e-6))


def _activation(cfg) -> str:
    """The MLP activation's name (Gemma 3 calls it hidden_activation, the others hidden_act)."""
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "silu"


# ---------------------------------------------------------------- export
def export_onnx(
    model: nn.Module,
    out_dir: Path,
    sequence_length: int,
    attention: str = "grouped",
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    rewrite: Callable[[object, dict[str, str], Path], dict] | None = None,
) -> dict:
    """Write ``out_dir/model.onnx`` (+ ``model.data`` above the threshold); return a description.

    The returned dict has the spec, the ONNX name of every HF projection weight and whether external
    data was used.  ``rewrite(proto, weights, base_dir)`` (e.g. int8) edits the graph before it is saved
    (initializers may still be external data under ``base_dir``); what it returns is kept under ``"rewrite"``.
    """
    import onnx

    spec, _ = graph_spec(model)
    check_sequence_length(spec, sequence_length)
    graph = DecoderGraph(model, sequence_length, attention=attention).eval()
    args = _trace_inputs(spec)
    raw = out_dir / ".trace"
    raw.mkdir()
    raw_path = raw / MODEL_ONNX
    dyn = {"input_ids": {1: "n"}, "positions": {1: "n"}, "attention_mask": {1: "L"}, "causal_mask": {2: "n", 3: "L"}}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            dyn[f"past_key_values.{i}.{kind}"] = {2: "past"}
            dyn[f"present.{i}.{kind}"] = {2: "L"}
    dyn["logits"] = {1: "n"}
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(raw_path),
            input_names=spec.input_names(),
            output_names=spec.output_names(),
            dynamic_axes=dyn,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    # the traced weights stay on disk: only the graph is loaded, and each tensor is read when it is
    # quantized or copied into model.data (a 1.5B model would otherwise be a second 7 GB in memory)
    proto = onnx.load(str(raw_path), load_external_data=False)
    names = _rename_initializers(proto, graph.hf_names)
    set_input_shapes(proto, spec, sequence_length, input_ids_length=1)
    set_output_shapes(proto, spec)
    rewritten = rewrite(proto, names, raw) if rewrite is not None else None
    proto.producer_name = "owl_deploy"
    meta = {
        **asdict(spec),
        "sequence_length": sequence_length,
        "max_sequence_length": min(rope_table_rows(spec, sequence_length), spec.sliding_window or 1 << 62),
        "attention": attention,
    }
    del proto.metadata_props[:]
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta, sort_keys=True))
    contract = describe(proto)
    weight_bytes = sum(tensor_nbytes(t) for t in proto.graph.initializer)
    external = weight_bytes > external_data_threshold
    dest = out_dir / MODEL_ONNX
    if external:
        _save_with_external_data(proto, raw, dest, out_dir / EXTERNAL_DATA_FILE)
    else:
        onnx.load_external_data_for_model(proto, str(raw))
        onnx.save_model(proto, str(dest))
    del proto
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    try:
        onnx.checker.check_model(str(dest))
    except Exception as exc:  # a bug, but report it in one line
        raise OwlError(f"the exported graph fails the ONNX checker: {one_line(exc)}") from exc
    return {
        "spec": spec,
        "weights": names,
        "external_data": external,
        "weight_bytes": weight_bytes,
        "meta": meta,
        "contract": contract,
        "rewrite": rewritten,
    }


def _save_with_external_data(proto, raw_dir: Path, dest: Path, data_file: Path, min_bytes: int = 1024) -> None:
    """Save ``proto`` with every initializer of ``min_bytes`` or more in one ``data_file``, streamed one
    tensor at a time from where it is now (its own bytes, or the tracer's files under ``raw_dir``)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    attribute_tensors = [
        t for node in proto.graph.node for a in node.attribute for t in ([a.t] if a.HasField("t") else list(a.tensors))
    ]
    with open(data_file, "wb") as out:
        for t in [*proto.graph.initializer, *attribute_tensors]:  # the tracer stores big Constants outside too
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                with open(raw_dir / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    data = src.read(info.length) if info.length else src.read()
            elif t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
                data = t.raw_data
            else:
                continue
            offset = out.tell()
            out.write(data)
            del data
            t.ClearField("raw_data")
            del t.external_data[:]  # (onnx's set_external_data insists on raw_data being present)
            for key, value in (("location", data_file.name), ("offset", offset), ("length", out.tell() - offset)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(proto, str(dest))


def rope_table_rows(spec: GraphSpec, sequence_length: int) -> int:
    """Rows of the RoPE tables = the longest sequence length the exported file can be re-declared to.

    All of the model's positions, capped at 32768 (the table costs rows x head_dim x 8 bytes) and at the
    sliding window (the longest sequence the graph is exact for), never fewer than the export's own
    sequence length.
    """
    cap = min(spec.max_positions or sequence_length, MAX_ROPE_ROWS, spec.sliding_window or MAX_ROPE_ROWS)
    return max(sequence_length, cap)


def check_sequence_length(spec: GraphSpec, sequence_length: int) -> None:
    """The static sequence length must leave room for a prompt and fit the model's positions."""
    if sequence_length < 2:
        raise OwlError(f"sequence length {sequence_length} is too small: it must be at least 2")
    if spec.max_positions and sequence_length > spec.max_positions:
        raise OwlError(
            f"sequence length {sequence_length} exceeds the model's max_position_embeddings {spec.max_positions}"
        )
    if spec.sliding_window and sequence_length > spec.sliding_window:
        raise OwlError(
            f"sequence length {sequence_length} exceeds the model's sliding attention window {spec.sliding_window}: "
            "the graph exports full attention, exact only up to the window; use a shorter --sequence-length"
        )


def _trace_inputs(spec: GraphSpec) -> tuple:
    # trace with n = 2 and L = 8 so no dimension is 1 (a 1 can be specialised away by the tracer)
    n, total = 2, 8
    ids = torch.zeros((1, n), dtype=torch.int64)
    mask = torch.ones((1, total), dtype=torch.int64)
    pos = torch.arange(total - n, total, dtype=torch.int64)[None, :]
    causal = torch.ones((1, 1, n, total), dtype=torch.int64)
    past = [torch.zeros((1, spec.num_kv_heads, total - n, spec.head_dim)) for _ in range(2 * spec.num_layers)]
    return (ids, mask, pos, causal, *past)


def _rename_initializers(proto, hf_names: dict[str, str]) -> dict[str, str]:
    """Rename our parameter initializers to HF weight names; returns {hf weight name: onnx name}."""
    mapping = {}
    for init in proto.graph.initializer:
        if init.name in hf_names:
            mapping[init.name] = hf_names[init.name]
    missing = [k for k in hf_names if k.endswith("weight_t") and k not in mapping]
    if missing:
        raise OwlError(f"internal: projection weights were folded away during export: {missing[:3]}")
    for init in proto.graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    return {v[: -len(".T")]: v for v in mapping.values() if v.endswith(".weight.T")}
