"""Pruning masks from importance scores. True in a mask means the weight is PRUNED.

Ties are broken deterministically: a stable sort by score, then by position (lower column first), so the
same scores always give the same mask. "ref" means /work/shared/reference/owl-method.md.
"""

from __future__ import annotations

import math

import torch

from owl_deploy.errors import OwlError


def _check_sparsity(sparsity: float) -> None:
    if not (math.isfinite(sparsity) and 0.0 <= sparsity <= 1.0):
        raise OwlError(f"sparsity must be in [0, 1], got {sparsity}")


def _check_2d(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise OwlError(f"expected a 2-D [out_features, in_features] tensor, got shape {tuple(scores.shape)}")


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's comparison group (ref, Wanda): in every output row prune the int(in_features * sparsity)
    lowest scores. int() truncates like the reference, so e.g. 10 * 0.7 -> 7."""
    _check_2d(scores)
    _check_sparsity(sparsity)
    k = int(scores.shape[1] * sparsity)
    if k == 0 or k == scores.shape[1] or torch.isnan(scores).any():
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        if k > 0:
            mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        return mask
    # the same mask without sorting every row: select each row's k-th smallest score, prune everything below it
    # and, of the scores equal to it, the leftmost ones up to k (what the stable sort's first k hold)
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < kth
    ties = scores == kth
    need = k - below.sum(dim=1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=1) <= need))


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold per matrix (ref, magnitude): prune exactly the int(numel * sparsity) lowest scores.

    The reference prunes `score <= sorted[k]`, i.e. k + 1 entries or more on ties; we prune exactly k,
    ties broken by row-major position.
    """
    _check_sparsity(sparsity)
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
    return mask.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M (ref, Wanda N:M): in each group of m consecutive input columns of each row, prune the n lowest.

    0 <= n <= m is accepted (OWL N:M may give a block n = 0 or n = m, see allocation.owl_nm).
    """
    _check_2d(scores)
    if not (isinstance(n, int) and isinstance(m, int) and m >= 1 and 0 <= n <= m):
        raise OwlError(f"N:M needs integers 0 <= N <= M, M >= 1, got {n}:{m}")
    rows, cols = scores.shape
    if cols % m:
        raise OwlError(f"N:M sparsity {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    if n > 0:
        mask.scatter_(2, torch.sort(groups, dim=2, stable=True).indices[..., :n], True)
    return mask.view(rows, cols)


def row_ranks(scores: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Each score's place in the stable ascending order of its row (or of its ``group`` consecutive columns of
    the row): sort once, then ``row_mask(s, p) == (row_ranks(s) < int(cols * p))`` and
    ``nm_mask(s, n, m) == (row_ranks(s, m) < n)`` for any p or n — how ``tune`` scores many sparsities."""
    _check_2d(scores)
    rows, cols = scores.shape
    g = cols if group is None else group
    if g < 1 or cols % g:
        raise OwlError(f"group {g} must divide in_features {cols}")
    x = scores.reshape(rows, cols // g, g)
    order = torch.sort(x, dim=2, stable=True).indices
    dtype = torch.int16 if g <= torch.iinfo(torch.int16).max else torch.int32
    ranks = torch.empty(x.shape, dtype=dtype, device=scores.device)
    ranks.scatter_(2, order, torch.arange(g, dtype=dtype, device=scores.device).expand(order.shape))
    return ranks.view(rows, cols)
