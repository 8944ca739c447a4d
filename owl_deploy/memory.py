"""Memory: what a stage holds, what it will hold, and a refusal up front when that will not fit.

A stage killed by the OOM killer halfway loses its work and says nothing useful; a stage that
refuses before loading the model names itself, its estimate and the limit in one line. The
estimates are the stage's weight-proportional copies (fp32 weights, the tracer's, the optimizer's)
plus what its settings put beside them (calibration activations, Hessians, logits): each term is
written out so that ``--max-memory`` errors and ``memory.json``-style records can show it, and the
constants are the peaks measured on SmolLM2-135M and Qwen2.5-Coder-1.5B (docs/results.md, "Memory").
"""

from __future__ import annotations

import json
import math
import re
import resource
import struct
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from owl_deploy.errors import OwlError

GB = 1e9
MB = 1024.0 * 1024.0
#: torch, transformers and the engines' libraries resident before any model (measured: 0.5-0.7 GB)
BASE_BYTES = 0.8 * GB
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Resident set size of this process now."""
    import psutil

    return psutil.Process().memory_info().rss / MB


def rss_anon_mb() -> float:
    """Anonymous resident memory of this process now (what it allocated; file pages it maps, such as a
    memory-mapped fp32 checkpoint, are in RSS too but the kernel can drop and re-read them)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return rss_mb()


class Phases:
    """Per phase of a stage: the peak RSS so far when it ended, the peak of its anonymous memory (sampled
    every 0.2 s by a daemon thread) and the RSS it left behind.

    The RSS peak is cumulative (the kernel keeps one high-water mark), so the phase that raised it is the
    one whose ``peak_mb`` jumps; ``anon_peak_mb`` is the phase's own; ``rss_mb`` shows what a phase kept."""

    def __init__(self, interval: float = 0.2) -> None:
        self.record: dict[str, dict[str, float]] = {}
        self._anon = [rss_anon_mb()]  # the running phase's peak, shared with the sampler
        self._lock = threading.Lock()  # a sample read before a mark must not land in the next phase
        stop = threading.Event()
        args = (self._anon, self._lock, stop, interval)
        threading.Thread(target=_sample_anon, args=args, daemon=True).start()
        weakref.finalize(self, stop.set)  # the sampler ends with the stage that made it

    def mark(self, phase: str) -> None:
        with self._lock:
            now = rss_anon_mb()
            anon, self._anon[0] = max(self._anon[0], now), now
        self.record[phase] = {"peak_mb": round(peak_rss_mb()), "anon_peak_mb": round(anon), "rss_mb": round(rss_mb())}


