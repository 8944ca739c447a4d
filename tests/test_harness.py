"""Zero-shot accuracy through lm-evaluation-harness on local task files: the items, and the same answer from a
torch model and from its exported deployment."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from tiny_models import save_tiny

from owl_deploy.cli import main
from owl_deploy.errors import OwlError
from owl_deploy.harness import evaluate_tasks, lambada_items, task_dir


def test_lambada_items_take_the_last_plain_word_of_long_paragraphs():
    long = " ".join(["word"] * 45)
    text = "\n".join(
        [
            "too short to be a passage.",
            f"{long} and the answer is Paris.",
            f"{long} ends in a number 42.",  # not a word: skipped
            f'{long} ends inside a quote "cheese".',  # the word is not after a space: skipped
            f"{long} then comes the end of it, wine!",
            " ".join(["x"] * 250) + " toolong",  # more than 200 words: skipped
        ]
    )
    items = lambada_items(text)
    assert items == [
        {"context": f"{long} and the answer is", "target": "Paris"},
        {"context": f"{long} then comes the end of it,", "target": "wine"},
    ]
    assert lambada_items(text, limit=1) == items[:1]


def test_the_task_file_is_made_once_from_the_evaluation_text():
    folder = task_dir("lambada_wiki")
    data = [json.loads(line) for line in (folder / "lambada_wiki.jsonl").read_text().splitlines()]
    assert len(data) > 200 and all(d["target"].isalpha() and len(d["target"]) >= 3 for d in data)
    assert task_dir("lambada_wiki") == folder  # deterministic: the same text, the same folder
    with pytest.raises(OwlError, match="unknown task"):
        task_dir("hellaswag")


def test_torch_model_and_its_deployment_score_the_same(tmp_path):
    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    model = save_tiny("llama", tmp_path / "model")
    odir = tmp_path / "odir"
    export_model(model, odir, ExportConfig(sequence_length=256, greedy_tokens=2), engines=("onnxruntime",))
    torch_res = evaluate_tasks(str(model), ["lambada_wiki"], limit=6)["lambada_wiki"]
    onnx_res = evaluate_tasks(str(odir), ["lambada_wiki"], limit=6)["lambada_wiki"]
    assert torch_res["items"] == onnx_res["items"] == 6
    assert torch_res["acc"] == onnx_res["acc"] and onnx_res["acc_stderr"] >= 0
    # the same log-likelihoods up to the engines' float differences (compared as mean NLL: a random model's
    # perplexity is astronomically large, so its exponential magnifies them)
    assert math.log(onnx_res["perplexity"]) == pytest.approx(math.log(torch_res["perplexity"]), rel=1e-3)
    res = CliRunner().invoke(main, ["eval", "--model", str(odir), "--tasks", "lambada_wiki", "--limit", "3"])
    assert res.exit_code == 0 and "lambada_wiki: accuracy" in res.output and "on 3 items" in res.output
    res = CliRunner().invoke(main, ["eval", "--model", str(odir), "--tasks", "lambada_wiki", "--limit", "3", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["tasks"]["lambada_wiki"]["items"] == 3  # stdout: JSON only
    res = CliRunner().invoke(main, ["eval", "--model", str(odir), "--tasks", "nope"])
    assert res.exit_code == 1 and "unknown task(s) nope" in res.stderr
