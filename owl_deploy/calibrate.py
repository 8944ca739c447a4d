"""Sequential block-by-block calibration (owl-method.md, "Pruning methods: Sequential calibration").

The inputs of block 0 are captured once by running the real model forward with every decoder block
replaced by a recorder: the family's own code builds whatever its blocks need (Gemma's embedding scale,
OPT's learned positions, causal and sliding-window masks, rotary ``position_embeddings``), and each
recorder keeps the exact arguments its block was called with, so nothing is guessed per family and
per-layer arguments (e.g. Qwen2's sliding-window layers) come out right. After that only one block runs
at a time: run it with hooks to collect statistics, let the caller prune it, re-run it to produce the
next block's inputs. Calibration samples go through in small batches, so memory holds one stream of
hidden states ``[nsamples, seqlen, hidden]`` plus one batch of a block's activations.

Numerics: every statistic is accumulated in float64. Each hook call first reduces its own batch
(at most ``batch_size * seqlen`` tokens) in float32 and adds that partial to a float64 accumulator, so
nothing drifts across samples (the drift the reference notes for float32 running sums), while the hooks,
which see every token of every linear input, avoid converting whole activations to float64.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from owl_deploy.configs import COMPUTE_DTYPES
from owl_deploy.errors import OwlError
from owl_deploy.model import block_linears, decoder_blocks
from owl_deploy.versions import cpu_info


@dataclass
class LayerStats:
    """Input statistics of one ``nn.Linear`` over the calibration samples seen so far."""

    sq_sum: torch.Tensor  # float64 [in]: sum over all tokens of x_j^2
    xtx: torch.Tensor | None  # float64 [in, in]: sum over all tokens of x x^T (SparseGPT only)
    nsamples: int = 0  # calibration samples (sequences), the reference's normaliser

    @property
    def sq_norm(self) -> torch.Tensor:
        """Wanda's ``s_j``: mean over samples of sum over tokens of x_j^2 (owl-method.md, OWL item 1)."""
        return self.sq_sum / max(self.nsamples, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """SparseGPT's ``H = 2/n * sum X X^T`` in float64, n = number of samples (as in the reference)."""
        if self.xtx is None:
            raise RuntimeError("the Hessian was not collected for this layer")
        return self.xtx * (2.0 / max(self.nsamples, 1))


class _Collector:
    """Forward pre-hooks on one block's linears, accumulating LayerStats of their inputs.

    q/k/v (and gate/up) receive the very same input tensor; its reduction is computed once and added
    to each of them, which cuts the hook cost (and, for SparseGPT, the X^T X products) by about half.
    """

    def __init__(self, linears: dict[str, nn.Linear], hessian: bool):
        self.linears = linears
        self.hessian = hessian
        self.stats: dict[str, LayerStats] = {}
        for name, lin in linears.items():
            n = lin.in_features
            xtx = torch.zeros(n, n, dtype=torch.float64) if hessian else None
            self.stats[name] = LayerStats(torch.zeros(n, dtype=torch.float64), xtx)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.batch = 0  # samples in the block call under way (set by the runner: OPT flattens to 2-D)
        self.seconds = 0.0  # spent in the hooks (reductions + accumulation), inside the block forwards
        # a forward may end once every linear has seen its input, if the first batch called each exactly once
        # (a dense block; a mixture-of-experts block that skips or repeats an expert never stops early)
        self.once_each: bool | None = None
        self._calls: list[str] = []
        self.stop_early = False

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._last is not None and self._last[0] is x:
            return self._last[1], self._last[2]
        flat = x.detach().reshape(-1, x.shape[-1])
        # a bf16 input (under autocast: o_proj's, down_proj's) is copied to float32 once and squared in that copy;
        # squaring into a second buffer measured 4x slower per call (the allocator's fresh pages), same bits
        sq = (flat.float().square_() if flat.dtype != torch.float32 else flat.square()).sum(0).double()
        xtx = None
        if self.hessian:
            flat = flat.float()
            # the hooks run inside the block's autocast region: without this, X^T X would be a bf16 matmul
            with torch.autocast("cpu", enabled=False):
                xtx = (flat.T @ flat).double()
        self._last = (x, sq, xtx)
        return sq, xtx

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            t0 = time.perf_counter()
            x = args[0]
            sq, xtx = self._reduce(x)
            st = self.stats[name]
            st.sq_sum += sq
            if xtx is not None:
                st.xtx += xtx
            st.nsamples += self.batch
            self.seconds += time.perf_counter() - t0
            self._calls.append(name)
            done = self.stop_early and self.once_each and len(self._calls) == len(set(self._calls)) == len(self.linears)
            if done:
                raise _StopForward  # every linear has seen this batch: the rest of the forward feeds no statistic

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[_Collector]:
        # pre-hooks: a statistic needs only the input, so the last one can end the forward before its matmul
        handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in self.linears.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last = None

    def end_batch(self) -> None:
        """Drop the reference to the last input so a batch's activations can be freed."""
        self._last = None
        if self.once_each is None:
            self.once_each = sorted(self._calls) == sorted(self.linears)
        self._calls = []


@dataclass
class BlockCall:
    """The arguments a block was called with, apart from its hidden-states input."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks (final norm, lm_head) is needed."""


def _run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], dict[int, list[BlockCall]]]:
    """Run the model up to its blocks once per batch with every block replaced by a recorder.

    Returns the block-0 hidden states of each batch and, for every batch size that occurs, the call
    arguments of every block (masks, rotary embeddings, position ids). These do not depend on the token
    ids: calibration windows are full-length with no padding, so every sample gets the same mask.
    """
    n_blocks = len(blocks)
    hidden: list[torch.Tensor] = []
    calls: dict[int, list[BlockCall]] = {}
    record: list[BlockCall | None] = [None] * n_blocks

    def recorder(index: int):
        def forward(*args, **kwargs):
            if args:
                h, rest = args[0], args[1:]
            elif "hidden_states" in kwargs:
                h, rest = kwargs.pop("hidden_states"), ()
            else:
                raise OwlError(f"decoder block {index} was called without a hidden-states input")
            if index == 0:
                hidden.append(h.detach())
            record[index] = BlockCall(tuple(rest), dict(kwargs))
            if index == n_blocks - 1:
                raise _StopForward
            return h

        return forward

    own_forward = [vars(b).get("forward") for b in blocks]  # an instance-level forward, if any, is restored
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        with torch.no_grad():
            for start in range(0, len(input_ids), batch_size):
                batch = input_ids[start : start + batch_size]
                record[:] = [None] * n_blocks
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise OwlError("the model's forward did not reach its last decoder block")
                if any(r is None for r in record):
                    missing = [i for i, r in enumerate(record) if r is None]
                    raise OwlError(f"the model's forward skipped decoder blocks {missing}")
                calls.setdefault(len(batch), list(record))  # type: ignore[arg-type]
    finally:
        for block, own in zip(blocks, own_forward, strict=True):
            if own is None:
                vars(block).pop("forward", None)
            else:
                block.forward = own
    if len(hidden) != -(-len(input_ids) // batch_size):
        raise OwlError("block 0 was not called exactly once per calibration batch")
    return hidden, calls


# AVX512-BF16 without AMX is fast on some CPUs and slow on others, by vendor as far as measured (torch 2.13):
# an Intel Xeon ran bf16 GEMMs at 0.6x float32 and OWL+Wanda calibration at 0.66x
# (benchmarks/results/prune_speed_128x512_owl_wanda_float32-bfloat16-xeon-avx512.md), LoRA training at 0.63x;
# a Zen 5 EPYC trained 2.1x faster in bf16 (docs/results.md, "Recovery").
BF16_FAST_VENDORS = frozenset({"AuthenticAMD"})
AUTO_DTYPE_ENV = "OWL_AUTO_COMPUTE_DTYPE"  # pins what ``auto`` means in this process (see worker_env)


def resolve_dtype(name: str) -> str:
    """``auto`` -> bfloat16 where bf16 pays on this CPU, else float32; explicit names win.

    A rule on the CPU's identity, never a timing: a GEMM probe timed in each process once decided this and flipped
    under load (0.57-0.98x on one Xeon with the other core busy), so two processes of one study (a Ray worker and
    its driver) pruned in different dtypes and disagreed. AMX: bfloat16 (calibration 2.2-2.4x faster on an AMX
    Xeon at a perplexity change within noise; docs/results.md). No native bf16 (AVX2): float32 (emulated bf16 is
    slower). AVX512-BF16 without AMX: bfloat16 on the vendors in BF16_FAST_VENDORS, float32 elsewhere.
    ``AUTO_DTYPE_ENV`` set in the environment overrides the rule (a Ray driver pins its workers with it:
    ``worker_env``)."""
    if name != "auto":
        return name
    pinned = os.environ.get(AUTO_DTYPE_ENV)
    if pinned:
        if pinned not in COMPUTE_DTYPES:
            raise OwlError(f"{AUTO_DTYPE_ENV}={pinned!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
        return pinned
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "bfloat16"
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "float32"
    return "bfloat16" if cpu_info()["vendor"] in BF16_FAST_VENDORS else "float32"


def worker_env() -> dict[str, str]:
    """The environment a study's Ray workers get from their driver: ``auto`` resolved once, on the driver's CPU,
    so every row of one study computes in one dtype whichever node (AMD or Intel, AMX or not) runs it."""
    return {AUTO_DTYPE_ENV: resolve_dtype("auto")}


def autocast_dtype(name: str) -> torch.dtype | None:
    """The dtype the calibration forwards autocast to (None: plain float32) for a compute-dtype setting."""
    return torch.bfloat16 if resolve_dtype(name) == "bfloat16" else None


class SequentialRunner:
    """Holds the hidden-state stream at the current block and moves it forward one block at a time.

    Usage per block ``i`` (in order): ``collect(i)`` runs the block with hooks and returns statistics;
    the caller then prunes the block's weights; ``advance(i)`` re-runs the (pruned) block so the stream
    becomes the inputs of block ``i + 1``. ``collect(i, advance=True)`` does both in one forward (the
    dense pass, where nothing changes between the two).
    """

    def __init__(
        self, model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, autocast: torch.dtype | None = None
    ):
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            shape = tuple(input_ids.shape)
            raise OwlError(f"calibration ids must be a non-empty [nsamples, seqlen] tensor, got {shape}")
        if batch_size < 1:
            raise OwlError(f"batch size must be >= 1, got {batch_size}")
        self.blocks = decoder_blocks(model)
        self.batch_size = batch_size
        self.autocast = autocast  # e.g. torch.bfloat16: matmuls of the block forwards in bf16 (AMX)
        self.nsamples = len(input_ids)
        self.hidden, self._calls = capture_block_inputs(model, self.blocks, input_ids, batch_size)
        self.position = 0  # index of the block whose inputs the stream holds
        # where the time goes: block forwards (hooks excluded) and the statistics the hooks reduce
        self.seconds = {"forward": 0.0, "statistics": 0.0}

    def _check(self, index: int) -> None:
        if index != self.position:
            raise RuntimeError(f"the stream is at block {self.position}, not {index}")

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast)

    def _call(self, index: int, h: torch.Tensor) -> BlockCall:
        return self._calls[len(h)][index]

    @torch.no_grad()
    def collect(self, index: int, hessian: bool = False, advance: bool = False) -> dict[str, LayerStats]:
        """Statistics of every linear of block ``index`` over all calibration samples."""
        self._check(index)
        block = self.blocks[index]
        collector = _Collector(block_linears(block), hessian)
        t0 = time.perf_counter()
        with collector.attached():
            for b, h in enumerate(self.hidden):
                collector.batch = len(h)
                # without advance the block's output is thrown away: after the first batch, each forward stops at
                # the pre-hook of its last linear (skips e.g. Llama's down_proj matmul and the residual add)
                collector.stop_early = not advance and b > 0
                try:
                    with self._autocast():
                        out = _run_block(block, h, self._call(index, h))
                except _StopForward:
                    out = None
                collector.end_batch()
                if advance:
                    self.hidden[b] = out
        self.seconds["forward"] += time.perf_counter() - t0 - collector.seconds
        self.seconds["statistics"] += collector.seconds
        if advance:
            self.position += 1
        return collector.stats

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the stream by block ``index``'s outputs (after the caller pruned it)."""
        self._check(index)
        block = self.blocks[index]
        t0 = time.perf_counter()
        for b, h in enumerate(self.hidden):
            with self._autocast():
                self.hidden[b] = _run_block(block, h, self._call(index, h))
        self.seconds["forward"] += time.perf_counter() - t0
        self.position += 1
