"""Recipes and the cached, resumable stage runner of ``owl-deploy run``.

The runner tests use the real stage graph (names, recipe keys, upstream stages, cache keys) with cheap
fake stage functions, so they do not depend on the real prune / export / compile / bench stages; the
``fetch`` stage is real (a tiny model folder). ``test_real_stages_on_a_tiny_model`` runs the real
adapters where they are cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from owl_deploy import pipeline, stages
from owl_deploy.errors import OwlError
from owl_deploy.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ALL = list(pipeline.STAGES)
DOWNSTREAM_OF_PRUNE = ["tune", "prune", "recover", "evaluate", "export", "compile", "bench"]


# ---------------------------------------------------------------- fake stages (also used in a subprocess)
def _called(ctx: pipeline.StageContext) -> None:
    """Append the stage's name to $OWL_TEST_CALLS (one line per computation, across processes)."""
    log = os.environ.get("OWL_TEST_CALLS")
    if log:
        with open(log, "a") as fh:
            fh.write(ctx.stage + "\n")
    time.sleep(float(os.environ.get("OWL_TEST_SLEEP", "0")))  # long enough for a second run to start beside it
    if os.environ.get("OWL_TEST_HANG_IN") == ctx.stage:
        (ctx.out / "partial.bin").write_bytes(b"\0" * 1024)  # half-written output, then "work" forever
        time.sleep(120)


def _fake_tune(ctx):
    _called(ctx)
    owl = ctx.recipe.owl
    return {"tuned": False, "reason": "fake", "choice": {"allocation": ctx.recipe.prune.allocation, "m": owl.m,
                                                         "lambda": owl.lambda_}}  # fmt: skip


def _fake_recover(ctx):
    _called(ctx)
    return {"model": str(ctx.upstream["prune"].file("model")), "recovered": False}


def _fake_prune(ctx):
    _called(ctx)
    src = ctx.upstream["fetch"].file("model")
    assert (src / "config.json").is_file()
    (ctx.out / "model").mkdir()
    (ctx.out / "model" / "weights.txt").write_text(f"{src} pruned to {ctx.recipe.target_sparsity}")
    return {"model": "model", "global_sparsity": ctx.recipe.target_sparsity}


def _fake_evaluate(upstream: str, ppl: float):
    def run(ctx):
        _called(ctx)
        assert (ctx.upstream[upstream].file("model") / "config.json").exists() or upstream == "recover"
        e = ctx.recipe.evaluate
        return {"perplexity": ppl, "text": e.text, "windows": 2, "seqlen": e.seqlen, "nll_std_err": 0.01}

    return run


def _fake_export(upstream: str):
    def run(ctx):
        _called(ctx)
        (ctx.out / "model").mkdir()
        (ctx.out / "model" / "model.onnx").write_text(f"{ctx.upstream[upstream].key} {ctx.recipe.export}")
        return {"model": "model"}

    return run


def _fake_compile(ctx):
    _called(ctx)
    assert (ctx.upstream["export"].file("model") / "model.onnx").is_file()
    (ctx.out / "compile.json").write_text("{}")
    return {"compile_json": "compile.json", "generated_text": " Paris"}


def _fake_bench(ctx):
    _called(ctx)
    (ctx.out / "bench").mkdir()
    (ctx.out / "bench" / "results.md").write_text("# bench\n")
    res = {
        "headline": {
            "run": "deepsparse/sparse",
            "reference": "onnxruntime/dense",
            "speedup_vs_dense_ort": 2.5,
            "decode_tokens_per_s": 50.0,
            "reference_decode_tokens_per_s": 20.0,
        },
        "runs": {},
        "noise": {"noisy": False, "reasons": []},
    }
    return stages.bench_result(res)


FAKES = {
    "tune": _fake_tune,
    "prune": _fake_prune,
    "recover": _fake_recover,
    "evaluate_dense": _fake_evaluate("fetch", 10.0),
    "evaluate": _fake_evaluate("recover", 20.0),
    "export_dense": _fake_export("fetch"),
    "export": _fake_export("recover"),
    "compile": _fake_compile,
    "bench": _fake_bench,
}


def fake_stages() -> dict[str, pipeline.Stage]:
    """The real registry (keys, dependencies) with the fake functions; ``fetch`` stays real."""
    return {n: dataclasses.replace(s, run=FAKES.get(n, s.run)) for n, s in pipeline.STAGES.items()}


