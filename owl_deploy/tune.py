"""Choosing OWL's (M, λ) on held-out calibration text, cheaply, and the guard that falls back to uniform.

Cost: one dense pass over the calibration windows collects every linear's input norms (Wanda's ``s``)
and each block's outlier ratio for every M of the grid at once (the scores are made once per block).
A candidate (M, λ) is then a list of block sparsities; its masks are one-shot masks on those *dense*
statistics (Wanda's for Wanda and SparseGPT, magnitude's for magnitude; no sequential re-calibration),
applied to the weights and scored by a forward over held-out windows: every candidate over the first few
windows, the best few (and uniform) over all of them (successive halving). The grid therefore costs one
calibration forward plus a fraction of a held-out forward per candidate, where the prune itself runs two
calibration forwards per block (and SparseGPT its Hessians): the allocation is what is tuned, on a cheap proxy.

The guard: the best candidate must beat uniform (λ = 0) on the held-out windows by more than the standard
error of the paired per-window NLL difference; otherwise the allocation is uniform, and the result says so.
Held-out windows are the tail of each calibration source (``data.heldout_tokens``), never the evaluation text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from owl_deploy.allocation import outlier_ratio, owl_nm, owl_sparsities, uniform_sparsities
from owl_deploy.calibrate import SequentialRunner, autocast_dtype
from owl_deploy.configs import OwlConfig, PruneConfig, TuneConfig, build
from owl_deploy.evaluate import paired_nll, perplexity, torch_logits_fn, windows_of
from owl_deploy.model import block_linears, decoder_blocks
from owl_deploy.prune.magnitude import magnitude_mask
from owl_deploy.prune.masks import row_ranks
from owl_deploy.prune.wanda import wanda_scores


@dataclass
class DenseStats:
    """What every candidate needs from the dense model: outlier ratios per M, Wanda score ranks per linear."""

    ratios: dict[float, list[float]]  # M -> per-block outlier ratio (%)
    seconds: float
    ranks: list[dict[str, torch.Tensor]] | None = None  # Wanda score ranks per row (or N:M group); not magnitude


def dense_stats(model: nn.Module, calib_ids: torch.Tensor, prune: PruneConfig, ms: list[float]) -> DenseStats:
    """One dense sequential forward: the block ratios for each M and every linear's Wanda score ranks."""
    t0 = time.perf_counter()
    runner = SequentialRunner(model, calib_ids, prune.batch_size, autocast_dtype(prune.compute_dtype))
    blocks = runner.blocks
    ratios: dict[float, list[float]] = {m: [] for m in ms}
    ranks: list[dict[str, torch.Tensor]] | None = None if prune.method == "magnitude" else []
    group = prune.nm_pair[1] if prune.nm_pair else None
    for i in range(len(blocks)):
        stats = runner.collect(i, advance=i < len(blocks) - 1)
        linears = block_linears(blocks[i])
        scores = {name: wanda_scores(lin.weight, stats[name].sq_norm) for name, lin in linears.items()}
        for m in ms:
            ratios[m].append(outlier_ratio(list(scores.values()), m))
        if ranks is not None:  # every candidate's Wanda mask is then one comparison, not a sort
            ranks.append({name: row_ranks(sc, group) for name, sc in scores.items()})
        del scores, stats
    return DenseStats(ratios, time.perf_counter() - t0, ranks)


def block_targets(prune: PruneConfig, ratios: list[float] | None, lambda_: float) -> list[tuple[float, tuple | None]]:
    """(sparsity, N:M) per block for one candidate; ``ratios=None`` or λ = 0 is uniform."""
    nm = prune.nm_pair
    n_blocks = len(ratios) if ratios is not None else 0
    if ratios is None or lambda_ == 0:
        if nm is not None:
            return [(nm[0] / nm[1], nm)] * n_blocks
        return [(s, None) for s in uniform_sparsities(n_blocks, prune.target_sparsity)]
    if nm is not None:
        return [(n / nm[1], (n, nm[1])) for n in owl_nm(ratios, nm[0], nm[1], lambda_)]
    return [(s, None) for s in owl_sparsities(ratios, prune.target_sparsity, lambda_)]


@torch.no_grad()
def score_candidate(
    model: nn.Module,
    dense: list[torch.Tensor],
    stats: DenseStats,
    prune: PruneConfig,
    targets: list[tuple[float, tuple | None]],
    heldout: torch.Tensor,
    seqlen: int,
) -> list[float]:
    """Per-window held-out NLL of the model with one-shot masks at ``targets`` (weights restored after)."""
    linears = [lin for b in decoder_blocks(model) for lin in block_linears(b).values()]
    it = iter(dense)
    try:
        for i, block in enumerate(decoder_blocks(model)):
            sparsity, nm = targets[i]
            for name, lin in block_linears(block).items():
                w = next(it)
                if stats.ranks is None:
                    mask = magnitude_mask(w, sparsity, nm)
                else:  # Wanda's one-shot mask (== wanda_mask): the proxy for Wanda and SparseGPT alike
                    mask = stats.ranks[i][name] < (nm[0] if nm else int(w.shape[1] * sparsity))
                lin.weight.copy_(w.masked_fill(mask, 0))
        return perplexity(torch_logits_fn(model), heldout, seqlen, progress=False).window_nll
    finally:
        for lin, w in zip(linears, dense, strict=True):
            lin.weight.copy_(w)


