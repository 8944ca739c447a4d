"""SparseGPT (ref, SparseGPT): prune with a mask chosen from OBS saliency, compensating the survivors.

Numerics: the Hessian is dampened, inverted and Cholesky-factored in float64 (the step where conditioning
matters); the column sweep runs in float32 like the reference (a long chain of rank-1 updates that is
about twice as fast on CPU in float32).
"""

from __future__ import annotations

import math

import torch

from owl_deploy.errors import OwlError
from owl_deploy.prune.masks import matrix_mask, nm_mask


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) after fixing dead inputs and dampening; float64.

    Returns (U, dead): dead inputs (H_jj == 0, a feature never active in calibration) get H_jj = 1 so H
    stays invertible; the caller zeroes their weights. Damp = percdamp * mean(diag H), added to the diagonal.
    """
    h = hessian.detach().to(torch.float64, copy=True)
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    try:
        inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inv, upper=True), dead
    except torch.linalg.LinAlgError as e:
        raise OwlError(
            "SparseGPT: the layer Hessian is not positive definite after dampening; "
            "use more calibration samples or a larger percdamp"
        ) from e


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """The pruned and OBS-updated weight: same dtype and shape as `weight`, exact zeros where pruned.

    hessian = 2/n * sum X X^T ([in, in], float64), accumulated by the caller. Columns are processed in
    blocks of `blocksize`. Unstructured: at the start of each block, exactly int(numel_block * sparsity)
    weights of the block are pruned, the lowest w^2 / U_jj^2 (U_jj^2 = [H_F^-1]_jj, the OBS error of
    removing w given the columns already fixed); the reference prunes `score <= kth value`, one more.
    N:M (`sparsity` ignored): the n lowest scores of every group of m columns, chosen when the sweep
    reaches the group, from the already-updated weights. Each column is then pruned and its error
    spread over the block's later columns (OBS), and after the block over all later columns at once
    (lazy update W[:, i2:] -= Err @ U[i1:i2, i2:]). The caller's tensors are never modified.
    """
    if weight.dim() != 2:
        raise OwlError(f"SparseGPT expects a 2-D weight, got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise OwlError(f"SparseGPT Hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    if not (isinstance(blocksize, int) and blocksize >= 1):
        raise OwlError(f"SparseGPT blocksize must be a positive integer, got {blocksize}")
    if not (math.isfinite(percdamp) and percdamp >= 0):
        raise OwlError(f"SparseGPT percdamp must be >= 0, got {percdamp}")
    if nm is None:
        if not (math.isfinite(sparsity) and 0.0 <= sparsity <= 1.0):
            raise OwlError(f"sparsity must be in [0, 1], got {sparsity}")
    else:
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and m >= 1 and 0 <= n <= m):
            raise OwlError(f"N:M needs integers 0 <= N <= M, M >= 1, got {n}:{m}")
        if cols % m or blocksize % m:
            raise OwlError(f"N:M {n}:{m} needs in_features ({cols}) and blocksize ({blocksize}) divisible by {m}")

    hinv, dead = _inverse_cholesky(hessian, percdamp)
    hinv = hinv.to(torch.float32)
    w = weight.detach().to(torch.float32, copy=True)
    w[:, dead] = 0.0

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = hinv1.diagonal()
        # Unstructured: the whole block's mask now; N:M: filled group by group in the sweep below.
        mask1 = torch.zeros_like(w1, dtype=torch.bool) if nm is not None else matrix_mask(w1**2 / d1**2, sparsity)
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                mask1[:, i : i + m] = nm_mask(w1[:, i : i + m] ** 2 / d1[i : i + m] ** 2, n, m)
            col = w1[:, i]
            q = torch.where(mask1[:, i], 0.0, col)
            err = (col - q) / d1[i]
            w1[:, i:] -= torch.outer(err, hinv1[i, i:])
            q1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)
