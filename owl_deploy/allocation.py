"""OWL layerwise sparsity: the outlier ratio of each block and the per-block sparsity it implies.

Pure math on floats and tensors. "ref" below means /work/shared/reference/owl-method.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from owl_deploy.errors import OwlError

# Bounds of any block's sparsity. 0.99, not 1.0: a fully pruned block would cut the residual stream's
# sub-layers entirely, which is never what a user asking for a global target means.
MIN_BLOCK_SPARSITY = 0.0
MAX_BLOCK_SPARSITY = 0.99


def validate_owl(sparsity: float, m: float, lambda_: float) -> None:
    """Reject OWL settings for which the allocation (ref items 3-4) is meaningless, with a one-line reason."""
    if not (math.isfinite(sparsity) and 0.0 < sparsity < 1.0):
        raise OwlError(f"sparsity must be in (0, 1), got {sparsity}")
    if not (math.isfinite(m) and m > 0):
        raise OwlError(f"OWL outlier threshold M must be > 0, got {m}")
    # lambda >= 0.5 would spread the blocks over 2*lambda >= 1, i.e. more than the whole [0, 1] range.
    if not (math.isfinite(lambda_) and 0.0 <= lambda_ < 0.5):
        raise OwlError(f"OWL lambda must be in [0, 0.5), got {lambda_}")


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """OWL LOD of one block (ref items 2-3), in percent.

    The entries of all the block's Wanda score matrices A = |W| * sqrt(s) are pooled (one mean over the
    concatenation, not one per linear) and those strictly greater than m * mean(A) are counted. Computed
    tensor by tensor in float64, so the block's scores are never copied into one big tensor.
    """
    if not (math.isfinite(m) and m > 0):
        raise OwlError(f"OWL outlier threshold M must be > 0, got {m}")
    numel = sum(a.numel() for a in scores)
    if numel == 0:
        raise OwlError("outlier_ratio needs the scores of at least one non-empty linear layer")
    total = sum(float(a.detach().double().sum()) for a in scores)
    threshold = m * total / numel
    count = sum(int((a.detach().double() > threshold).sum()) for a in scores)
    return 100.0 * count / numel


def _centred_spread(ratios: Sequence[float], width: float, inverse: bool) -> list[float]:
    """r_l = (D_l - min D) / (max D - min D) * width, minus mean(r) (ref item 4); all-equal D -> zeros.

    inverse=True negates the result: more outliers -> more sparsity (the OWL-inverse ablation, ref item 5).
    """
    d = [float(x) for x in ratios]
    if not d:
        raise OwlError("OWL allocation needs the outlier ratio of at least one block")
    if not all(math.isfinite(x) for x in d):
        raise OwlError(f"OWL outlier ratios must be finite, got {d}")
    lo, hi = min(d), max(d)
    if hi == lo:  # no outlier contrast: uniform, not a division by zero
        return [0.0] * len(d)
    r = [(x - lo) / (hi - lo) * width for x in d]
    mean = sum(r) / len(r)
    return [(mean - x) if inverse else (x - mean) for x in r]


def _clip_keep_mean(raw: list[float], target: float, lo: float, hi: float) -> list[float]:
    """Clip every value to [lo, hi] while keeping the unweighted mean at `target` (water-filling).

    Returns clip(raw_l + t, lo, hi) with one common shift t: the excess cut off at a bound is spread evenly
    over the blocks still inside the bounds, and the order of the blocks is preserved. The mean of the
    clipped values is piecewise linear and non-decreasing in t, so t is solved exactly between the two
    breakpoints that bracket the target.
    """
    if not lo <= target <= hi:
        raise OwlError(f"target sparsity {target} cannot be reached with every block in [{lo}, {hi}]")
    if all(lo <= x <= hi for x in raw):
        return raw

    def mean_at(t: float) -> float:
        return sum(min(hi, max(lo, x + t)) for x in raw) / len(raw)

    points = sorted({lo - x for x in raw} | {hi - x for x in raw})
    values = [mean_at(t) for t in points]  # values[0] == lo, values[-1] == hi
    t = points[-1]
    for t0, t1, f0, f1 in zip(points, points[1:], values, values[1:], strict=False):
        if f0 <= target <= f1:
            t = t0 if f1 == f0 else t0 + (target - f0) * (t1 - t0) / (f1 - f0)
            break
    return [min(hi, max(lo, x + t)) for x in raw]


def owl_sparsities(ratios: Sequence[float], sparsity: float, lambda_: float, inverse: bool = False) -> list[float]:
    """Per-block sparsity from the blocks' outlier ratios D (ref item 4).

    r = (D - min D) / (max D - min D) * 2*lambda; density = r - mean(r) + (1 - S); sparsity = 1 - density,
    evaluated as S - (r - mean(r)) so the mean is exactly S. More outliers -> lower sparsity; all-equal
    ratios -> uniform. inverse=True is the OWL-inverse ablation (more outliers -> more sparsity).

    Bounds (differs from the reference, which clamps <= 0 to 0.01 and never clamps above, drifting the
    global mean): every block is clipped to [0.0, 0.99] and the unclipped blocks are shifted by one common
    amount so the unweighted mean stays exactly S (see _clip_keep_mean). S > 0.99 raises OwlError.
    """
    validate_owl(sparsity, 1.0, lambda_)
    spread = _centred_spread(ratios, 2.0 * lambda_, inverse)
    raw = [sparsity - c for c in spread]
    return _clip_keep_mean(raw, sparsity, MIN_BLOCK_SPARSITY, MAX_BLOCK_SPARSITY)


def uniform_sparsities(n_blocks: int, sparsity: float) -> list[float]:
    """The baseline allocation: every block at the target sparsity."""
    if n_blocks < 1:
        raise OwlError(f"need at least one block, got {n_blocks}")
    if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
        raise OwlError(f"sparsity must be in [0, 1), got {sparsity}")
    return [float(sparsity)] * n_blocks


def owl_nm(ratios: Sequence[float], n: int, m: int, lambda_: float, inverse: bool = False) -> list[int]:
    """Per-block N (weights pruned per group of m) for OWL with N:M sparsity (ref item 7).

    Interpretation of "r scaled to [0, lambda]": lambda keeps the unit of the unstructured lambda (a fraction of
    the weights, validated to [0, 0.5)), so in units of pruned weights per group r is scaled to
    [0, lambda * m]: r = (D - min D) / (max D - min D) * lambda * m. Then N_l = n - round(r_l - mean(r)),
    rounded half to even like numpy's np.round in the reference. The reference's `--Lamda 2` for 5:8 is
    lambda = 0.25 here. A spread lambda * m < 1 (e.g. lambda = 0.08 with 2:4) can never move an integer N: the
    result is then uniform. N is clipped to [0, m] (0 = keep the group dense, m = prune it all).
    As in the reference, the mean of N is not guaranteed to stay n. inverse=True: more outliers -> larger N.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise OwlError(f"N:M needs integers 1 <= N < M, got {n}:{m}")
    if not (math.isfinite(lambda_) and 0.0 <= lambda_ < 0.5):
        raise OwlError(f"OWL lambda must be in [0, 0.5), got {lambda_}")
    spread = _centred_spread(ratios, lambda_ * m, inverse)
    return [min(m, max(0, n - round(c))) for c in spread]