def install_fakes() -> None:
    """For a subprocess running the CLI: swap the fakes into the global registry."""
    pipeline.STAGES.update(fake_stages())


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) as a Hugging Face folder, with a byte-level tokenizer."""
    from tiny_models import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "model", hidden=32, layers=2)


def write_recipe(folder: Path, model: Path, **changes: dict) -> Path:
    """A tiny recipe next to its own calibration and evaluation texts (relative paths)."""
    (folder / "calib.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    (folder / "eval.txt").write_text("Pack my box with five dozen liquor jugs.\n" * 20)
    sections = {
        "calibration": {"text": "calib.txt", "nsamples": 4, "seqlen": 32, "seed": 0},
        "prune": {"method": "wanda", "allocation": "owl", "sparsity": 0.5},
        "owl": {"m": 5, "lambda": 0.08},
        "tune": {"m": [3, 5], "lambda": [0.08, 0.15], "heldout_tokens": 160, "seqlen": 32, "nsamples": 4},
        "evaluate": {"text": "eval.txt", "seqlen": 32, "max_tokens": 256},
        "export": {"sequence_length": 64},
        "compile": {"engine": "onnxruntime", "max_new_tokens": 4},
        "bench": {"rounds": 1, "warmup_rounds": 0, "steps": 4, "context": 8, "prefill_length": 4},
    }
    for section, values in changes.items():
        sections[section] = {**sections.get(section, {}), **values}
    body = {"name": "tiny", "model": str(model), **sections}
    path = folder / "tiny.yaml"
    path.write_text(json.dumps(body, indent=2))  # JSON is YAML
    return path


def calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


# ---------------------------------------------------------------- recipes: the shipped ones and the errors
@pytest.mark.parametrize("name", ["smollm2-owl-wanda-70", "smollm2-owl-sparsegpt-70", "smollm2-owl-wanda-70-int8"])
def test_shipped_recipes_validate(name):
    recipe, recipe_name = load_recipe(ROOT / "pipelines" / f"{name}.yaml")
    assert recipe_name == name
    assert recipe.model == "smollm2-135m" and recipe.target_sparsity == 0.7
    assert recipe.prune.method == name.split("-")[2] and recipe.prune.allocation == "owl"
    assert recipe.quantize.scheme == ("int8" if name.endswith("-int8") else None)


def test_the_int8_recipe_differs_from_the_main_one_only_in_quantize():
    """So that both share fetch, prune, the evaluations and the dense export in one cache."""
    main, _ = load_recipe(ROOT / "pipelines" / "smollm2-owl-wanda-70.yaml")
    int8, _ = load_recipe(ROOT / "pipelines" / "smollm2-owl-wanda-70-int8.yaml")
    a, b = main.to_json(), int8.to_json()
    assert [k for k in a if a[k] != b[k]] == ["name", "quantize"]
    keys = {p.stage.name: p.key for p in pipeline.plan(main, ROOT / "out" / "unused")}
    keys8 = {p.stage.name: p.key for p in pipeline.plan(int8, ROOT / "out" / "unused")}
    assert [n for n in keys if keys[n] != keys8[n]] == ["export", "compile", "bench"]


def test_the_recover_recipe_differs_from_the_main_one_only_in_recover():
    """It shares fetch, tune, prune, the dense evaluation and the dense export with the main recipe's cache; what
    follows the prune runs on the recovered model, so its keys change from recover on."""
    main, _ = load_recipe(ROOT / "pipelines" / "smollm2-owl-wanda-70.yaml")
    rec, name = load_recipe(ROOT / "pipelines" / "smollm2-owl-wanda-70-recover.yaml")
    assert name == "smollm2-owl-wanda-70-recover" and rec.recover.enabled and rec.recover.method == "masked-lora"
    a, b = main.to_json(), rec.to_json()
    assert [k for k in a if a[k] != b[k]] == ["name", "recover"]
    keys = {p.stage.name: p.key for p in pipeline.plan(main, ROOT / "out" / "unused")}
    keys_rec = {p.stage.name: p.key for p in pipeline.plan(rec, ROOT / "out" / "unused")}
    assert [n for n in keys if keys[n] != keys_rec[n]] == ["recover", "evaluate", "export", "compile", "bench"]


def test_recipe_sections_are_the_stage_configs():
    """One source of truth: a recipe section is the stage's own config model (same keys, defaults, checks)."""
    from owl_deploy import configs, recipe

    sections = {n: f.annotation for n, f in recipe.Recipe.model_fields.items()}
    assert sections["calibration"] is configs.CalibrationConfig and sections["prune"] is configs.PruneConfig
    assert sections["owl"] is configs.OwlConfig and sections["export"] is configs.ExportConfig
    assert sections["quantize"] is configs.QuantizeConfig and sections["bench"] is configs.BenchConfig
    r = parse_recipe("model: smollm2-135m\nprune: {nm: 2:4, allocation: uniform}\nbench: {prefill_chunk: 0}\n")
    assert r.prune.nm_pair == (2, 4) and r.target_sparsity == 0.5
    assert r.bench.prefill_length == 1  # the old key is still read; 0 means one token per call


