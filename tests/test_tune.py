"""Choosing OWL's (M, λ) on held-out calibration text, and the guard that falls back to uniform (tune.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import calib_ids, tiny_model

from owl_deploy import tune
from owl_deploy.cli import main
from owl_deploy.configs import OwlConfig, PruneConfig, TuneConfig

GRID = TuneConfig(m=[3.0, 5.0], lambda_=[0.0, 0.08, 0.2], heldout_tokens=256, seqlen=32, nsamples=4)


def _fake_scores(monkeypatch, by_lambda: dict[float, list[float]]) -> None:
    """Replace the held-out scoring with fixed per-window NLLs per λ (λ = 0 is uniform)."""
    real = tune.block_targets
    monkeypatch.setattr(tune, "block_targets", lambda p, r, lam: [(*t, lam, id(r)) for t in real(p, r, lam)])
    calls.clear()

    def fake(model, dense, stats, prune, targets, tokens, seqlen):
        key = targets[0][2:]  # (λ, which M's ratios): one candidate
        done = sum(n for k, n in calls if k == key)  # windows this candidate was already scored on
        n = len(tokens) // seqlen
        calls.append((key, n))
        return by_lambda[key[0]][done : done + n]

    monkeypatch.setattr(tune, "score_candidate", fake)


calls: list[tuple[tuple, int]] = []  # (candidate, windows) of every scoring call of the fake


def _run(monkeypatch=None, scores=None, finalists: int = 2, **prune):
    model = tiny_model("llama", layers=4)
    ids, held = calib_ids(8, 32), calib_ids(8, 32, seed=1).flatten()
    if scores is not None:
        _fake_scores(monkeypatch, scores)
    cfg = PruneConfig(**{"method": "wanda", "sparsity": 0.6, "batch_size": 4, **prune})
    return tune.tune_owl(model, ids, held, cfg, OwlConfig(), GRID.model_copy(update={"finalists": finalists}))


def test_owl_is_chosen_only_when_it_beats_uniform_beyond_its_standard_error(monkeypatch):
    uniform = [2.0, 2.1, 1.9, 2.0, 2.2, 1.8, 2.0, 2.0]
    clearly_better = [x - 0.05 for x in uniform]  # every window 0.05 lower: SE 0
    res = _run(monkeypatch, {0.0: uniform, 0.08: clearly_better, 0.2: [x + 0.1 for x in uniform]})
    assert res["owl_wins"] and res["choice"] == {"allocation": "owl", "m": 3.0, "lambda": 0.08}
    assert "beats uniform" in res["reason"]
    noisy = [x + d for x, d in zip(uniform, [-0.3, 0.3, -0.3, 0.3, -0.3, 0.3, -0.3, 0.25], strict=True)]
    res = _run(monkeypatch, {0.0: uniform, 0.08: noisy, 0.2: [x + 0.1 for x in uniform]})
    assert not res["owl_wins"] and res["choice"]["allocation"] == "uniform"  # lower mean, within its error
    assert "no OWL setting beats uniform" in res["reason"]
    best = min(res["grid"], key=lambda r: r["mean_nll"])
    assert best["delta_nll_vs_uniform"] < 0 and -best["delta_nll_vs_uniform"] < best["delta_se"]


def test_screening_scores_every_candidate_on_a_few_windows_and_only_finalists_on_all(monkeypatch):
    """Successive halving: the screen ranks candidates on the first windows; the guard sees all windows."""
    uniform = [2.0, 2.1, 1.9, 2.0, 2.2, 1.8, 2.0, 2.0]
    good_late = [2.0, 2.1, 1.9, 2.0] + [x - 0.4 for x in uniform[4:]]  # equal on the screen, better after
    good_early = [x - 0.05 for x in uniform[:4]] + [x + 0.3 for x in uniform[4:]]  # the screen's pick, worse after
    res = _run(monkeypatch, {0.0: uniform, 0.08: good_late, 0.2: good_early}, finalists=1)
    rows = {(r["m"], r["lambda"]): r for r in res["grid"]}
    assert [k for k, r in rows.items() if r["finalist"]] == [(3.0, 0.2)]  # ties on the screen keep grid order
    assert rows[(3.0, 0.2)]["windows"] == 8 and rows[(5.0, 0.08)]["windows"] == 4
    assert not res["owl_wins"] and res["best"]["lambda"] == 0.2  # worse than uniform on all windows: refused
    assert res["scored_windows"] == {"screened": 8 + 4 * 4 + 4, "exhaustive": 8 * 5}
    res = _run(monkeypatch, {0.0: uniform, 0.08: good_late, 0.2: good_early}, finalists=3)  # both λ=0.2, then 0.08
    assert res["owl_wins"] and res["choice"] == {"allocation": "owl", "m": 3.0, "lambda": 0.08}


def test_the_real_path_on_a_tiny_model():
    """Dense statistics once, every (M, λ > 0) scored; OWL's block sparsities keep the target mean."""
    res = _run()
    assert [(r["m"], r["lambda"]) for r in res["grid"]] == [(3.0, 0.08), (3.0, 0.2), (5.0, 0.08), (5.0, 0.2)]
    for row in res["grid"]:
        assert sum(row["block_sparsity"]) / 4 == pytest.approx(0.6) and len(set(row["block_sparsity"])) > 1
        assert row["delta_se"] > 0 and row["mean_nll"] > 0
    assert res["windows"] == 8 and res["calibration_windows"] == 4
    assert set(res["seconds"]) == {"dense_pass", "scoring", "per_window", "total"}
    assert res["screen_windows"] == 4 and sum(r["finalist"] for r in res["grid"]) == 2
    assert res["choice"]["allocation"] in ("owl", "uniform")