# ---------------------------------------------------------------- per-linear targets
@dataclass(frozen=True)
class Target:
    """What one linear is pruned to: an unstructured sparsity, or an N:M pattern (sparsity = n/m)."""

    sparsity: float
    nm: tuple[int, int] | None = None


def weighted_recentre(values: Sequence[float], weights: Sequence[int], target: float) -> list[float]:
    """clip(v + t) to the block bounds with one shift t so that sum(w*v)/sum(w) == target.

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


def allocate(
    names: Sequence[Sequence[str]],
    sizes: Sequence[Sequence[int]],
    sparsity: float,
    nm: tuple[int, int] | None = None,
    allocation: str = "uniform",
    lambda_: float = 0.0,
    block_ratios: Sequence[float] | None = None,
    layer_ratios: Sequence[Sequence[float]] | None = None,
) -> list[dict[str, Target]]:
    """Every linear's target, block by block: uniform, or OWL / OWL-inverse per block from
    ``block_ratios``, or (the per-layer ablation) per linear from ``layer_ratios`` across the whole model.

    ``names[i]`` are block i's linears and ``sizes[i]`` their weight counts. Per layer, unstructured
    targets are shifted by one common amount so the parameter-weighted mean (the measured global
    sparsity) stays ``sparsity``; N:M targets move N per linear as ``owl_nm`` does per block.
    """
    if allocation not in ("uniform", "owl", "owl-inverse"):
        raise OwlError(f"unknown allocation {allocation!r}")
    inverse = allocation == "owl-inverse"
    if allocation == "uniform":
        return [{n: Target(sparsity, nm) for n in block} for block in names]
    if layer_ratios is None:
        if block_ratios is None or len(block_ratios) != len(names):
            raise OwlError("OWL allocation needs one outlier ratio per block")
        if nm is not None:
            per_block = [Target(n / nm[1], (n, nm[1])) for n in owl_nm(block_ratios, nm[0], nm[1], lambda_, inverse)]
        else:
            per_block = [Target(s) for s in owl_sparsities(block_ratios, sparsity, lambda_, inverse)]
        return [{n: per_block[i] for n in block} for i, block in enumerate(names)]
    flat = [r for block in layer_ratios for r in block]
    if nm is not None:
        targets = [Target(n / nm[1], (n, nm[1])) for n in owl_nm(flat, nm[0], nm[1], lambda_, inverse)]
    else:
        weights = [s for block in sizes for s in block]
        values = weighted_recentre(owl_sparsities(flat, sparsity, lambda_, inverse), weights, sparsity)
        targets = [Target(s) for s in values]
    it = iter(targets)
    return [{n: next(it) for n in block} for block in names]