BAD = """\
model: smollm2-135m
calibration:
  nsamples: 128.0
owl:
  lambda: 0.6
prune:
  sparsity: 1.5
  methd: wanda
  allocation: owl-wide
bench:
  strict: "yes"
"""


def test_recipe_errors_name_the_key_and_line():
    with pytest.raises(RecipeError) as info:
        parse_recipe(BAD, "recipe.yaml")
    assert info.value.problems == [
        "recipe.yaml:3: calibration.nsamples: must be an integer (got 128.0)",
        "recipe.yaml:5: owl.lambda: must be < 0.5 (got 0.6)",
        "recipe.yaml:7: prune.sparsity: must be < 1 (got 1.5)",
        "recipe.yaml:8: prune.methd: unknown key (did you mean 'method'? allowed: "
        "method, allocation, granularity, sparsity, nm, batch_size, compute_dtype)",
        "recipe.yaml:9: prune.allocation: must be one of 'uniform', 'owl' or 'owl-inverse' (got 'owl-wide')",
        "recipe.yaml:11: bench.strict: must be true or false (got 'yes')",
    ]


M = "model: smollm2-135m\n"
MP = M + "prune: {sparsity: 0.5}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prune: {sparsity: 0.5}\n", "recipe.yaml:1: model: required key is missing"),
        (M, "recipe.yaml:1: prune: required key is missing"),
        (M + "prune: {}\n", "recipe.yaml:2: prune: give a sparsity in (0, 1) or an N:M pattern"),
        (M + "prune:\n  sparsity: 0.7\n  nm: 2:4\n", "recipe.yaml:2: prune: sparsity 0.7 contradicts nm 2:4"),
        (M + "prune: {nm: 4:2}\n", "recipe.yaml:2: prune.nm: N:M sparsity needs 1 <= N < M"),
        (M + "prune: {nm: two-four}\n", 'recipe.yaml:2: prune.nm: must be an N:M pattern such as "2:4"'),
        (MP + "prune: {sparsity: 0.6}\n", "recipe.yaml:3: prune: duplicate key (first on line 2)"),
        ("model: nope\nprune: {sparsity: 0.5}\n", "recipe.yaml:1: model: 'nope' is neither a model asset"),
        (MP + "evaluate:\n  text: wiki+missing.txt\n", "recipe.yaml:4: evaluate.text: 'missing.txt' is neither"),
        (MP + "bench:\n  context: 500\n", "recipe.yaml:4: bench.context: context 500 + steps 32 = 532 decode"),
        (MP + "bench: {prefill_chunk: 6}\n", "recipe.yaml:3: bench.prefill_chunk: must be 1 or a multiple of 4"),
        (MP + "quantize: {scheme: int8, keep_fp32: [mlp]}\n", "recipe.yaml:3: quantize.keep_fp32: mlp is not"),
        (MP + "quantize: {keep_fp32: [down_proj]}\n", "recipe.yaml:3: quantize.keep_fp32: has no effect without"),
        (MP + "quantize: {keep_fp32_worst: 4}\n", "recipe.yaml:3: quantize.keep_fp32_worst: has no effect without"),
        (MP + "quantize: {scheme: int8, keep_fp32_worst: -1}\n", "recipe.yaml:3: quantize.keep_fp32_worst: "),
        (MP + "quantize: {scheme: int4}\n", "recipe.yaml:3: quantize.scheme: must be"),
        (MP + "bench: {engines: gpu}\n", "recipe.yaml:3: bench.engines: unknown engine 'gpu'; use ds|deepsparse"),
        (MP + "owl: 5\n", "recipe.yaml:3: owl: must be a mapping of keys (got 5)"),
        (MP + "name: my recipe\n", "recipe.yaml:3: name: must be letters, digits"),
        (MP + "evaluate: {max_tokens: 0}\n", "recipe.yaml:3: evaluate.max_tokens: must be >= 1 (got 0)"),
        ("- model\n", "recipe.yaml:1: a recipe must be a mapping"),
        ("model: [smollm2\n", "recipe.yaml:2: invalid YAML"),
    ],
)
def test_recipe_error_messages(text, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "recipe.yaml")
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_yaml_1_1_surprises_are_off_and_paths_are_relative_to_the_recipe(tmp_path, tiny_dir):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("text\n")
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(
        f"model: {tiny_dir}\nprune: {{nm: 2:4}}\nowl: {{lambda: 5e-2}}\ncalibration: {{text: c.txt+news}}\n"
    )
    recipe, name = load_recipe(path)
    assert name == "r"
    assert recipe.prune.nm == "2:4" and recipe.target_sparsity == 0.5  # not the base-60 integer 124
    assert recipe.owl.lambda_ == 0.05  # a number, not the string "5e-2"
    assert recipe.calibration.text == f"{tmp_path / 'sub' / 'c.txt'}+news"


