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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from owl_deploy.allocation import outlier_ratio, owl_nm, owl_sparsities, uniform_sparsities
from owl_deploy.calibrate import SequentialRunner, autocast_dtype, worker_env
from owl_deploy.configs import OwlConfig, PruneConfig, TuneConfig, build
from owl_deploy.errors import OwlError
from owl_deploy.evaluate import paired_nll, perplexity, torch_logits_fn, window_count
from owl_deploy.model import block_linears, decoder_blocks, mapped_dense
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


class Scorer:
    """One model with its dense pass done: scores a candidate's one-shot masks on a slice of the held-out tokens.

    Built in the driver for a serial tune, or in each Ray worker from a :class:`TuneSpec` (the dense pass is
    deterministic for a thread count, so every worker's statistics equal the serial run's)."""

    def __init__(
        self,
        model: nn.Module,
        calib_ids: torch.Tensor,
        heldout: torch.Tensor,
        prune: PruneConfig,
        cfg: TuneConfig,
        dense: list[torch.Tensor] | None = None,
        checkpoint: Path | None = None,
    ):
        """``dense``: the block linears' dense weights if the caller holds them; else mapped from ``checkpoint``
        (the folder the model was loaded from, :func:`owl_deploy.model.mapped_dense`) or copied."""
        windows = calib_ids[: cfg.nsamples] if cfg.nsamples else calib_ids
        self.calibration_windows = len(windows)
        if dense is None:
            linears = [lin for b in decoder_blocks(model) for lin in block_linears(b).values()]
            dense = mapped_dense(model, linears, checkpoint) or [lin.weight.detach().clone() for lin in linears]
        self.stats = dense_stats(model, windows, prune, list(cfg.m))
        self.model, self.dense, self.heldout, self.prune, self.seqlen = model, dense, heldout, prune, cfg.seqlen

    def score(self, targets: list, lo: int, hi: int) -> list[float]:
        tokens = self.heldout[lo:hi]
        if not len(tokens):
            return []
        return score_candidate(self.model, self.dense, self.stats, self.prune, targets, tokens, self.seqlen)


#: scores a list of (block targets, first token, end token) requests; returns each one's per-window NLLs
ScoreMany = Callable[[list[tuple[list, int, int]]], list[list[float]]]


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
    scorer = Scorer(model, calib_ids, heldout, prune, cfg, dense)
    info = (scorer.stats.ratios, scorer.stats.seconds, scorer.calibration_windows)
    return _tune(info, int(heldout.numel()), lambda reqs: [scorer.score(*r) for r in reqs], prune, owl, cfg, start)


def _tune(
    info: tuple[dict[float, list[float]], float, int],
    heldout_tokens: int,
    score_many: ScoreMany,
    prune: PruneConfig,
    owl: OwlConfig,
    cfg: TuneConfig,
    start: float,
) -> dict:
    """The grid, the screen and the guard, on whatever scores the candidates (this process, or Ray workers)."""
    ratios, dense_seconds, calibration_windows = info
    n_blocks = len(ratios[cfg.m[0]])
    t0 = time.perf_counter()
    n_windows = window_count(heldout_tokens, cfg.seqlen)
    cut, end = min(cfg.screen_windows, n_windows) * cfg.seqlen, n_windows * cfg.seqlen

    uniform_targets = block_targets(prune, [0.0] * n_blocks, 0.0)
    grid = [(m, lam, block_targets(prune, ratios[m], lam)) for m in cfg.m for lam in cfg.lambda_ if lam > 0]
    first = score_many([(uniform_targets, 0, cut)] + [(t, 0, cut) for _, _, t in grid])
    uniform = first[0]
    rows = [
        {"m": m, "lambda": lam, "block_sparsity": [t[0] for t in targets], "nll": nll}
        for (m, lam, targets), nll in zip(grid, first[1:], strict=True)
    ]
    if end > cut and rows:
        finals = sorted(rows, key=lambda r: sum(r["nll"]))[: cfg.finalists]  # stable: ties keep the grid's order
        second = score_many(
            [(uniform_targets, cut, end)]
            + [(block_targets(prune, ratios[r["m"]], r["lambda"]), cut, end) for r in finals]
        )
        uniform += second[0]
        for r, nll in zip(finals, second[1:], strict=True):
            r["nll"] = r["nll"] + nll
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
        "heldout_tokens": heldout_tokens,
        "windows": len(uniform),
        "screen_windows": cut // cfg.seqlen,
        "calibration_windows": calibration_windows,
        "scored_windows": {"screened": scored, "exhaustive": len(uniform) * (len(rows) + 1)},
        "seconds": {
            "dense_pass": round(dense_seconds, 2),
            "scoring": round(score_seconds, 2),
            "per_window": round(score_seconds / scored, 3),
            "total": round(time.perf_counter() - start, 2),
        },
    }


