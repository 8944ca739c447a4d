"""The sparsity report (``sparsity.json`` without its I/O parts): what was pruned, where, and how much."""

from __future__ import annotations

from torch import nn

from owl_deploy.allocation import MAX_BLOCK_SPARSITY, MIN_BLOCK_SPARSITY, Target
from owl_deploy.configs import OwlConfig, PruneConfig


def zero_counts(linears: dict[str, nn.Linear]) -> dict[str, tuple[int, int]]:
    """(zeros, weights) of each linear of one block, counted while its weights are loaded."""
    return {name: (int((lin.weight == 0).sum()), lin.weight.numel()) for name, lin in linears.items()}


def sparsity_report(
    prune: PruneConfig,
    owl: OwlConfig,
    counts: list[dict[str, tuple[int, int]]],
    targets: list[dict[str, Target]],
    ratios: list[float] | None,
    layer_ratios: list[dict[str, float]] | None,
    owl_windows: int,
) -> dict:
    """``counts``: per block, each linear's (zeros, weights) as measured after pruning it.

    Measured zeros per linear and block, the allocated targets, OWL's ratios and whether any was clipped."""
    total_zero = total = 0
    blocks = []
    for i, block in enumerate(counts):
        layers = {}
        for name, (zeros, numel) in block.items():
            layers[name] = zeros / numel
            total_zero += zeros
            total += numel
        sizes = {n: numel for n, (_, numel) in block.items()}
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
        if prune.nm is not None:
            entry["nm"] = sorted({f"{t.nm[0]}:{t.nm[1]}" for t in targets[i].values() if t.nm})
        if prune.granularity == "layer" and prune.allocation != "uniform":
            entry["layer_targets"] = {n: t.sparsity for n, t in targets[i].items()}
            entry["layer_outlier_ratios"] = layer_ratios[i] if layer_ratios else {}
        blocks.append(entry)
    block_sparsities = [b["sparsity"] for b in blocks]
    all_targets = [t.sparsity for d in targets for t in d.values()]
    clipped = [b["index"] for b in blocks if not MIN_BLOCK_SPARSITY < b["sparsity"] < MAX_BLOCK_SPARSITY]
    return {
        "method": prune.method,
        "allocation": prune.allocation,
        "granularity": prune.granularity,
        "target_sparsity": prune.target_sparsity,
        "nm": prune.nm,
        "global_sparsity": total_zero / total,
        "mean_block_sparsity": sum(block_sparsities) / len(block_sparsities),
        "pruned_weights": total,
        "owl": {
            "m": owl.m,
            "lambda": owl.lambda_,
            "used": prune.allocation != "uniform",
            "nsamples": owl_windows,
            "inverse": prune.allocation == "owl-inverse",
            "clamped": any(s <= MIN_BLOCK_SPARSITY or s >= MAX_BLOCK_SPARSITY for s in all_targets),
            # blocks held at a bound [0, 0.99] (the others were shifted to keep the mean): said, never silent
            "clipped_blocks": clipped if prune.allocation != "uniform" else [],
        },
        "blocks": blocks,
        "batch_size": prune.batch_size,
    }
