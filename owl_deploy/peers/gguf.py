"""llama.cpp peers: GGUF written by llama.cpp's own converter, requantized by ``llama_model_quantize``, and
the facts the benchmark needs from a GGUF (shapes, weight bytes read per token)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy.errors import OwlError, one_line
from owl_deploy.peers.common import GGUF_QUANTIZED, GGUF_WRITTEN, LLAMA_CPP, Log, _quiet, require


def _llama_cpp_version() -> str:
    require(LLAMA_CPP)
    import llama_cpp

    return str(llama_cpp.__version__)


def converter_script(log: Log | None = None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` of the installed llama-cpp-python (the wheel does not ship it).

    ``OWL_DEPLOY_LLAMA_CPP_CONVERT`` may name the script of a llama.cpp checkout; otherwise the sdist of
    the installed version is fetched once from PyPI (``pip download``) and its converter, ``conversion/``
    package and ``gguf-py`` are kept under the assets home.
    """
    env = os.environ.get("OWL_DEPLOY_LLAMA_CPP_CONVERT")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise OwlError(f"OWL_DEPLOY_LLAMA_CPP_CONVERT={env}: no such file")
        return path
    from owl_deploy import assets
    from owl_deploy.io import atomic_dir

    version = _llama_cpp_version()
    dest = assets.home() / "tools" / f"llama.cpp-convert-{version}"
    script = dest / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    (log or _quiet)(f"fetching llama.cpp's converter (llama-cpp-python {version} sdist, once) ...")
    with tempfile.TemporaryDirectory(prefix="owl-llama-sdist-") as scratch:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", scratch]
        proc = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = list(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no sdist"]
            raise OwlError(f"cannot fetch the llama-cpp-python {version} sdist for its converter: {detail[0]}")
        with tarfile.open(sdists[0]) as tar, atomic_dir(dest) as tmp:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(keep) and (m.isfile() or m.isdir()):
                    m.name = m.name[len(prefix) :]
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
            if not (tmp / "convert_hf_to_gguf.py").is_file():
                raise OwlError(f"{sdists[0].name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    return script


def write_gguf(model_dir: Path, dest: Path, outtype: str = "f32", log: Log | None = None) -> dict[str, Any]:
    """The HF folder as a GGUF of ``outtype`` (f32 or f16), written by llama.cpp's own converter."""
    if outtype not in GGUF_WRITTEN:
        raise OwlError(f"GGUF outtype must be one of {', '.join(GGUF_WRITTEN)}, got {outtype!r}")
    script = converter_script(log)
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(dest)]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not dest.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and not ln.startswith(" ")]
        raise OwlError(f"convert_hf_to_gguf.py failed on {model_dir}: {lines[-1] if lines else proc.returncode}")
    return {"file": dest.name, "tool": f"llama.cpp convert_hf_to_gguf.py --outtype {outtype}", "script": str(script)}


def quantize_gguf(src: Path, dest: Path, variant: str, threads: int | None = None) -> dict[str, Any]:
    """``src`` requantized to ``variant`` (q8_0, q4_k_m) by llama.cpp's ``llama_model_quantize``."""
    import ctypes

    require(LLAMA_CPP)
    import llama_cpp

    if variant not in GGUF_QUANTIZED:
        raise OwlError(f"GGUF quantization must be one of {', '.join(GGUF_QUANTIZED)}, got {variant!r}")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp logs every tensor otherwise
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_QUANTIZED[variant])
    params.nthread = int(threads or 0)
    params.allow_requantize = True
    with _captured_stderr() as err:  # llama.cpp prints a line per tensor (and every fallback) itself
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    text = err[0] if err else ""
    if rc != 0 or not dest.is_file():
        lines = [ln for ln in text.splitlines() if ln.strip()]
        raise OwlError(f"llama_model_quantize {src} -> {variant} failed (status {rc}): {lines[-1] if lines else ''}")
    types: dict[str, int] = {}
    for _nbytes, kind, _shape in gguf_metadata(dest)["tensors"].values():
        types[kind] = types.get(kind, 0) + 1
    fallback = next((ln.strip() for ln in text.splitlines() if "fallback quantization" in ln), None)
    return {
        "file": dest.name,
        "tool": f"llama_model_quantize {GGUF_QUANTIZED[variant]}",
        "from": str(src),
        "tensor_types": dict(sorted(types.items())),
        "fallback": fallback,  # llama.cpp's own count of tensors it had to give another type
    }


@contextlib.contextmanager
def _captured_stderr():
    """The process's stderr (fd 2, where C code writes) kept aside for the duration; the yielded list holds
    its text afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    text: list[str] = []
    with tempfile.TemporaryFile() as fh:
        try:
            os.dup2(fh.fileno(), 2)
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            fh.seek(0)
            text.append(fh.read().decode(errors="replace"))


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Shape facts and tensor bytes of a GGUF: layers, KV heads, head size, vocab, bytes per tensor."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise OwlError(f"{path}: not a readable GGUF ({one_line(exc)})") from exc

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None or not f.data:
            return default
        value = f.parts[f.data[0]]
        return value.tobytes().decode() if value.dtype == np.uint8 else value.tolist()[0]

    arch = field("general.architecture")
    heads = field(f"{arch}.attention.head_count")
    embd = field(f"{arch}.embedding_length")
    head_dim = field(f"{arch}.attention.key_length") or (embd // heads if embd and heads else None)
    tensors = {t.name: (int(t.n_bytes), t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}
    vocab_field = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(vocab_field.data) if vocab_field is not None else None
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"][2][-1]
    return {
        "architecture": arch,
        "file_type": field("general.file_type"),
        "num_layers": field(f"{arch}.block_count"),
        "num_kv_heads": field(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "tensors": tensors,
    }


def gguf_weight_bytes(meta: dict[str, Any]) -> int:
    """Weight bytes llama.cpp reads per decoded token: every tensor once, the token embedding one row
    (or whole when it doubles as the output matrix: tied embeddings)."""
    tensors = meta["tensors"]
    total = 0
    for name, (nbytes, _kind, shape) in tensors.items():
        if name == "token_embd.weight" and "output.weight" in tensors:
            rows = shape[-1] if shape else 1
            total += nbytes // max(rows, 1)
        else:
            total += nbytes
    return total