# ---------------------------------------------------------------- the grid on Ray
@dataclass(frozen=True)
class TuneSpec:
    """What a Ray worker rebuilds a tune from (hashable: the worker keeps one :class:`Scorer` per spec): the
    model, its calibration windows, the held-out tokens, and the prune/tune settings as JSON."""

    model: str
    calib: str
    nsamples: int
    calib_seqlen: int
    seed: int
    prune_json: str
    tune_json: str

    def build(self, built: dict | None = None) -> Scorer:
        import json

        from owl_deploy.data import calibration_windows, heldout_tokens
        from owl_deploy.specs import load_model, resolve_model

        prune, cfg = build(PruneConfig, json.loads(self.prune_json)), build(TuneConfig, json.loads(self.tune_json))
        model, tokenizer = load_model(self.model)
        ids = calibration_windows(tokenizer, self.calib, self.nsamples, self.calib_seqlen, self.seed)
        held = heldout_tokens(tokenizer, self.calib, cfg.heldout_tokens, cfg.seqlen)
        return Scorer(model, ids, held, prune, cfg, checkpoint=resolve_model(self.model))


def _facts(scorer: Scorer) -> tuple[dict[float, list[float]], float, int, int]:
    """A worker's dense pass, as the driver needs it: ratios per M, seconds, calibration windows, held-out tokens."""
    s = scorer.stats
    return s.ratios, s.seconds, scorer.calibration_windows, int(scorer.heldout.numel())


def _score(scorer: Scorer, targets: list, lo: int, hi: int) -> list[float]:
    return scorer.score(targets, lo, hi)


def tune_on_ray(
    spec: TuneSpec,
    owl: OwlConfig,
    address: str | None = None,
    threads: int = 1,
    actors: int | None = None,
) -> dict:
    """:func:`tune_owl` with the candidates scored by Ray workers (an embedded local Ray when ``address`` is
    None): each worker loads the model and runs the dense pass once, then scores candidates, the screen as one
    wave and the finalists as a second. With the serial run's thread count the result is the serial one's (the
    per-window NLLs to the last bit); the driver never loads the model. A failed candidate fails the tune."""
    import json

    from owl_deploy.cluster import Job, Pool

    start = time.perf_counter()
    prune, cfg = build(PruneConfig, json.loads(spec.prune_json)), build(TuneConfig, json.loads(spec.tune_json))
    with Pool(address, threads, actors, worker_env()) as pool:

        def wave(jobs: list[Job]) -> list:
            done: dict[str, object] = {}
            errors: list[str] = []

            def keep(job: Job, result: object, error: str | None) -> None:
                if error is None:
                    done[job.key] = result
                else:
                    errors.append(error)

            pool.run(jobs, keep)
            if errors:
                raise OwlError(f"tune on Ray: {len(errors)} of {len(jobs)} jobs failed; first: {errors[0]}")
            return [done[j.key] for j in jobs]

        ratios, dense_seconds, windows, heldout = wave([Job("dense", spec, _facts)])[0]  # type: ignore[misc]

        def score_many(reqs: list[tuple[list, int, int]]) -> list[list[float]]:
            return wave([Job(f"{i}", spec, _score, r) for i, r in enumerate(reqs)])  # type: ignore[return-value]

        return _tune((ratios, dense_seconds, windows), heldout, score_many, prune, owl, cfg, start)


def chosen(prune: PruneConfig, owl: OwlConfig, result: dict) -> tuple[PruneConfig, OwlConfig]:
    """The prune and OWL configs a tune result selects (uniform when the guard fell back)."""
    c = result["choice"]
    prune = build(PruneConfig, {**prune.model_dump(), "allocation": c["allocation"]})
    owl = build(OwlConfig, {**owl.model_dump(), "m": c["m"], "lambda_": c["lambda"]})
    return prune, owl