def test_cli_reports_a_bad_recipe_on_one_line_per_problem(tmp_path):
    from owl_deploy.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\nprune:\n  sparsity: 1.5\n")
    result = CliRunner().invoke(main, ["run", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"error: {bad}:3: prune.sparsity: must be < 1 (got 1.5)" in result.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- cache keys
def _changed_stages(tmp_path, tiny_dir, **changes) -> list[str]:
    base = {p.stage.name: p.key for p in pipeline.plan(load_recipe(write_recipe(tmp_path, tiny_dir))[0], tmp_path)}
    new = pipeline.plan(load_recipe(write_recipe(tmp_path, tiny_dir, **changes))[0], tmp_path)
    return [p.stage.name for p in new if base[p.stage.name] != p.key]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"prune": {"sparsity": 0.6}}, DOWNSTREAM_OF_PRUNE),
        ({"owl": {"lambda": 0.1}}, DOWNSTREAM_OF_PRUNE),
        ({"calibration": {"seed": 1}}, DOWNSTREAM_OF_PRUNE),
        ({"evaluate": {"max_tokens": 128}}, ["evaluate_dense", "evaluate"]),
        ({"export": {"sequence_length": 128}}, ["export_dense", "export", "compile", "bench"]),
        ({"quantize": {"scheme": "int8"}}, ["export", "compile", "bench"]),  # the dense reference stays fp32
        ({"compile": {"prompt": "Hello"}}, ["compile"]),
        ({"bench": {"rounds": 3}}, ["bench"]),
        ({}, []),
    ],
)
def test_a_changed_key_changes_exactly_the_downstream_cache_keys(tmp_path, tiny_dir, changes, expected):
    assert _changed_stages(tmp_path, tiny_dir, **changes) == expected


def test_cache_keys_follow_the_content_of_input_files(tmp_path, tiny_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_dir))[0]
    before = {p.stage.name: p.key for p in pipeline.plan(recipe, tmp_path)}
    (tmp_path / "calib.txt").write_text("Other calibration text entirely.\n" * 40)
    after = {p.stage.name: p.key for p in pipeline.plan(recipe, tmp_path)}
    assert [n for n in ALL if before[n] != after[n]] == DOWNSTREAM_OF_PRUNE


