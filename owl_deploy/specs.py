"""What a user types for ``--model`` and ``--text``, turned into paths and loaded objects.

A model spec is an asset name (fetched on first use), a Hugging Face folder or a .gguf file; a text
spec is an asset name or a ``.txt``/``.jsonl`` file, or several joined with ``+`` (``data.py`` reads them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from owl_deploy import assets
from owl_deploy.errors import OwlError
from owl_deploy.model import load_causal_lm as _load_causal_lm
from owl_deploy.model import load_tokenizer as _load_tokenizer


def _asset_or_path(name: str, kind: str, known: set[str]) -> Path:
    """An asset of ``known`` (fetched on first use), or an existing path; anything else is a one-line error."""
    if name in known:
        return assets.ensure(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise OwlError(f"{kind} not found: {name!r} is neither a {kind} asset ({', '.join(sorted(known))}) nor a path")
    return path


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn ``--model`` into a path: an asset name (fetched on first use), a folder or a .gguf file."""
    path = _asset_or_path(str(spec), "model", assets.MODELS)
    if str(spec) in assets.MODELS:
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise OwlError(f"model file {path} is not a .gguf file; pass a Hugging Face folder or a .gguf")
        return path
    if not (path / "config.json").is_file():
        raise OwlError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def resolve_text(name: str) -> Path:
    """One part of a text spec: a text asset (fetched on first use) or an existing file."""
    path = _asset_or_path(name, "text", assets.TEXTS)
    if not path.is_file():
        raise OwlError(f"text {path} is not a file")
    return path


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer that belongs to ``--model``."""
    return _load_tokenizer(resolve_model(spec))


def load_causal_lm(spec: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Only the model (eval mode, cache off for calibration and evaluation)."""
    return _load_causal_lm(resolve_model(spec), dtype)


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` in eval mode on the CPU, in ``dtype`` (GGUF is dequantized); the tokenizer
    first, since it is the cheap one to find missing."""
    path = resolve_model(spec)
    tokenizer = _load_tokenizer(path)
    return _load_causal_lm(path, dtype), tokenizer