def _sample_anon(peak: list[float], lock: threading.Lock, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        with lock:
            peak[0] = max(peak[0], rss_anon_mb())


# ---------------------------------------------------------------- limits
#: a limit: bytes, "auto" (what is free when the stage starts) or None (no limit)
Limit = float | str | None


def parse_limit(text: str | None) -> Limit:
    """``--max-memory``: ``auto`` (what the machine has free when a stage starts), ``off``, or a size
    (``9G``, ``9000MB``, ``1.5T``; decimal units)."""
    text = "auto" if text is None else str(text).strip().lower()
    if text in ("off", "none", "no"):
        return None
    if text == "auto":
        return "auto"
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise OwlError(f"--max-memory must be 'auto', 'off' or a size such as 9G or 9000M, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def available_bytes() -> float:
    """Memory this process can grow into without swapping: the kernel's MemAvailable plus what it holds."""
    import psutil

    return float(psutil.virtual_memory().available + psutil.Process().memory_info().rss)


# ---------------------------------------------------------------- model shape, read without loading
@dataclass(frozen=True)
class Shape:
    """What the estimates need of a Hugging Face model folder: parameters and the config's sizes."""

    params: int
    #: an fp32 checkpoint is mapped, not copied: its pages are torch's weights, read from the file on demand
    fp32_checkpoint: bool
    checkpoint_bytes: float
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int

    @property
    def fp32_bytes(self) -> float:
        """The model as every stage loads it (fp32)."""
        return 4.0 * self.params

    @property
    def mapped_bytes(self) -> float:
        """Checkpoint pages mapped beside the fp32 copy (a bf16 or fp16 checkpoint); none for an fp32 one."""
        return 0.0 if self.fp32_checkpoint else self.checkpoint_bytes


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensors of one .safetensors file (dtype, shape, data_offsets) from its JSON header, and where their
    data starts in the file: the weights are not read."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + size


def model_shape(folder: str | Path) -> Shape | None:
    """The shape of a model folder (config.json + safetensors), or None when it is not one (a .gguf, .bin)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    try:
        cfg = json.loads((folder / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder's sizes inside
        if not files:
            return None
        tensors = [t for f in files for t in safetensors_header(f)[0].values()]
        fp32 = all(t["dtype"] == "F32" for t in tensors)
        return Shape(
            params=sum(math.prod(t["shape"]) for t in tensors),
            fp32_checkpoint=fp32,
            checkpoint_bytes=float(sum(f.stat().st_size for f in files)),
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            intermediate=int(cfg.get("intermediate_size") or 4 * cfg["hidden_size"]),
            vocab=int(cfg["vocab_size"]),
            heads=int(cfg["num_attention_heads"]),
        )
    except (OSError, ValueError, KeyError, struct.error):
        return None


# ---------------------------------------------------------------- estimates
@dataclass
class Estimate:
    """A stage's expected peak RSS as named terms (bytes)."""

    stage: str
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GB:.1f}" for name, value in self.terms.items() if value >= 0.05 * GB)
        return f"{self.total / GB:.1f} GB ({parts})"


def _allowed(limit: Limit) -> float:
    """A limit in bytes (``auto``: what is free now; None: unbounded)."""
    if limit is None:
        return math.inf
    return available_bytes() if limit == "auto" else float(limit)


def fits(estimate: Estimate, limit: Limit) -> bool:
    """Whether ``estimate`` is within ``limit`` (None: always)."""
    return estimate.total <= _allowed(limit)


def check(estimate: Estimate | None, limit: Limit) -> None:
    """Refuse before the stage loads anything when its estimate passes ``limit`` (see ``parse_limit``)."""
    if estimate is None:
        return
    allowed = _allowed(limit)
    if estimate.total > allowed:
        what = "free now" if limit == "auto" else "allowed by --max-memory"
        raise OwlError(
            f"{estimate.stage} would need about {estimate.describe()}, more than the {_size(allowed)} {what}: "
            "free memory, choose smaller settings, or pass --max-memory off (estimates: docs/results.md, Memory)"
        )


def _size(n: float) -> str:
    """0.9 GB and up in GB (one decimal), less in MB: a small limit does not read as "0.0 GB"."""
    return f"{n / GB:.1f} GB" if n >= 0.95 * GB else f"{n / 1e6:.0f} MB"


def _block_params(shape: Shape) -> int:
    """A decoder block's linear weights, at most (attention as if it had as many key/value heads as queries)."""
    return 4 * shape.hidden**2 + 3 * shape.hidden * shape.intermediate


def _block_forward(shape: Shape, tokens: int, seqlen: int) -> float:
    """fp32 temporaries of one block's forward over ``tokens`` tokens in windows of ``seqlen``: the MLP's
    three intermediate-wide tensors, a handful of hidden-wide ones and the attention scores."""
    return 4.0 * tokens * (3 * shape.intermediate + 6 * shape.hidden + 2 * shape.heads * seqlen)


def prune_estimate(
    shape: Shape, nsamples: int, seqlen: int, batch_size: int, hessian: bool, streamed: bool = False
) -> Estimate:
    """Whole model: the model in fp32 (blocks are pruned in place) and the mapped checkpoint. Streamed
    (``owl_deploy.lazy``): one block in fp32 plus the largest tensor outside the blocks (the embeddings, held
    for the capture of block 0's inputs and again when copied to the output). Either way every calibration
    window's hidden states twice (a block's inputs and outputs), one batch's block temporaries, and
    SparseGPT's float64 ``X^T X`` per linear of the block being pruned (plus its inverse)."""
    terms = {"libraries": BASE_BYTES}
    if streamed:
        terms["one block"] = 4.0 * _block_params(shape)
        terms["embeddings"] = 4.0 * shape.vocab * shape.hidden
    else:
        terms["fp32 weights"] = shape.fp32_bytes
        terms["mapped checkpoint"] = shape.mapped_bytes
    terms["calibration activations"] = 2 * 4.0 * nsamples * seqlen * shape.hidden
    terms["block forward"] = _block_forward(shape, min(batch_size, nsamples) * seqlen, seqlen)
    if hessian:
        terms["hessians"] = 2 * 8.0 * (6 * shape.hidden**2 + shape.intermediate**2)
    return Estimate("prune", terms)


def export_estimate(shape: Shape, int8: bool, deepsparse_graphs: int) -> Estimate:
    """The largest of the export's phases (measured on Qwen2.5-Coder-1.5B, docs/results.md, "Memory").

    The trace holds torch's fp32 weights (an fp32 checkpoint is mapped and streamed from the file, not held:
    int8's SmoothQuant scales each projection weight as the graph rewrite reads it, not in torch) and the
    tracer's own memory (1.5 GB + 0.2x the weights); int8's rewrite writes each quantized weight to a file.
    An engine check holds the compiler's scratch (1.8 GB) and what its graphs hold: each DeepSparse
    graph about 0.8x the weights it runs in fp32, 0.4x in int8 (a quarter of the projections, the embeddings
    in fp32): Qwen2.5-Coder-1.5B's int8 check measured 4.17 GB anonymous with both graphs, 13.1 GB in fp32."""
    embeddings = 4.0 * shape.vocab * shape.hidden
    graph = (shape.fp32_bytes - embeddings) / 4 + embeddings if int8 else shape.fp32_bytes
    held = 0.0 if shape.fp32_checkpoint else shape.fp32_bytes
    phases = {
        "trace": {
            "libraries": BASE_BYTES,
            "fp32 weights": held,
            "tracer": 1.5 * GB + 0.2 * shape.fp32_bytes,
        },
        "engines": {
            "libraries": BASE_BYTES,
            "compiler": 1.8 * GB,
            "engine graphs": max(deepsparse_graphs, 1) * (0.4 if int8 else 0.8) * graph,
        },
    }
    worst = max(phases.values(), key=lambda t: sum(t.values()))
    return Estimate("export", worst)


def recover_estimate(
    shape: Shape,
    batch_size: int,
    seqlen: int,
    method: str,
    bf16: bool,
    teacher: bool,
    checkpointing: bool,
    lean: bool = False,
) -> Estimate:
    """The fp32 model, its masks (a byte per weight), bf16 copies when autocasting, the optimizer (masked:
    gradients and AdamW's two moments of every weight), the activations kept for the backward pass and the
    logits (cross-entropy and its gradient). ``lean`` (LoRA in bf16, owl_deploy.recover): the block linears train
    in bf16 with no masks and no copies (masked LoRA: its keep masks and bf16 effective weights), then the fp32
    model and its masks come back for the merge; the larger of the two phases."""
    tokens = batch_size * seqlen
    per_layer = 4.0 * tokens * (12 * shape.hidden + 4 * shape.intermediate + 2 * shape.heads * seqlen)
    activations = (2 * per_layer if checkpointing else shape.layers * per_layer) * (0.7 if bf16 else 1.0)
    blocks = min(shape.fp32_bytes, 4.0 * shape.layers * _block_params(shape))  # the block linears' fp32 bytes
    train = {
        "libraries": BASE_BYTES,
        "fp32 weights": shape.fp32_bytes,
        "mapped checkpoint": shape.mapped_bytes,
        "masks": shape.fp32_bytes / 4,
        "bf16 weight copies": shape.fp32_bytes / 2 if bf16 else 0.0,
        "optimizer": 3 * shape.fp32_bytes if method == "masked" else 0.0,
        "activations": activations,
        "logits": 4 * 4.0 * tokens * shape.vocab,
    }
    if teacher:  # under bf16 autocast its block linears are held in bf16 (owl_deploy.recover.teacher_to_bf16)
        train["teacher"] = shape.fp32_bytes - (blocks / 2 if bf16 else 0.0)
        # its logits, and the KL's: both sides divided by the temperature and log-softmaxed, and their gradients
        train["distillation logits"] = 4 * 4.0 * tokens * shape.vocab
    if lean:
        train |= {"fp32 weights": shape.fp32_bytes - blocks, "bf16 block weights": blocks / 2}
        train |= {"masks": 0.0, "bf16 weight copies": 0.0}
        if method == "masked-lora":  # its keep masks, and the bf16 effective weights kept for the backward pass
            # update temporaries: measured, not explained — the 1.5B model's 120-step run peaked 2,439 MiB over the
            # other terms (18,337 against 15,898 MiB; the per-linear bf16 temporaries of the update, as the heap keeps
            # them, is a guess)
            train |= {"masks": blocks / 4, "bf16 weight copies": blocks / 2, "update temporaries": blocks / 2}
        # the teacher is freed before the merge (owl_deploy.recover.recover)
        merge = {"libraries": BASE_BYTES, "fp32 weights": shape.fp32_bytes, "mapped checkpoint": shape.mapped_bytes}
        # the pruned model's masks and the merged model's, compared (measured: 12.3 GB peak in this phase, 1.5B)
        merge |= {"masks": 2 * shape.fp32_bytes / 4, "logits": 4 * 4.0 * 512 * shape.vocab}
        if sum(merge.values()) > sum(train.values()):
            train = merge
    return Estimate("recover", train)