def test_cache_keys_do_not_depend_on_where_the_recipe_lives(tmp_path, tiny_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plans = [pipeline.plan(load_recipe(write_recipe(tmp_path / d, tiny_dir))[0], tmp_path) for d in "ab"]
    assert [p.key for p in plans[0]] == [p.key for p in plans[1]]


# ---------------------------------------------------------------- the runner
def test_run_twice_is_a_no_op_and_one_change_reruns_only_downstream(tmp_path, tiny_dir, monkeypatch):
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("OWL_TEST_CALLS", str(log))
    out = tmp_path / "cache"
    stages = fake_stages()
    recipe, name = load_recipe(write_recipe(tmp_path, tiny_dir))

    first = pipeline.run_recipe(recipe, out, name, stages=stages, log=lambda _m: None)
    assert first.ran == ALL
    assert calls(log) == ALL[1:]  # every fake ran once (fetch is real: the folder is used in place)
    done_before = {n: (out / n / d.key / "done.json").read_text() for n, d in first.done.items()}
    s = first.summary
    assert s["perplexity"]["dense"] == 10.0 and s["perplexity"]["pruned"] == 20.0
    assert s["sparsity"]["global"] == 0.5 and s["bench"]["speedup_vs_dense_ort"] == 2.5
    assert s["paths"]["deployment"] == str(out / "export" / first.done["export"].key / "model")
    assert json.loads((out / "summaries" / "tiny.json").read_text())["ran"] == ALL

    second = pipeline.run_recipe(recipe, out, name, stages=stages, log=lambda _m: None)
    assert second.ran == []
    assert calls(log) == ALL[1:]  # nothing was called again
    assert {n: (out / n / d.key / "done.json").read_text() for n, d in second.done.items()} == done_before
    lines = pipeline.summary_lines(second.summary)
    assert lines[0] == f"nothing to do: all 10 stages of tiny are cached in {out}"
    assert "perplexity (" in lines[1] and "dense 10.00 -> pruned 20.00 (x2.00)" in lines[1]
    assert lines[3] == "allocation: fake"  # what the tune stage decided, then the speed
    assert "decode speedup vs dense ONNX Runtime: 2.50x" in lines[4]

    changed, _ = load_recipe(write_recipe(tmp_path, tiny_dir, prune={"sparsity": 0.6}))
    third = pipeline.run_recipe(changed, out, name, stages=stages, log=lambda _m: None)
    assert third.ran == DOWNSTREAM_OF_PRUNE
    assert calls(log) == ALL[1:] + DOWNSTREAM_OF_PRUNE
    for stage in ("fetch", "evaluate_dense", "export_dense"):  # reused as they were
        assert third.done[stage].key == first.done[stage].key
    assert third.summary["sparsity"]["global"] == 0.6
    # both versions stay in the cache: going back is free
    back = pipeline.run_recipe(recipe, out, name, stages=stages, log=lambda _m: None)
    assert back.ran == []

    forced = pipeline.run_recipe(recipe, out, name, stages=stages, rerun=("export",), log=lambda _m: None)
    assert forced.ran == ["export", "compile", "bench"]


def test_a_failing_stage_leaves_nothing_and_the_next_run_resumes(tmp_path, tiny_dir):
    out = tmp_path / "cache"
    recipe, name = load_recipe(write_recipe(tmp_path, tiny_dir))

    def broken(ctx):
        (ctx.out / "half.onnx").write_text("x")
        raise OwlError("disk full")

    stages = fake_stages()
    stages["export"] = dataclasses.replace(stages["export"], run=broken)
    with pytest.raises(OwlError, match="stage export failed: disk full"):
        pipeline.run_recipe(recipe, out, name, stages=stages, log=lambda _m: None)
    key = {p.stage.name: p.key for p in pipeline.plan(recipe, out)}["export"]
    assert [p.name for p in (out / "export").iterdir()] == [f".{key}.lock"]  # no output, no temporary folder
    again = pipeline.run_recipe(recipe, out, name, stages=fake_stages(), log=lambda _m: None)
    assert again.ran == ["export", "compile", "bench"]


SUBPROCESS = """
import sys
sys.path.insert(0, {tests!r})
import test_pipeline
test_pipeline.install_fakes()
from owl_deploy.cli import main
main(sys.argv[1:])
"""


def _start(recipe: Path, out: Path, env: dict) -> subprocess.Popen:
    code = SUBPROCESS.format(tests=str(TESTS))
    return subprocess.Popen(
        [sys.executable, "-c", code, "run", str(recipe), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_run_killed_mid_stage_resumes_from_the_last_completed_stage(tmp_path, tiny_dir, sig):
    log = tmp_path / "calls.txt"
    out = tmp_path / "cache"
    recipe = write_recipe(tmp_path, tiny_dir)
    env = {**os.environ, "OWL_TEST_CALLS": str(log), "OWL_TEST_HANG_IN": "evaluate", "PYTHONPATH": str(ROOT)}
    rec = load_recipe(recipe)[0]
    keys = {p.stage.name: p.key for p in pipeline.plan(rec, out)}
    partial = lambda: list((out / "evaluate").glob(f".{keys['evaluate']}.tmp-*/partial.bin"))  # noqa: E731

    proc = _start(recipe, out, env)
    _wait_for(lambda: bool(partial()), proc)  # inside the evaluate stage, its output half-written
    proc.send_signal(sig)
    proc.wait(timeout=30)
    done = sorted(p.parent.parent.name for p in out.glob("*/*/done.json"))
    assert done == sorted(["fetch", "tune", "prune", "evaluate_dense", "recover"])
    assert calls(log) == ["tune", "prune", "evaluate_dense", "recover", "evaluate"]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and partial()  # no chance to clean up
    else:
        assert proc.returncode == 143 and not partial()  # SIGTERM unwinds: the partial output is removed
    before = {
        n: (out / n / keys[n] / "done.json").read_text()
        for n in ("fetch", "tune", "prune", "evaluate_dense", "recover")
    }

    env.pop("OWL_TEST_HANG_IN")
    proc = _start(recipe, out, env)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert calls(log) == ["tune", "prune", "evaluate_dense", "recover", "evaluate", *ALL[5:]]  # resumed at evaluate
    assert {n: (out / n / keys[n] / "done.json").read_text() for n in before} == before
    assert (
        "tiny: ran evaluate, export_dense, export, compile, bench; reused fetch, tune, prune, evaluate_dense, recover"
        in stdout
    )
    assert not partial() and not list(out.glob("*/.*.tmp-*"))
    assert ("removed the partial output of an interrupted run" in stderr) == (sig == signal.SIGKILL)

    proc = _start(recipe, out, env)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and stdout.startswith("nothing to do: all 10 stages of tiny are cached")


def test_two_runs_of_one_recipe_at_once_compute_each_stage_once(tmp_path, tiny_dir):
    """Two `owl-deploy run` of one recipe into one --out at the same time: the second waits on each stage's
    lock and reuses what the first computed; both end with the same, intact results."""
    log = tmp_path / "calls.txt"
    out = tmp_path / "cache"
    recipe = write_recipe(tmp_path, tiny_dir)
    env = {**os.environ, "OWL_TEST_CALLS": str(log), "OWL_TEST_SLEEP": "0.4", "PYTHONPATH": str(ROOT)}
    first = _start(recipe, out, env)
    _wait_for(lambda: bool(list(out.glob("prune/.*.lock"))), first)
    second = _start(recipe, out, env)
    results = [p.communicate(timeout=120) for p in (first, second)]
    assert first.returncode == second.returncode == 0, results
    assert sorted(calls(log)) == sorted(ALL[1:])  # every stage computed exactly once, by one of the two
    assert any("computed by another run" in err for _, err in results)
    # the same summary (paths, numbers) apart from which run computed what
    assert results[0][0].splitlines()[1:] == results[1][0].splitlines()[1:]
    assert not list(out.glob("*/.*.tmp-*")) and len(list(out.glob("*/*/done.json"))) == len(ALL)


# ---------------------------------------------------------------- the real stage adapters, where they are cheap
def test_real_stages_on_a_tiny_model(tmp_path, tiny_dir, monkeypatch):
    """fetch, prune (OWL + Wanda), both evaluations, the export of the pruned model (verified in ONNX Runtime
    and DeepSparse) and the compile check (ONNX Runtime) for real on a tiny Llama. Faked: the dense export
    (the same adapter again, ~10 s) and the benchmark (seconds of noise sampling and bandwidth measurement).
    The output folder is relative, as in ``make main`` (``out/pipeline``): stage results that point at
    another stage's folder must resolve from the stage folder, not from the working directory."""
    monkeypatch.chdir(tmp_path)
    out = Path("cache")
    recipe, name = load_recipe(write_recipe(tmp_path, tiny_dir))
    fake = ("export_dense", "bench")
    stages = {n: dataclasses.replace(s, run=FAKES[n]) if n in fake else s for n, s in pipeline.STAGES.items()}
    report = pipeline.run_recipe(recipe, out, name, stages=stages, log=lambda _m: None)
    s = report.summary
    assert report.done["fetch"].file("model") == tiny_dir
    assert abs(s["sparsity"]["global"] - 0.5) < 0.02
    assert s["perplexity"]["dense"] > 1 and s["perplexity"]["pruned"] > 1
    assert s["perplexity"]["windows"] == 256 // 32
    sparsity = json.loads((Path(s["paths"]["pruned_model"]) / "sparsity.json").read_text())
    assert sparsity["tune"]["choice"] == report.done["tune"].result["choice"] and sparsity["tune"]["reason"]
    assert sparsity["allocation"] == report.done["tune"].result["choice"]["allocation"]  # the guard's choice is used
    assert json.loads((report.done["evaluate"].path / "perplexity.json").read_text())["windows"] == 8
    assert s["export"]["ok"] and s["export"]["zeros_preserved"]
    assert abs(s["export"]["onnx_sparsity"] - s["sparsity"]["global"]) < 1e-6
    assert (Path(s["paths"]["deployment"]) / "model.onnx").is_file()
    assert s["compile"]["engine"] == "onnxruntime" and len(report.done["compile"].result["generated_tokens"]) >= 1
    lines = pipeline.summary_lines(s)
    assert any(line.startswith("export: verification passed, zeros preserved in ONNX: True") for line in lines)


def test_real_int8_export_stage_on_a_tiny_model(tmp_path, tiny_dir):
    """quantize.scheme: int8 gives an int8 deployment of the pruned model (zeros kept as the uint8 zero
    point) that compiles and generates; the dense reference export is left in fp32."""
    import onnx

    out = tmp_path / "cache"
    recipe, name = load_recipe(
        write_recipe(tmp_path, tiny_dir, quantize={"scheme": "int8", "nsamples": 2, "seqlen": 32})
    )
    fake = ("evaluate_dense", "evaluate", "export_dense", "bench")
    stages = {n: dataclasses.replace(s, run=FAKES[n]) if n in fake else s for n, s in pipeline.STAGES.items()}
    report = pipeline.run_recipe(recipe, out, name, stages=stages, log=lambda _m: None)
    s = report.summary
    assert s["export"]["quantize"] == "int8" and s["export"]["ok"] and s["export"]["zeros_preserved"]
    deployment = Path(s["paths"]["deployment"])
    exported = json.loads((deployment / "export.json").read_text())
    assert exported["int8"]["nsamples"] == 2 and "out" not in exported
    ops = {n.op_type for n in onnx.load(deployment / "model.onnx", load_external_data=False).graph.node}
    assert "MatMulInteger" in ops
    assert len(report.done["compile"].result["generated_tokens"]) >= 1
    lines = pipeline.summary_lines(s)
    assert any(line.startswith("export (int8): verification passed") for line in lines)


# ---------------------------------------------------------------- the docker image (no Docker engine here)
def test_dockerfile_installs_the_serving_install_from_pyproject_alone():
    """One source of pins: the image runs `pip install '.[serve]'` on pyproject.toml (no requirements list),
    serves (entry point, port, health check) and refuses to build with torch inside."""
    import tomllib

    text = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    assert "requirements" not in " ".join(instructions)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["optional-dependencies"]["full"]
    assert not any(d.startswith("torch") for d in project["dependencies"] + project["optional-dependencies"]["serve"])
    assert "COPY pyproject.toml README.md ./" in instructions and project["readme"] == "README.md"
    installs = [line for line in instructions if "pip install" in line]
    assert len(installs) == 2 and "'.[serve]'" in installs[0] and "--no-deps ." in installs[1]
    assert "import torch" in installs[1] and "exit 1" in installs[1]  # torch in the image fails the build
    assert 'ENTRYPOINT ["owl-deploy", "serve", "/deploy", "--host", "0.0.0.0"]' in instructions
    assert "EXPOSE 8000" in instructions and any(line.startswith("HEALTHCHECK") for line in instructions)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:4] == ["*", "!pyproject.toml", "!README.md", "!owl_deploy/"]


def test_run_max_memory_stops_at_the_first_stage_that_would_not_fit(tmp_path, tiny_dir):
    """``owl-deploy run --max-memory 1M``: fetch and tune (no estimate) run, prune refuses before it loads the
    model with the guard's one line under the stage's name, and leaves no prune folder; ``off`` lets it run."""
    from click.testing import CliRunner

    from owl_deploy.cli import main

    recipe = write_recipe(tmp_path, tiny_dir)
    out = tmp_path / "cache"
    res = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "--max-memory", "1M", "--dry-run"])
    assert res.exit_code == 0, res.output  # a dry run estimates nothing
    res = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "--max-memory", "1M"])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stage prune failed: prune would need about"), errors
    assert (out / "tune").is_dir() and not any((out / "prune").glob("*/done.json"))
    res = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "--max-memory", "bogus"])
    assert res.exit_code == 1 and "--max-memory must be" in res.output
