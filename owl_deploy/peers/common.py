"""The names every peer module shares: engines, variants, files, and the one-line check for the extra."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from owl_deploy.errors import OwlError, one_line

LLAMA_CPP = "llama.cpp"
ORT_STANDARD = "ort-standard"
PEER_ENGINES = (LLAMA_CPP, ORT_STANDARD)
#: GGUF variants: written by the converter (f32, f16) or requantized from the f32 file (llama_ftype name)
GGUF_WRITTEN = ("f32", "f16")
GGUF_QUANTIZED = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    # on request: K-quants need rows of 256 weights and fall back (to q5_0/q8_0) on narrower models, such
    # as SmolLM2-135M's 576; these block-32 types never do
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
}
ORT_VARIANTS = ("dense", "dense-int8")
DEFAULT_PEERS = ("llama.cpp/f32", "llama.cpp/q8_0", "llama.cpp/q4_k_m", "ort-standard/dense", "ort-standard/dense-int8")
PEER_JSON = "peer.json"
GGUF_FILE = "model.gguf"
ONNX_FILE = "model.onnx"
#: what the peers extra installs; the message of every "not installed" error
EXTRA_HINT = "install the optional extra: pip install -e '.[peers]' (see pyproject.toml)"
#: optimum's default ONNX opset for LLaMA-family decoders
OPSET = 14
#: weights above this many bytes go to ONNX external data (protobuf caps a file at 2 GiB)
EXTERNAL_DATA_BYTES = 1_800_000_000

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


# ---------------------------------------------------------------- names and checks
def split_key(key: str) -> tuple[str, str]:
    """``"llama.cpp/q8_0"`` -> ("llama.cpp", "q8_0"), checked against the known engines and variants."""
    engine, sep, variant = key.partition("/")
    if not sep or engine not in PEER_ENGINES or not variant:
        raise OwlError(f"unknown peer {key!r}; use ENGINE/VARIANT with ENGINE one of {', '.join(PEER_ENGINES)}")
    return engine, variant


def _check_prepared_variant(engine: str, variant: str) -> None:
    known = (*GGUF_WRITTEN, *GGUF_QUANTIZED) if engine == LLAMA_CPP else ORT_VARIANTS
    if variant not in known:
        raise OwlError(f"cannot prepare {engine}/{variant}: {engine} variants are {', '.join(known)}")


def require(engine: str) -> None:
    """Fail in one line when the optional extra a peer needs is missing (the core install has none)."""
    try:
        if engine == LLAMA_CPP:
            import llama_cpp  # noqa: F401
        else:
            _import_ort_quantization()
    except ImportError as exc:
        raise OwlError(f"{engine} peers are not available ({one_line(exc)}); {EXTRA_HINT}") from None


def available(engine: str) -> str | None:
    """None when ``engine``'s peers can run here, else why not (for tests and messages)."""
    try:
        require(engine)
    except OwlError as exc:
        return str(exc)
    return None


def _import_ort_quantization():
    """``onnxruntime.quantization`` reads ``TensorProto.INT4/UINT4`` at import, which onnx < 1.16 lacks
    (deepsparse pins onnx 1.14): give the enum the two values so the int8 tool imports; no int4 is made."""
    import onnx

    for name, value in (("INT4", 22), ("UINT4", 21)):
        if not hasattr(onnx.TensorProto, name):
            setattr(onnx.TensorProto, name, value)
    import ml_dtypes  # noqa: F401  (the quantization tool's own dependency: a clear message when missing)
    from onnxruntime import quantization

    return quantization


# ---------------------------------------------------------------- peer folders
def read_peer_json(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / PEER_JSON).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def artifact(folder: Path) -> Path:
    """The file an engine opens in a peer folder (``model.gguf`` or ``model.onnx``)."""
    for name in (GGUF_FILE, ONNX_FILE):
        if (folder / name).is_file():
            return folder / name
    raise OwlError(f"{folder}: no {GGUF_FILE} or {ONNX_FILE} (prepare the peers first)")
