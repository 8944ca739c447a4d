"""The standard ONNX Runtime peer: the dense model exported as optimum's ``text-generation-with-past`` does,
fused by ONNX Runtime's transformer optimizer, and its ``quantize_dynamic`` int8 twin."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from owl_deploy.peers.common import (
    EXTERNAL_DATA_BYTES,
    ONNX_FILE,
    OPSET,
    Log,
    _import_ort_quantization,
    _quiet,
    read_peer_json,
)


def _past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def export_ort_standard(model_dir: Path, dest: Path, log: Log | None = None) -> dict[str, Any]:
    """Export the HF model with past key values as optimum's ``text-generation-with-past`` does, then
    run ONNX Runtime's transformer optimizer on it; writes ``dest/model.onnx`` (+ external data)."""
    import torch

    _import_ort_quantization()  # the extra's presence, checked before the minutes of export
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from owl_deploy.model import load_causal_lm

    say = log or _quiet
    model = load_causal_lm(model_dir)
    cfg = model.config.get_text_config(decoder=True)
    layers, kv = cfg.num_hidden_layers, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    model.config.use_cache = True

    class WithPast(torch.nn.Module):
        """The HF forward with the cache as flat tensors, as optimum's model patcher feeds it."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            from transformers import DynamicCache

            cache = DynamicCache(
                ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)), config=self.inner.config
            )
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    # optimum's dummy inputs: batch 2, 16 new tokens after 16 cached ones
    batch, n, past_len = 2, 16, 16
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, n), generator=gen)
    mask = torch.ones(batch, past_len + n, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + n).expand(batch, n)
    past = [torch.randn(batch, kv, past_len, head_dim, generator=gen) for _ in range(2 * layers)]
    inputs = ["input_ids", "attention_mask", "position_ids", *_past_names(layers)]
    outputs = ["logits"] + [n.replace("past_key_values", "present") for n in _past_names(layers)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in inputs[3:]})
    axes.update({name: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for name in outputs[1:]})
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".export-", dir=dest) as raw_dir:
        raw = Path(raw_dir) / ONNX_FILE
        say(f"  tracing the HF forward with past key values (opset {OPSET}) ...")
        with torch.no_grad(), _quiet_warnings():
            torch.onnx.export(
                WithPast(model),
                (ids, mask, positions, *past),
                str(raw),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        export_s = time.perf_counter() - t0
        del model
        say("  ONNX Runtime transformer optimizer (gpt2 fusions, opt level 0) ...")
        opt = optimize_model(
            str(raw),
            model_type="gpt2",
            num_heads=cfg.num_attention_heads,
            hidden_size=cfg.hidden_size,
            opt_level=0,
            optimization_options=FusionOptions("gpt2"),
        )
        fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(dest / ONNX_FILE), use_external_data_format=external, all_tensors_to_one_file=True)
    return {
        "file": ONNX_FILE,
        "tool": "torch.onnx.export (optimum text-generation-with-past contract) + "
        "onnxruntime.transformers.optimizer(model_type=gpt2, opt_level=0)",
        "opset": OPSET,
        "fused_operators": fused,
        "external_data": external,
        "export_seconds": round(export_s, 1),
        "spec": {"num_layers": layers, "num_kv_heads": kv, "head_dim": head_dim, "vocab_size": cfg.vocab_size},
    }


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quantize_ort_dynamic(src_dir: Path, dest: Path) -> dict[str, Any]:
    """The optimized fp32 export with int8 weights: ``quantize_dynamic`` (ONNX Runtime's defaults: int8
    weights per tensor, activations quantized at run time)."""
    import onnx

    quantization = _import_ort_quantization()
    meta = read_peer_json(src_dir) or {}
    external = bool(meta.get("external_data"))
    with _quiet_warnings(), _quiet_logging():
        quantization.quantize_dynamic(
            str(src_dir / ONNX_FILE),
            str(dest / ONNX_FILE),
            weight_type=quantization.QuantType.QInt8,
            use_external_data_format=external,
            # the optimizer's contrib ops (SkipSimplifiedLayerNormalization) hide tensor types from onnx 1.14
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {
        "file": ONNX_FILE,
        "tool": "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)",
        "from": str(src_dir / ONNX_FILE),
        "external_data": external,
        "spec": meta.get("spec"),
    }


@contextlib.contextmanager
def _quiet_logging():
    """quantize_dynamic warns through the root logger about every tensor whose type onnx 1.14 cannot infer."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