def test_scoring_restores_the_dense_weights():
    model = tiny_model("llama", layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = tune.dense_stats(model, calib_ids(4, 32), PruneConfig(sparsity=0.5), [5.0])
    dense = [lin.weight.detach().clone() for b in tune.decoder_blocks(model) for lin in tune.block_linears(b).values()]
    targets = tune.block_targets(PruneConfig(sparsity=0.5), stats.ratios[5.0], 0.2)
    tune.score_candidate(model, dense, stats, PruneConfig(sparsity=0.5), targets, calib_ids(2, 32).flatten(), 32)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_nm_candidates_move_n_per_block():
    ratios = [1.0, 2.0, 3.0, 4.0]
    targets = tune.block_targets(PruneConfig(nm="4:8"), ratios, 0.25)  # r over [0, 2] -> centred -1, -1/3, 1/3, 1
    assert [t[1] for t in targets] == [(5, 8), (4, 8), (4, 8), (3, 8)]
    assert tune.block_targets(PruneConfig(nm="2:4"), ratios, 0.0) == [(0.5, (2, 4))] * 4


@pytest.mark.slow
def test_tune_cli_on_smollm2(smollm2_dir):
    args = ["tune", "--model", str(smollm2_dir), "--sparsity", "0.7", "--grid-m", "3,5", "--grid-lambda", "0.08"]
    args += ["--nsamples", "4", "--seqlen", "128", "--heldout-tokens", "1024", "--heldout-seqlen", "256", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert [(r["m"], r["lambda"]) for r in out["grid"]] == [(3.0, 0.08), (5.0, 0.08)]
    assert out["windows"] == 4 and out["uniform"]["mean_nll"] > 0
    assert out["choice"]["allocation"] in ("owl", "uniform") and out["reason"]


def test_tune_rejects_out_of_range_lambda():
    res = CliRunner().invoke(main, ["tune", "--model", "smollm2-135m", "--sparsity", "0.7", "--grid-lambda", "0.6"])
    assert res.exit_code == 1
    assert "error: --grid-lambda: every lambda must be in [0, 0.5)" in res.output


def test_a_held_out_study_made_after_a_prune_restores_the_dense_weights():
    """The quality study's held-out grid once copied 'dense' weights from a model left pruned by the last row."""
    from owl_deploy.study import Study

    model = tiny_model("llama", layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    study = Study(model, None, calib_ids(4, 32), calib_ids(2, 32, seed=2).flatten(), 32)
    study.run(PruneConfig(sparsity=0.7, allocation="uniform"))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    held = study.on(calib_ids(2, 32, seed=3).flatten())
    held.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not torch.equal(held.score_tokens, study.score_tokens) and held.dense is study.dense


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_study_maps_its_dense_weights_from_the_checkpoint_and_gives_the_same_rows(tmp_path, arch):
    """Two workers of a 1.5B study did not fit 23 GB with a private dense copy each; the mapped one must give
    the same rows, and a model that is not what its folder holds must get a private copy."""
    from owl_deploy.study import Study

    model = tiny_model(arch, layers=2)
    model.save_pretrained(tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = PruneConfig(sparsity=0.7, allocation="owl")

    def study(checkpoint=None):
        return Study(model, None, calib_ids(4, 32), calib_ids(2, 32, seed=2).flatten(), 32, checkpoint=checkpoint)

    mapped = study(tmp_path)
    assert mapped.dense_mapped
    row = mapped.run(cfg)
    mapped.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    copied = study()
    assert not copied.dense_mapped
    again = copied.run(cfg)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in row.items() if k != "seconds"}
    # the model now holds pruned weights, not its folder's: no mapping
    assert not study(tmp_path).dense_mapped
