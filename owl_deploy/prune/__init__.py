"""The prune stage: a registry of pruning methods, the OWL allocation and the block-by-block orchestration.

``prune_model`` works on an in-memory model (tests use tiny random models); ``run_prune`` is the
``owl-deploy prune`` command: validate, load, calibrate, prune, write a Hugging Face folder plus
``sparsity.json`` atomically (a failure leaves no output folder). "ref" is owl-method.md.

Design decisions:
- OWL ratios come from a separate **dense** sequential pass, as in the reference: block l's ratio uses
  the dense model's own inputs to block l, not the already-pruned stream. That pass is one forward of
  the model with hooks, about half of Wanda's cost (two forwards), so by default it runs on the first
  ``owl_nsamples = 8`` calibration windows only: that keeps OWL's overhead near 3% of Wanda's time, and
  on SmolLM2-135M (128 x 512, S = 0.7, lambda = 0.08) every block's allocated sparsity moved by at
  most 0.36 points against all 128 windows (16 and 32 windows: 0.46 and 0.36 points; the 16-point
  spread of lambda = 0.08 is ~40x larger). ``owl_nsamples=None`` (CLI ``--owl-nsamples all``) uses
  every window, exactly the reference.
- Bounds: a block's sparsity is clipped to [0, 0.99] and the others re-centred so the unweighted mean
  stays the target (allocation.owl_sparsities); impossible targets raise OwlError.
- N:M with OWL: per-block N from allocation.owl_nm (ref item 7); the global mean is then not
  guaranteed, and the report says what it is.
- ``compute_dtype="bfloat16"`` (opt-in) runs the calibration forwards under CPU autocast, which uses AMX
  matmuls where present; statistics stay float64 and weights float32. It is not a free speed-up: on
  SmolLM2-135M at 70% (32 x 512 calibration) it changed ~4% of the mask entries and moved the wiki NLL
  by -0.07 (uniform) and +0.14 (OWL), beyond the ~0.02 paired noise, so float32 stays the default.
- Per-layer ablation (``granularity="layer"``): one outlier ratio per linear and the allocation spread
  over all linears of the model; the linears' sparsities are then shifted by one common amount so the
  parameter-weighted mean (the measured global sparsity) stays the target.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from owl_deploy.allocation import (
    MAX_BLOCK_SPARSITY,
    MIN_BLOCK_SPARSITY,
    outlier_ratio,
    owl_nm,
    owl_sparsities,
    validate_owl,
)
from owl_deploy.calibrate import LayerStats, SequentialRunner
from owl_deploy.errors import OwlError
from owl_deploy.model import block_linears, blocks_prefix, decoder_blocks
from owl_deploy.prune.magnitude import magnitude_mask
from owl_deploy.prune.masks import parse_nm
from owl_deploy.prune.sparsegpt import sparsegpt_prune
from owl_deploy.prune.wanda import wanda_mask, wanda_scores

NM = tuple[int, int]


# ---------------------------------------------------------------- methods
def _prune_magnitude(linear: nn.Linear, stats: LayerStats | None, sparsity: float, nm: NM | None) -> None:
    linear.weight.data[magnitude_mask(linear.weight, sparsity, nm)] = 0


def _prune_wanda(linear: nn.Linear, stats: LayerStats | None, sparsity: float, nm: NM | None) -> None:
    assert stats is not None
    linear.weight.data[wanda_mask(linear.weight, stats.sq_norm, sparsity, nm)] = 0


def _prune_sparsegpt(linear: nn.Linear, stats: LayerStats | None, sparsity: float, nm: NM | None) -> None:
    assert stats is not None
    linear.weight.data.copy_(sparsegpt_prune(linear.weight, stats.hessian, sparsity, nm))


@dataclass(frozen=True)
class Method:
    """A pruning method: what it needs from calibration and how it prunes one linear in place."""

    name: str
    needs_calibration: bool
    needs_hessian: bool
    prune: Callable[[nn.Linear, LayerStats | None, float, NM | None], None]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", needs_calibration=False, needs_hessian=False, prune=_prune_magnitude),
        Method("wanda", needs_calibration=True, needs_hessian=False, prune=_prune_wanda),
        Method("sparsegpt", needs_calibration=True, needs_hessian=True, prune=_prune_sparsegpt),
    )
}
ALLOCATIONS = ("uniform", "owl", "owl-inverse")
GRANULARITIES = ("block", "layer")
COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class PruneConfig:
    """Everything that determines the pruned weights (the model and calibration text aside)."""

    method: str = "wanda"
    allocation: str = "owl"
    sparsity: float = 0.5  # with nm, must equal n/m (or be left to from_cli, which fills it in)
    nm: NM | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    granularity: str = "block"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    compute_dtype: str = "float32"  # of the calibration forwards; bfloat16 = CPU autocast (AMX), stats stay float64
    owl_nsamples: int | None = 8  # first windows used by the dense OWL pass; None = all (the reference)

    def validate(self) -> None:
        """One-line OwlError for any bad setting, before anything is loaded."""
        if self.method not in METHODS:
            raise OwlError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise OwlError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise OwlError(f"unknown compute dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
        if self.granularity not in GRANULARITIES:
            raise OwlError(f"unknown granularity {self.granularity!r}; choose block or layer")
        if not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity)):
            raise OwlError(f"sparsity must be a number in (0, 1), got {self.sparsity}")
        if not 0.0 < self.sparsity < 1.0:
            raise OwlError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.nm is not None:
            n, m = self.nm
            if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
                raise OwlError(f"N:M sparsity needs integers 1 <= N < M, got {n}:{m}")
            if abs(self.sparsity - n / m) > 1e-9:
                raise OwlError(f"--sparsity {self.sparsity} contradicts --nm {n}:{m} (= {n / m:g}); give one")
        if self.allocation != "uniform":
            validate_owl(self.sparsity, self.owl_m, self.owl_lambda)
        for name in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise OwlError(f"{name} must be a positive integer, got {value}")
        if self.seqlen < 2:
            raise OwlError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.owl_nsamples is not None and not (isinstance(self.owl_nsamples, int) and self.owl_nsamples >= 1):
            raise OwlError(f"owl_nsamples must be a positive integer or all, got {self.owl_nsamples}")

    @property
    def owl_windows(self) -> int:
        """Windows of the dense OWL pass: the first min(owl_nsamples, nsamples), or all of them."""
        return self.nsamples if self.owl_nsamples is None else min(self.owl_nsamples, self.nsamples)

    @property
    def needs_calibration(self) -> bool:
        return METHODS[self.method].needs_calibration or self.allocation != "uniform"


def config_from_cli(
    *, sparsity: float | None, nm: str | None, owl_nsamples: str | int | None = 8, **kwargs
) -> PruneConfig:
    """Build and validate a PruneConfig from CLI strings: ``--nm 2:4`` fixes the sparsity at 0.5,
    ``--owl-nsamples all`` is None (every window, as the reference)."""
    parsed = parse_nm(nm) if nm is not None else None
    if isinstance(owl_nsamples, str):
        text = owl_nsamples.strip().lower()
        if text == "all":
            owl_nsamples = None
        elif text.isdigit():
            owl_nsamples = int(text)
        else:
            raise OwlError(f"--owl-nsamples must be a positive integer or 'all', got {owl_nsamples!r}")
    kwargs["owl_nsamples"] = owl_nsamples
    if sparsity is None:
        if parsed is None:
            raise OwlError("give --sparsity (in (0, 1)) or --nm N:M")
        sparsity = parsed[0] / parsed[1]
    cfg = PruneConfig(sparsity=float(sparsity), nm=parsed, **kwargs)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- allocation
@dataclass
class Target:
    """What one linear is pruned to: an unstructured sparsity, or an N:M pattern (sparsity = n/m)."""

    sparsity: float
    nm: NM | None = None


def _weighted_recentre(values: list[float], weights: list[int], target: float) -> list[float]:
    """clip(v + t) to the allocation bounds with one shift t so that sum(w*v)/sum(w) == target.

    The weighted mean of the clipped values is continuous and non-decreasing in t: bisection.
    """
    lo_b, hi_b = MIN_BLOCK_SPARSITY, MAX_BLOCK_SPARSITY
    total = float(sum(weights))

    def mean_at(t: float) -> float:
        return sum(w * min(hi_b, max(lo_b, v + t)) for v, w in zip(values, weights, strict=True)) / total

    lo, hi = lo_b - max(values), hi_b - min(values)
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    t = (lo + hi) / 2
    return [min(hi_b, max(lo_b, v + t)) for v in values]


def block_ratios(
    model: nn.Module, ids: torch.Tensor, cfg: PruneConfig, progress: bool
) -> tuple[list[float], list[dict[str, float]]]:
    """Dense sequential pass: each block's pooled outlier ratio and each linear's own ratio (ref 1-3)."""
    runner = SequentialRunner(model, ids, cfg.batch_size, COMPUTE_DTYPES[cfg.compute_dtype])
    blocks = runner.blocks
    ratios: list[float] = []
    layer_ratios: list[dict[str, float]] = []
    for i in tqdm(range(len(blocks)), desc="OWL dense pass", disable=not progress, leave=False):
        stats = runner.collect(i, advance=i < len(blocks) - 1)
        scores = {name: wanda_scores(lin.weight, stats[name].sq_norm) for name, lin in block_linears(blocks[i]).items()}
        ratios.append(outlier_ratio(list(scores.values()), cfg.owl_m))
        layer_ratios.append(
            {name: outlier_ratio([a], cfg.owl_m) for name, a in scores.items()} if cfg.granularity == "layer" else {}
        )
        del scores
    return ratios, layer_ratios


def allocate(
    cfg: PruneConfig,
    linears: list[dict[str, nn.Linear]],
    ratios: list[float] | None,
    layer_ratios: list[dict[str, float]] | None,
) -> list[dict[str, Target]]:
    """Per-linear targets: uniform, or OWL / OWL-inverse per block (or per linear for the ablation)."""
    inverse = cfg.allocation == "owl-inverse"
    names = [list(d) for d in linears]
    if cfg.allocation == "uniform":
        return [{n: Target(cfg.sparsity, cfg.nm) for n in block} for block in names]
    assert ratios is not None
    if cfg.granularity == "block":
        if cfg.nm is not None:
            ns = owl_nm(ratios, cfg.nm[0], cfg.nm[1], cfg.owl_lambda, inverse)
            per_block = [Target(n / cfg.nm[1], (n, cfg.nm[1])) for n in ns]
        else:
            per_block = [Target(s) for s in owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda, inverse)]
        return [{n: per_block[i] for n in block} for i, block in enumerate(names)]
    # layer granularity: one ratio per linear, allocated across every linear of the model
    assert layer_ratios is not None
    flat = [layer_ratios[i][n] for i, block in enumerate(names) for n in block]
    if cfg.nm is not None:
        ns = owl_nm(flat, cfg.nm[0], cfg.nm[1], cfg.owl_lambda, inverse)
        targets = [Target(n / cfg.nm[1], (n, cfg.nm[1])) for n in ns]
    else:
        sizes = [lin.weight.numel() for d in linears for lin in d.values()]
        values = _weighted_recentre(owl_sparsities(flat, cfg.sparsity, cfg.owl_lambda, inverse), sizes, cfg.sparsity)
        targets = [Target(s) for s in values]
    it = iter(targets)
    return [{n: next(it) for n in block} for block in names]


# ---------------------------------------------------------------- orchestration
def _check_nm_shapes(linears: list[dict[str, nn.Linear]], nm: NM | None) -> None:
    if nm is None:
        return
    for i, block in enumerate(linears):
        for name, lin in block.items():
            if lin.in_features % nm[1]:
                raise OwlError(
                    f"N:M {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}; "
                    f"block {i} {name} has {lin.in_features}"
                )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prune_model(
    model: nn.Module,
    cfg: PruneConfig,
    calib_ids: torch.Tensor | None = None,
    progress: bool | None = None,
    ratios: tuple[list[float], list[dict[str, float]]] | None = None,
) -> dict:
    """Prune ``model`` in place per ``cfg`` and return the report (sparsity.json without the I/O parts).

    ``calib_ids`` ([nsamples, seqlen] token ids) is required when the method or the allocation needs
    calibration. Timings are in ``report["timings"]`` (seconds per phase), the only non-deterministic part.
    ``ratios`` lets a caller that prunes the same dense model many times (the quality study) pass the
    output of :func:`block_ratios` computed once, instead of repeating the dense pass.
    """
    cfg.validate()
    if progress is None:
        progress = sys.stderr.isatty()
    method = METHODS[cfg.method]
    blocks = decoder_blocks(model)
    linears = [block_linears(b) for b in blocks]
    _check_nm_shapes(linears, cfg.nm)
    if cfg.needs_calibration:
        if calib_ids is None:
            raise OwlError(f"{cfg.method} with {cfg.allocation} allocation needs calibration data")
        if tuple(calib_ids.shape) != (cfg.nsamples, cfg.seqlen):
            raise OwlError(
                f"calibration ids have shape {tuple(calib_ids.shape)}, expected ({cfg.nsamples}, {cfg.seqlen})"
            )
    timings: dict[str, float] = {}

    # 1. allocation (OWL ratios from a dense sequential pass, ref items 1-4)
    t0 = time.perf_counter()
    layer_ratios = None
    owl_windows = 0
    if cfg.allocation != "uniform":
        assert calib_ids is not None
        owl_windows = cfg.owl_windows
        ratios, layer_ratios = ratios or block_ratios(model, calib_ids[:owl_windows], cfg, progress)
    targets = allocate(cfg, linears, ratios, layer_ratios)
    timings["owl_ratios"] = time.perf_counter() - t0

    # 2. pruning pass: hooks -> prune -> re-run the pruned block for the next block's inputs
    t0 = time.perf_counter()
    runner = (
        SequentialRunner(model, calib_ids, cfg.batch_size, COMPUTE_DTYPES[cfg.compute_dtype])
        if method.needs_calibration
        else None
    )
    for i in tqdm(range(len(blocks)), desc=f"pruning ({cfg.method})", disable=not progress, leave=False):
        stats = runner.collect(i, hessian=method.needs_hessian) if runner is not None else {}
        for name, lin in linears[i].items():
            tgt = targets[i][name]
            method.prune(lin, stats.get(name), tgt.sparsity, tgt.nm)
        del stats
        if runner is not None and i < len(blocks) - 1:
            runner.advance(i)
    del runner
    timings["prune"] = time.perf_counter() - t0

    # 3. report
    total_zero = total = 0
    block_entries = []
    for i, block in enumerate(linears):
        layers = {}
        for name, lin in block.items():
            zeros = int((lin.weight == 0).sum())
            layers[name] = zeros / lin.weight.numel()
            total_zero += zeros
            total += lin.weight.numel()
        sizes = {n: lin.weight.numel() for n, lin in block.items()}
        distinct = {t.sparsity for t in targets[i].values()}
        # one value per block, except in the per-layer ablation: then its parameter-weighted mean
        block_target = (
            distinct.pop()
            if len(distinct) == 1
            else (sum(targets[i][n].sparsity * sizes[n] for n in block) / sum(sizes.values()))
        )
        entry = {
            "index": i,
            "outlier_ratio": ratios[i] if ratios is not None else None,
            "sparsity": block_target,
            "layers": layers,
        }
        if cfg.nm is not None:
            entry["nm"] = sorted({f"{t.nm[0]}:{t.nm[1]}" for t in targets[i].values() if t.nm})
        if cfg.granularity == "layer" and cfg.allocation != "uniform":
            entry["layer_targets"] = {n: t.sparsity for n, t in targets[i].items()}
            entry["layer_outlier_ratios"] = layer_ratios[i] if layer_ratios else {}
        block_entries.append(entry)
    block_sparsities = [b["sparsity"] for b in block_entries]
    all_targets = [t.sparsity for d in targets for t in d.values()]
    return {
        "method": cfg.method,
        "allocation": cfg.allocation,
        "granularity": cfg.granularity,
        "target_sparsity": cfg.sparsity,
        "nm": f"{cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm else None,
        "global_sparsity": total_zero / total,
        "mean_block_sparsity": sum(block_sparsities) / len(block_sparsities),
        "pruned_weights": total,
        "owl": {
            "m": cfg.owl_m,
            "lambda": cfg.owl_lambda,
            "used": cfg.allocation != "uniform",
            "nsamples": owl_windows,
            "inverse": cfg.allocation == "owl-inverse",
            "clamped": any(s <= MIN_BLOCK_SPARSITY or s >= MAX_BLOCK_SPARSITY for s in all_targets),
        },
        "blocks": block_entries,
        "structure": {
            "model_class": type(model).__name__,
            "blocks_prefix": blocks_prefix(model),
            "n_blocks": len(blocks),
            "linears_per_block": list(linears[0]),
        },
        "batch_size": cfg.batch_size,
        "timings": timings,
    }


def run_prune(model_spec: str, out: Path, cfg: PruneConfig, calib: str | None = None) -> dict:
    """The ``prune`` command: load, calibrate, prune, and write ``out`` (HF folder + sparsity.json).

    Everything that can fail is checked before ``out`` is touched, and ``out`` itself is written through
    ``atomic_dir``: a failure at any point leaves no output folder (an existing one is left as it was).
    """
    import transformers

    from owl_deploy.data import DEFAULT_CALIB, calibration_windows
    from owl_deploy.io import atomic_dir, write_json
    from owl_deploy.model import load_model, resolve_model, save_model

    t_start = time.perf_counter()
    cfg.validate()
    calib = calib or DEFAULT_CALIB
    out = Path(out)
    src = resolve_model(model_spec)
    src_dir = src if src.is_dir() else src.parent
    if out.resolve() == src_dir.resolve():
        raise OwlError(f"--out {out} is the model's own folder; choose another")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "sparsity.json").is_file())):
        # replacing a previous prune output is fine; silently replacing anything else is not
        raise OwlError(f"--out {out} exists and is not an earlier prune output; remove it or choose another")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model, tokenizer = load_model(src)
    decoder_blocks(model)  # fail early on a model without recognisable decoder blocks
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if cfg.needs_calibration and isinstance(max_pos, int) and cfg.seqlen > max_pos:
        raise OwlError(f"seqlen {cfg.seqlen} exceeds the model's max_position_embeddings ({max_pos})")
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids = None
    if cfg.needs_calibration:
        ids = calibration_windows(tokenizer, calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    timings["calibration_data"] = time.perf_counter() - t0

    report = prune_model(model, cfg, ids)
    timings.update(report.pop("timings"))

    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        model.config.use_cache = True  # load_model turned the KV cache off for calibration only
        save_model(model, tokenizer, tmp)
        timings["save"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        report.update(
            model=str(model_spec),
            calibration={
                "text": calib,
                "nsamples": cfg.nsamples,
                "seqlen": cfg.seqlen,
                "seed": cfg.seed,
                "used": cfg.needs_calibration,
            },
            config=asdict(cfg) | {"nm": report["nm"]},
            versions={"torch": torch.__version__, "transformers": transformers.__version__},
            timings=timings,
            peak_rss_mb=peak_rss_mb(),
        )
        write_json(tmp / "sparsity.json", report)
    return report
