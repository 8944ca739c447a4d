"""Loading a model from a path (a Hugging Face folder or a .gguf file), saving it, and its structure.

Structure is discovered from modules, never guessed from a model's name: the decoder blocks are
the longest ``nn.ModuleList`` whose entries all share one class and hold ``nn.Linear`` layers.
(``specs.py`` turns what a user types - an asset name or a path - into the path these functions take.)
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
from torch import nn

from owl_deploy.errors import OwlError, one_line


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' informational chatter; real errors still raise."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: Path):
    """The tokenizer of a Hugging Face folder or a .gguf file."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            if path.is_file():
                return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise OwlError(f"cannot load tokenizer from {path}: {one_line(exc)}") from exc


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32):
    """The model of a Hugging Face folder or a .gguf file (dequantized), in eval mode, cache off (for
    calibration and evaluation)."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            if path.is_file():
                # GGUF dequantization shows its own progress bar: it takes tens of seconds
                hf_logging_bars(True)
                model, info = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=dtype, output_loading_info=True
                )
                forget_gguf_quantization(model)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as exc:
        raise OwlError(f"cannot load model from {path}: {one_line(exc)}") from exc
    check_loading(path, type(model).__name__, info)
    model.eval()
    model.config.use_cache = False
    return model


def check_loading(path: Path, model_class: str, info: dict) -> None:
    """Refuse a load that left weights freshly initialised or ignored checkpoint tensors (e.g. a folder
    whose config names another architecture than its weights): the model would be random, not the user's."""
    problems = []
    for key, what in (
        ("missing_keys", "freshly initialised (not in the checkpoint)"),
        ("unexpected_keys", "in the checkpoint but not used by the model"),
        ("mismatched_keys", "of a different shape in the checkpoint"),
    ):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or [])
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} weights {what}: {shown}")
    if problems:
        raise OwlError(f"cannot load {path} as {model_class}: " + "; ".join(problems))


def hf_logging_bars(on: bool) -> None:
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


def forget_gguf_quantization(model: nn.Module) -> None:
    """A GGUF load leaves the (already dequantized) model marked as quantized, which blocks
    ``save_pretrained``; the weights are plain fp32 tensors, so drop the marker."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


def save_model(model: nn.Module, tokenizer, out: Path) -> None:
    """Save as safetensors with the tokenizer, quietly (progress bars off)."""
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def save_tokenizer(tokenizer, out: Path) -> None:
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer.save_pretrained(out)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest ModuleList of same-class modules containing nn.Linear."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise OwlError(f"no decoder blocks found in {type(model).__name__}: no list of blocks with nn.Linear layers")
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside one block, by its name relative to the block (e.g. ``self_attn.q_proj``)."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def blocks_prefix(model: nn.Module) -> str:
    """The dotted path of the decoder block list inside ``model`` (e.g. ``model.layers``)."""
    blocks = decoder_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise OwlError("decoder blocks are not reachable by name")  # cannot happen for a real module tree


def named_block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every pruned linear by its full module name (``model.layers.3.mlp.up_proj``), block by block."""
    prefix = blocks_prefix(model)
    return {
        f"{prefix}.{i}.{name}": lin
        for i, block in enumerate(decoder_blocks(model))
        for name, lin in block_linears(block).items()
    }


logging.getLogger("transformers").setLevel(logging.ERROR)


def mapped_dense(model: nn.Module, linears: list[nn.Linear], folder: Path | None) -> list[torch.Tensor] | None:
    """The block linears' weights as tensors mapped from ``folder``'s safetensors files (safetensors maps them
    copy-on-write; nothing is copied, and a study never writes them), when every one there holds exactly what
    the model holds now; else None.

    Why: a study (or a tune worker) restores the dense weights before every prune. A private copy of them is the
    model's size again in every worker (1.5B model: 5.2 GB); a mapping of the checkpoint is page cache, shared by
    the workers of one machine and given back under memory pressure (it is re-read from disk)."""
    if folder is None or not Path(folder).is_dir():
        return None
    from safetensors import safe_open

    names = {id(m): n for n, m in model.named_modules()}
    wanted = {f"{names[id(lin)]}.weight": i for i, lin in enumerate(linears)}
    found: list[torch.Tensor | None] = [None] * len(linears)
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in set(f.keys()) & wanted.keys():
                found[wanted[key]] = f.get_tensor(key)
    for lin, w in zip(linears, found, strict=True):
        if w is None or w.dtype != lin.weight.dtype or not torch.equal(w, lin.weight):
            return None
    return found  # type: ignore[return-value]
