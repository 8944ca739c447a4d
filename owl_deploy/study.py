"""Prune-and-score many configurations of one model: the quality table and ``owl-deploy tune``.

The model, its calibration windows and its evaluation tokens are loaded once; each configuration
restores the dense weights of the block linears, prunes, and scores perplexity. OWL outlier ratios
depend only on the dense model, the calibration windows and (M, granularity), so they are computed
once per M and shared by every method, allocation, sparsity and λ that uses them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from owl_deploy.configs import OwlConfig, PruneConfig, TuneConfig, replace
from owl_deploy.evaluate import Perplexity, check_seqlen, perplexity, torch_logits_fn
from owl_deploy.model import block_linears, decoder_blocks, mapped_dense
from owl_deploy.prune import block_ratios, owl_windows, prune_model


class Study:
    """One model + calibration windows + scoring tokens, pruned again and again from the dense weights."""

    def __init__(
        self,
        model,
        tokenizer,
        calib_ids: torch.Tensor,
        score_tokens: torch.Tensor,
        seqlen: int,
        checkpoint: Path | None = None,
    ):
        """``checkpoint``: the folder the (dense) model was loaded from; its block linears' weights are then
        mapped from there (:func:`mapped_dense`) instead of copied."""
        check_seqlen(model, seqlen)
        self.model, self.tokenizer = model, tokenizer
        self.calib_ids, self.score_tokens, self.seqlen = calib_ids, score_tokens, seqlen
        self._linears = [lin for b in decoder_blocks(model) for lin in block_linears(b).values()]
        mapped = mapped_dense(model, self._linears, checkpoint)
        self.dense_mapped = mapped is not None
        self._dense = mapped if mapped is not None else [lin.weight.detach().clone() for lin in self._linears]
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
            "compute_dtype": report["compute_dtype"],  # what auto resolved to, in the process that ran the row
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


# ---------------------------------------------------------------- the same study in another process (Ray)
@dataclass(frozen=True)
class StudySpec:
    """What a :class:`Study` is built from, so a worker process builds exactly the driver's study: the model,
    its calibration windows, and the scoring tokens (the first ``score_tokens`` of ``score_text``, or with
    ``heldout`` its held-out tail, as tuning scores)."""

    model: str
    calib: str
    nsamples: int
    calib_seqlen: int
    seed: int
    score_text: str
    score_tokens: int
    seqlen: int
    heldout: bool = False

    def scoring(self, tokenizer) -> torch.Tensor:
        from owl_deploy.data import eval_tokens, heldout_tokens

        if self.heldout:
            return heldout_tokens(tokenizer, self.score_text, self.score_tokens, self.seqlen)
        return eval_tokens(tokenizer, self.score_text, self.score_tokens)

    def _base(self) -> tuple:
        return (self.model, self.calib, self.nsamples, self.calib_seqlen, self.seed, self.seqlen)

    def build(self, built: dict | None = None) -> Study:
        """A study on this spec; one already ``built`` on the same model and calibration is shared (scored on
        other tokens through :meth:`Study.on`), so a worker holds one model."""
        from owl_deploy.data import calibration_windows
        from owl_deploy.specs import load_model, resolve_model

        same = next((st for sp, st in (built or {}).items() if sp._base() == self._base()), None)
        if same is not None:
            return same.on(self.scoring(same.tokenizer))
        model, tok = load_model(self.model)
        ids = calibration_windows(tok, self.calib, self.nsamples, self.calib_seqlen, self.seed)
        return Study(model, tok, ids, self.scoring(tok), self.seqlen, checkpoint=resolve_model(self.model))


# jobs: functions of a study (owl_deploy.cluster runs them by name in a worker)
def run_config(study: Study, prune: PruneConfig, owl: OwlConfig) -> dict:
    return study.run(prune, owl)


def score_dense(study: Study) -> dict:
    study.restore()
    return study.score().to_json(full=True)


def tune(study: Study, prune: PruneConfig, owl: OwlConfig, grid: TuneConfig) -> dict:
    """The tune stage on the study's model, scored on the study's (held-out) tokens."""
    from owl_deploy.tune import tune_owl

    study.restore()
    return tune_owl(study.model, study.calib_ids, study.score_tokens, prune, owl, grid, dense=study.dense)


class Checkpoint:
    """Results already computed by an interrupted run with the same arguments, kept in a hidden file next to
    the results: a crash or a kill after an hour loses one configuration, not the table. Keys are the job
    keys (``tag + repr(config)`` for a scored configuration)."""

    def __init__(self, path: Path, args: dict, say: Callable[[str], None] = print):
        self.path, self.args = path, args
        self.rows: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("args") == self.args:
                self.rows = saved["rows"]
                say(f"resuming: {len(self.rows)} results already computed in {path.name}")

    def run(self, study: Study | None, cfg: tuple[PruneConfig, OwlConfig], tag: str = "") -> dict:
        key = tag + repr(cfg)
        if key not in self.rows:
            if study is None:
                raise RuntimeError(f"internal: {key} was not computed by the workers")
            self.rows[key] = study.run(*cfg)
            self.save()
        return self.rows[key]

    def fill(self, jobs: list, address: str | None, threads: int, actors: int | None = None) -> dict[str, int]:
        """Compute the ``jobs`` (owl_deploy.cluster.Job) not already here on Ray; each result is saved as it
        arrives, each failure recorded in ``failed`` (one line) and left to the next run."""
        from owl_deploy.calibrate import worker_env
        from owl_deploy.cluster import run_jobs

        def keep(job, result, error) -> None:
            if error is None:
                self.rows[job.key] = result
                self.failed.pop(job.key, None)
                self.save()
            else:
                self.failed[job.key] = error

        todo = [j for j in dict((j.key, j) for j in jobs).values() if j.key not in self.rows]
        return run_jobs(todo, keep, address=address, threads=threads, actors=actors, env=worker_env())

    def save(self) -> None:
        from owl_deploy.io import write_json

        write_json(self.path, {"args": self.args, "rows": self.rows})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
