"""Magnitude pruning (ref, magnitude): the smallest |W| go, one threshold per weight matrix."""

from __future__ import annotations

import torch

from owl_deploy.prune.masks import matrix_mask, nm_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Mask (True = pruned) of the int(numel * sparsity) smallest |W|; with nm=(n, m) the n smallest |W| of
    every m consecutive input columns instead, and `sparsity` is ignored (the pattern fixes it at n/m)."""
    scores = weight.detach().abs()
    return matrix_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)