def tune_owl(
    model: nn.Module,
    calib_ids: torch.Tensor,
    heldout: torch.Tensor,
    prune: PruneConfig,
    owl: OwlConfig,
    cfg: TuneConfig,
    dense: list[torch.Tensor] | None = None,
) -> dict:
    """Score uniform and every (M, λ) of ``cfg``'s grid; choose the best that beats uniform beyond its
    standard error, or uniform. Returns the grid, the choice and the cost (tune.json). ``dense``: copies of
    the block linears' dense weights a caller already holds (a study), so a 1.5B model is not copied twice.

    Successive halving: every candidate is scored on the first ``cfg.screen_windows`` held-out windows, and
    only the ``cfg.finalists`` best of them (and uniform) on the rest. The guard compares finalists with
    uniform on *all* windows, so a poor screen can cost some of OWL's gain but never admits a setting that is
    worse than uniform."""
    start = time.perf_counter()
    windows = calib_ids[: cfg.nsamples] if cfg.nsamples else calib_ids
    stats = dense_stats(model, windows, prune, list(cfg.m))
    if dense is None:
        dense = [lin.weight.detach().clone() for b in decoder_blocks(model) for lin in block_linears(b).values()]
    n_blocks = len(stats.ratios[cfg.m[0]])
    t0 = time.perf_counter()
    n_windows = len(windows_of(heldout, cfg.seqlen))
    cut = min(cfg.screen_windows, n_windows) * cfg.seqlen
    head, tail = heldout[:cut], heldout[cut : n_windows * cfg.seqlen]

    def score(targets: list, tokens: torch.Tensor) -> list[float]:
        return score_candidate(model, dense, stats, prune, targets, tokens, cfg.seqlen) if len(tokens) else []

    uniform_targets = block_targets(prune, [0.0] * n_blocks, 0.0)
    uniform = score(uniform_targets, head)
    rows = []
    for m in cfg.m:
        for lam in (x for x in cfg.lambda_ if x > 0):
            targets = block_targets(prune, stats.ratios[m], lam)
            rows.append({"m": m, "lambda": lam, "block_sparsity": [t[0] for t in targets], "nll": score(targets, head)})
    if tail.numel() and rows:
        uniform += score(uniform_targets, tail)
        for r in sorted(rows, key=lambda r: sum(r["nll"]))[: cfg.finalists]:  # stable: ties keep the grid's order
            r["nll"] = r["nll"] + score(block_targets(prune, stats.ratios[r["m"]], r["lambda"]), tail)
    for r in rows:
        nll = r.pop("nll")
        delta, se = paired_nll(nll, uniform[: len(nll)])
        r.update(mean_nll=sum(nll) / len(nll), delta_nll_vs_uniform=delta, delta_se=se, windows=len(nll))
        r["finalist"] = len(nll) == len(uniform)
    score_seconds = time.perf_counter() - t0
    finalists = [r for r in rows if r["finalist"]]
    best = min(finalists, key=lambda r: r["mean_nll"]) if finalists else None
    wins = best is not None and best["delta_nll_vs_uniform"] < -best["delta_se"]
    if wins:
        choice = {"allocation": prune.allocation, "m": best["m"], "lambda": best["lambda"]}
        reason = (
            f"OWL M={best['m']:g} λ={best['lambda']:g} beats uniform on held-out calibration text by "
            f"{-best['delta_nll_vs_uniform']:.4f} NLL (standard error {best['delta_se']:.4f})"
        )
    else:
        choice = {"allocation": "uniform", "m": owl.m, "lambda": owl.lambda_}
        reason = "no OWL setting beats uniform on held-out calibration text by more than its standard error" + (
            f" (best M={best['m']:g} λ={best['lambda']:g}: {-best['delta_nll_vs_uniform']:+.4f} NLL "
            f"± {best['delta_se']:.4f}); pruning with uniform allocation"
            if best
            else ""
        )
    scored = len(uniform) + sum(r["windows"] for r in rows)
    return {
        "choice": choice,
        "owl_wins": wins,
        "reason": reason,
        "best": best,
        "uniform": {"mean_nll": sum(uniform) / len(uniform)},
        "grid": rows,
        "heldout_tokens": int(heldout.numel()),
        "windows": len(uniform),
        "screen_windows": cut // cfg.seqlen,
        "calibration_windows": len(windows),
        "scored_windows": {"screened": scored, "exhaustive": len(uniform) * (len(rows) + 1)},
        "seconds": {
            "dense_pass": round(stats.seconds, 2),
            "scoring": round(score_seconds, 2),
            "per_window": round(score_seconds / scored, 3),
            "total": round(time.perf_counter() - start, 2),
        },
    }


def chosen(prune: PruneConfig, owl: OwlConfig, result: dict) -> tuple[PruneConfig, OwlConfig]:
    """The prune and OWL configs a tune result selects (uniform when the guard fell back)."""
    c = result["choice"]
    prune = build(PruneConfig, {**prune.model_dump(), "allocation": c["allocation"]})
    owl = build(OwlConfig, {**owl.model_dump(), "m": c["m"], "lambda_": c["lambda"]})
    return prune, owl
