"""A model whose weights stay in their safetensors files until a block is used (issue 18).

``prune`` holds one decoder block at a time: the model is built as a skeleton (parameters on the
``meta`` device, buffers such as rotary frequencies real), a block's weights are read from the checkpoint
when the sequential runner reaches it, and once pruned the block is written to its own shard of the
output folder and dropped. The layers outside the blocks (embeddings, final norm) are read only for the
capture of block 0's inputs and copied to the output tensor by tensor at the end; the output embeddings
are never read at all (the capture stops at the last block). What stays resident is the libraries, one
block, the calibration stream and, briefly, the largest single tensor.

``Resident`` is the same interface over a model already in memory (tests, the quality study): no-ops.
Results are identical either way: the same fp32 weights go through the same forwards (tested).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from owl_deploy.errors import OwlError
from owl_deploy.memory import safetensors_header
from owl_deploy.model import blocks_prefix, decoder_blocks

SHARD_BYTES = 512 * 2**20  # outside the blocks: shards of at most this (a larger tensor gets one of its own)
INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def read_tensor(fh, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor read from an open .safetensors file with plain reads into its own buffer: nothing is mapped,
    so the file's pages never count in this process's RSS (safetensors' reader maps the whole file)."""
    start, end = entry["data_offsets"]
    buf = torch.empty(end - start, dtype=torch.uint8)
    fh.seek(data_start + start)
    if fh.readinto(buf.numpy()) != end - start:
        raise OwlError(f"{fh.name} is truncated: a tensor's data ends past the end of the file")
    if entry["dtype"] not in DTYPES:
        raise OwlError(f"{fh.name}: tensors of dtype {entry['dtype']} cannot be read block by block")
    return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


class Resident:
    """Blocks already in memory: nothing to load, release or write."""

    def load(self, index: int) -> None:
        pass

    def release(self, index: int) -> None:
        pass

    def finish(self, index: int) -> None:
        pass

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        yield


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (dotted) by ``value`` (a parameter stays a parameter)."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = value


