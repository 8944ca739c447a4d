"""Wanda (ref, Wanda): weight magnitude times input-feature norm, compared within each output row."""

from __future__ import annotations

import torch

from owl_deploy.errors import OwlError
from owl_deploy.prune.masks import nm_mask, row_mask


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(sq_norm_j), in float64.

    sq_norm is the per-input-feature sum (or per-sample mean, a constant factor that changes no ranking)
    of x_j^2 over the calibration tokens; it is also the OWL outlier score A (ref item 2). float64 so
    the ranking does not depend on the weight's storage dtype.
    """
    if weight.dim() != 2:
        raise OwlError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if sq_norm.shape != (weight.shape[1],):
        raise OwlError(f"sq_norm must have shape ({weight.shape[1]},), got {tuple(sq_norm.shape)}")
    return weight.detach().double().abs() * sq_norm.detach().double().sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Mask (True = pruned): the int(in_features * sparsity) lowest scores of each row; with nm=(n, m) the
    n lowest of every m consecutive input columns of a row, and `sparsity` is ignored."""
    scores = wanda_scores(weight, sq_norm)
    return row_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)
