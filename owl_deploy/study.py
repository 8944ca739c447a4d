"""Prune-and-score many configurations of one model: the quality table and ``owl-deploy tune``.

The model, its calibration windows and its evaluation tokens are loaded once; each configuration
restores the dense weights of the block linears, prunes, and scores perplexity. OWL outlier ratios
depend only on the dense model, the calibration windows and (M, granularity), so they are computed
once per M and shared by every method, allocation, sparsity and λ that uses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from owl_deploy.configs import OwlConfig, PruneConfig, replace
from owl_deploy.evaluate import Perplexity, check_seqlen, perplexity, torch_logits_fn
from owl_deploy.model import block_linears, decoder_blocks
from owl_deploy.prune import block_ratios, owl_windows, prune_model


class Study:
    """One model + calibration windows + scoring tokens, pruned again and again from the dense weights."""

    def __init__(self, model, tokenizer, calib_ids: torch.Tensor, score_tokens: torch.Tensor, seqlen: int):
        check_seqlen(model, seqlen)
        self.model, self.tokenizer = model, tokenizer
        self.calib_ids, self.score_tokens, self.seqlen = calib_ids, score_tokens, seqlen
        self._linears = [lin for b in decoder_blocks(model) for lin in block_linears(b).values()]
        self._dense = [lin.weight.detach().clone() for lin in self._linears]
        self._ratios: dict[tuple, tuple] = {}

    def on(self, score_tokens: torch.Tensor) -> Study:
        """The same model, calibration windows, dense weights and ratio cache, scored on other tokens (the
        held-out text): built from *this* study's dense copy, never from whatever the model holds now."""
        other = object.__new__(Study)
        other.__dict__.update(self.__dict__)
        other.score_tokens = score_tokens
        return other

    @property
    def dense(self) -> list[torch.Tensor]:
        """The block linears' dense weights, in ``decoder_blocks`` x ``block_linears`` order (read only)."""
        return self._dense

    def restore(self) -> None:
        """Put the dense weights back (only the block linears are ever pruned)."""
        with torch.no_grad():
            for lin, w in zip(self._linears, self._dense, strict=True):
                lin.weight.copy_(w)

    def score(self, progress: bool = False) -> Perplexity:
        return perplexity(torch_logits_fn(self.model), self.score_tokens, self.seqlen, progress=progress)

    def ratios(self, prune: PruneConfig, owl: OwlConfig) -> tuple:
        """The dense model's OWL outlier ratios (cached per M, granularity, windows, batch, dtype)."""
        windows = owl_windows(owl, len(self.calib_ids))
        key = (owl.m, prune.granularity, windows, prune.batch_size, prune.compute_dtype)
        if key not in self._ratios:
            self.restore()
            t0 = time.perf_counter()
            ids = self.calib_ids[:windows]
            self._ratios[key] = (*block_ratios(self.model, ids, prune, owl, progress=False), time.perf_counter() - t0)
        return self._ratios[key]

    def run(self, prune: PruneConfig, owl: OwlConfig | None = None) -> dict:
        """Prune a fresh dense copy and score it; one row of a results table."""
        owl = owl or OwlConfig()
        precomputed = None
        ratio_seconds = 0.0
        if prune.allocation != "uniform":
            ratios, layer_ratios, ratio_seconds = self.ratios(prune, owl)
            precomputed = (ratios, layer_ratios)
        self.restore()
        t0 = time.perf_counter()
        report = prune_model(self.model, prune, owl, self.calib_ids, progress=False, ratios=precomputed)
        prune_seconds = time.perf_counter() - t0
        ppl = self.score()
        return {
            "config": {**prune.to_json(), "sparsity": prune.target_sparsity, "owl": owl.to_json()},
            "perplexity": ppl.perplexity,
            "mean_nll": ppl.mean_nll,
            "nll_std_err": ppl.nll_std_err,
            "window_nll": ppl.window_nll,
            "global_sparsity": report["global_sparsity"],
            "block_sparsity": [b["sparsity"] for b in report["blocks"]],
            "outlier_ratio": [b["outlier_ratio"] for b in report["blocks"]],
            "seconds": {"owl_ratios": ratio_seconds, "prune": prune_seconds, "score": ppl.seconds},
        }


def tune_grid(
    study: Study,
    base: PruneConfig,
    grid: list[OwlConfig],
    run: Callable[[PruneConfig, OwlConfig], dict] | None = None,
) -> dict:
    """Score OWL with every (M, λ) of ``grid`` on ``study``'s tokens; also uniform as the reference point.

    ``study`` must score on held-out *calibration* text, never the evaluation text. ``run`` replaces
    ``study.run`` (e.g. to reuse rows of an interrupted run).
    """
    run = run or study.run
    uniform = run(replace(base, allocation="uniform"), grid[0] if grid else OwlConfig())
    rows = []
    for owl in grid:
        row = run(replace(base, allocation="owl"), owl)
        rows.append(
            {"m": owl.m, "lambda": owl.lambda_, **{k: row[k] for k in ("perplexity", "mean_nll", "nll_std_err")}}
        )
    best = min(rows, key=lambda r: r["mean_nll"])
    return {
        "base": base.to_json(),
        "uniform": {k: uniform[k] for k in ("perplexity", "mean_nll", "nll_std_err")},
        "grid": rows,
        "best": best,
    }