class Streamed:
    """The skeleton of the model in ``folder`` with its weights read block by block.

    ``out`` (optional) receives each finished block as a shard, and by :meth:`write_rest` every tensor outside
    the blocks plus the shard index. Raises ``OwlError`` when the checkpoint's tensor names are not the
    model's own (a checkpoint transformers would rename or re-tie on load): the caller then loads it whole.
    """

    def __init__(self, folder: Path, out: Path | None = None, dtype: torch.dtype = torch.float32):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from owl_deploy.model import quiet_transformers

        self.folder = Path(folder)
        self.out = out
        self.dtype = dtype
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise OwlError(f"{self.folder} has no .safetensors weights to read block by block")
        self.where: dict[str, Path] = {}
        self.entries: dict[str, dict] = {}
        self.data_start: dict[Path, int] = {}
        for f in files:
            try:
                header, self.data_start[f] = safetensors_header(f)
            except (OSError, ValueError) as exc:
                raise OwlError(f"cannot read the safetensors header of {f}: {exc}") from exc
            end = max((e["data_offsets"][1] for e in header.values()), default=0)
            if f.stat().st_size < self.data_start[f] + end:
                raise OwlError(f"cannot load model from {self.folder}: {f.name} is truncated")
            self.where.update(dict.fromkeys(header, f))
            self.entries.update(header)
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(self.folder)
                with init_empty_weights():
                    self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as exc:  # transformers raises many types for a bad config
            raise OwlError(f"cannot build {self.folder}'s model from its config: {exc}") from exc
        self.model.eval()
        self.model.config.use_cache = False
        self.blocks = decoder_blocks(self.model)
        self.prefix = blocks_prefix(self.model) + "."
        self._check_names()
        self.block_keys = [
            sorted(k for k in self.where if k.startswith(f"{self.prefix}{i}.")) for i in range(len(self.blocks))
        ]
        in_blocks = {k for keys in self.block_keys for k in keys}
        self.rest_keys = sorted(k for k in self.where if k not in in_blocks)
        out_emb = self.model.get_output_embeddings()
        out_names = {f"{n}.weight" for n, m in self.model.named_modules() if m is out_emb and out_emb is not None}
        self.capture_keys = [k for k in self.rest_keys if k not in out_names]  # what runs before the blocks
        self.shards: dict[str, str] = {}  # tensor name -> shard file in ``out``
        self.total_bytes = 0
        self.n_shards = len(self.blocks) + len(self._rest_groups())

    def _check_names(self) -> None:
        """Every parameter must come from the checkpoint (tied output embeddings aside) and every checkpoint
        tensor must be one of the model's: otherwise transformers would rename or tie it on load."""
        state = set(self.model.state_dict())
        unknown = sorted(set(self.where) - state)
        tied = getattr(self.model.config.get_text_config(), "tie_word_embeddings", False)
        out_emb = self.model.get_output_embeddings()
        missing = sorted(
            n
            for n, _ in self.model.named_parameters()
            if n not in self.where and not (tied and out_emb is not None and n == self._name_of(out_emb) + ".weight")
        )
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} checkpoint tensors the model does not have ({', '.join(unknown[:2])})")
        if missing:
            problems.append(f"{len(missing)} weights not in the checkpoint ({', '.join(missing[:2])})")
        if problems:
            raise OwlError(f"{self.folder} cannot be read block by block: " + "; ".join(problems))

    def _name_of(self, module: nn.Module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module)

    def _read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor in the model's dtype (floating point ones), read from its file without mapping it."""
        for f in dict.fromkeys(self.where[k] for k in keys):
            with open(f, "rb") as fh:
                for k in keys:
                    if self.where[k] == f:
                        t = read_tensor(fh, self.data_start[f], self.entries[k])
                        yield k, t.to(self.dtype) if t.is_floating_point() else t

    def _materialize(self, keys: list[str]) -> None:
        for name, tensor in self._read(keys):
            _set_tensor(self.model, name, tensor)

    def _drop(self, keys: list[str]) -> None:
        for name in keys:
            _set_tensor(self.model, name, _get_tensor(self.model, name).detach().to("meta"))

    # ------------------------------------------------------------- the runner's interface
    def load(self, index: int) -> None:
        self._materialize(self.block_keys[index])

    def release(self, index: int) -> None:
        self._drop(self.block_keys[index])

    def finish(self, index: int) -> None:
        """Write block ``index`` as shard ``index + 1`` (if there is an output) and drop its weights."""
        if self.out is not None:
            self._write_shard(index, {k: _get_tensor(self.model, k).detach() for k in self.block_keys[index]})
        self.release(index)

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """The layers before the blocks, loaded for a capture of block 0's inputs, dropped after."""
        self._materialize(self.capture_keys)
        try:
            yield
        finally:
            self._drop(self.capture_keys)

    # ------------------------------------------------------------- output
    def _rest_groups(self) -> list[list[str]]:
        """The tensors outside the blocks, in shards of at most SHARD_BYTES (in the model's dtype)."""
        groups: list[list[str]] = []
        size = 0
        for k in self.rest_keys:
            n = self.dtype.itemsize * max(1, int(torch.Size(self.entries[k]["shape"]).numel()))
            if not groups or size + n > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += n
        return groups

    def _shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.n_shards:05d}.safetensors"

    def _write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        assert self.out is not None
        name = self._shard_name(index + 1)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.out / name), metadata={"format": "pt"})
        self.shards.update(dict.fromkeys(tensors, name))
        self.total_bytes += sum(v.numel() * v.element_size() for v in tensors.values())

    def write_rest(self) -> None:
        """Copy every tensor outside the blocks (in the model's dtype) and write the shard index and config."""
        assert self.out is not None
        for n, group in enumerate(self._rest_groups()):
            self._write_shard(len(self.blocks) + n, dict(self._read(group)))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.shards.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        self.model.config.use_cache = True  # off for calibration only, as in a whole-model load
        self.model.config.save_pretrained(self.out)
        gen = self.folder / "generation_config.json"
        if gen.is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(self.folder).save_pretrained(self.out)
