"""Prune-and-score many configurations of one model: the quality table and ``owl-deploy tune``.

The model, its calibration windows and its evaluation tokens are loaded once; each configuration
restores the dense weights of the block linears, prunes, and scores perplexity. OWL outlier ratios
depend only on the dense model, the calibration windows and (M, granularity), so they are computed
once per M and shared by every method, allocation, sparsity and λ that uses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from owl_deploy.evaluate import Perplexity, check_seqlen, perplexity, torch_logits_fn
from owl_deploy.model import block_linears, decoder_blocks
from owl_deploy.prune import PruneConfig, block_ratios, prune_model


class Study:
    """One model + calibration windows + scoring tokens, pruned again and again from the dense weights."""

    def __init__(self, model, tokenizer, calib_ids: torch.Tensor, score_tokens: torch.Tensor, seqlen: int):
        check_seqlen(model, seqlen)
        self.model, self.tokenizer = model, tokenizer
        self.calib_ids, self.score_tokens, self.seqlen = calib_ids, score_tokens, seqlen
        self._linears = [lin for b in decoder_blocks(model) for lin in block_linears(b).values()]
        self._dense = [lin.weight.detach().clone() for lin in self._linears]
        self._ratios: dict[tuple, tuple] = {}

    def restore(self) -> None:
        """Put the dense weights back (only the block linears are ever pruned)."""
        with torch.no_grad():
            for lin, w in zip(self._linears, self._dense, strict=True):
                lin.weight.copy_(w)

    def score(self, progress: bool = False) -> Perplexity:
        return perplexity(torch_logits_fn(self.model), self.score_tokens, self.seqlen, progress=progress)

    def ratios(self, cfg: PruneConfig) -> tuple:
        """The dense model's OWL outlier ratios for ``cfg`` (cached per M, granularity, windows)."""
        key = (cfg.owl_m, cfg.granularity, cfg.owl_windows, cfg.batch_size, cfg.compute_dtype)
        if key not in self._ratios:
            self.restore()
            t0 = time.perf_counter()
            ids = self.calib_ids[: cfg.owl_windows]
            self._ratios[key] = (*block_ratios(self.model, ids, cfg, progress=False), time.perf_counter() - t0)
        return self._ratios[key]

    def run(self, cfg: PruneConfig) -> dict:
        """Prune a fresh dense copy per ``cfg`` and score it; one row of a results table."""
        cfg.validate()
        precomputed = None
        ratio_seconds = 0.0
        if cfg.allocation != "uniform":
            ratios, layer_ratios, ratio_seconds = self.ratios(cfg)
            precomputed = (ratios, layer_ratios)
        self.restore()
        t0 = time.perf_counter()
        report = prune_model(self.model, cfg, self.calib_ids, progress=False, ratios=precomputed)
        prune_seconds = time.perf_counter() - t0
        ppl = self.score()
        return {
            "config": asdict(cfg) | {"nm": report["nm"]},
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
    ms: list[float],
    lambdas: list[float],
    run: Callable[[PruneConfig], dict] | None = None,
) -> dict:
    """Score OWL for every (M, λ) of the grid on ``study``'s tokens; also uniform as the reference point.

    ``study`` must score on held-out *calibration* text, never the evaluation text. ``run`` replaces
    ``study.run`` (e.g. to reuse rows of an interrupted run).
    """
    run = run or study.run
    uniform = run(replace(base, allocation="uniform"))
    rows = []
    for m in ms:
        for lam in lambdas:
            row = run(replace(base, allocation="owl", owl_m=m, owl_lambda=lam))
            rows.append({"m": m, "lambda": lam, **{k: row[k] for k in ("perplexity", "mean_nll", "nll_std_err")}})
    best = min(rows, key=lambda r: r["mean_nll"])
    return {
        "base": asdict(base) | {"nm": f"{base.nm[0]}:{base.nm[1]}" if base.nm else None},
        "uniform": {k: uniform[k] for k in ("perplexity", "mean_nll", "nll_std_err")},
        "grid": rows,
        "best": best,
    }
