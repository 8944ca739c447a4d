"""`owl-deploy tune`: a grid over (M, λ) scored on held-out calibration text (owl-method.md item 6)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from owl_deploy.cli import main


@pytest.mark.slow
def test_tune_reports_the_grid_and_its_minimum(smollm2_dir):
    args = ["tune", "--model", str(smollm2_dir), "--sparsity", "0.5", "--grid-m", "3,5", "--grid-lambda", "0.04"]
    args += ["--nsamples", "2", "--seqlen", "64", "--heldout-tokens", "256", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert [(r["m"], r["lambda"]) for r in out["grid"]] == [(3.0, 0.04), (5.0, 0.04)]
    assert out["best"] == min(out["grid"], key=lambda r: r["mean_nll"])
    assert out["uniform"]["perplexity"] > 1 and out["base"]["method"] == "wanda"


def test_tune_rejects_out_of_range_lambda():
    res = CliRunner().invoke(main, ["tune", "--model", "smollm2-135m", "--sparsity", "0.7", "--grid-lambda", "0.6"])
    assert res.exit_code == 1
    assert "error: --grid-lambda: must be < 0.5 (got 0.6)" in res.output
