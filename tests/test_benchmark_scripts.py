"""The benchmark scripts' own bookkeeping: an interrupted quality run resumes without re-scoring."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality

from owl_deploy.configs import OwlConfig, PruneConfig


class CountingStudy:
    """Stands in for owl_deploy.study.Study: counts the configurations it is asked to prune and score."""

    def __init__(self):
        self.calls: list[tuple[PruneConfig, OwlConfig]] = []

    def run(self, prune: PruneConfig, owl: OwlConfig) -> dict:
        self.calls.append((prune, owl))
        return {"config": {"sparsity": prune.sparsity}, "perplexity": 10.0 + len(self.calls)}


def _args(**changes) -> argparse.Namespace:
    base = dict(
        model="m", eval_text="wiki", calib="news", eval_tokens=1024, seqlen=512, nsamples=8, calib_seqlen=256, seed=0
    )
    return argparse.Namespace(**(base | changes))


def test_quality_checkpoint_resumes_only_for_the_same_arguments(tmp_path):
    path = tmp_path / ".quality-m.partial.json"
    a, b = (PruneConfig(sparsity=0.5), OwlConfig()), (PruneConfig(sparsity=0.6), OwlConfig())
    study = CountingStudy()
    first = quality.checkpoint(path, _args())
    row_a = first.run(study, a)
    assert first.run(study, a) is row_a and len(study.calls) == 1  # the same config is scored once
    assert path.is_file()  # written after every configuration

    # a new run with the same arguments (the "crash" happened before b): a is reused, b is scored
    again = CountingStudy()
    resumed = quality.checkpoint(path, _args())
    assert resumed.run(again, a)["perplexity"] == row_a["perplexity"] and again.calls == []
    resumed.run(again, b)
    assert again.calls == [b]
    # the held-out tuning rows live apart from the evaluation rows of the same config
    resumed.run(again, a, tag="held-out ")
    assert again.calls == [b, a]

    # other arguments (here the evaluation size): nothing is reused
    other = CountingStudy()
    quality.checkpoint(path, _args(eval_tokens=2048)).run(other, a)
    assert other.calls == [a]
    resumed.remove()
    assert not path.exists()


@pytest.mark.parametrize(("text", "ok"), [("wanda,sparsegpt", True), ("wanda,gptq", False), ("", False)])
def test_quality_method_list_is_checked(text, ok):
    parse = quality._names(quality.METHODS)
    if ok:
        assert parse(text) == text.split(",")
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="choose from magnitude, wanda, sparsegpt"):
            parse(text)


def test_quality_default_methods_may_be_none_but_not_unknown():
    """``--default-methods ''`` runs no 'pipeline default' rows (the recorded Qwen command predates them)."""
    parse = quality._names(quality.METHODS, empty=True)
    assert parse("") == [] and parse("wanda") == ["wanda"]
    with pytest.raises(argparse.ArgumentTypeError, match="choose from"):
        parse("gptq")
    args = argparse.Namespace(default_methods=parse(""), sparsities=[0.5, 0.7], only={}, **_grid_args())
    assert quality.default_tunes(args) == []
    args.default_methods, args.compute_dtype = ["wanda"], "bfloat16"
    assert [p.compute_dtype for _, _, p, _ in quality.default_tunes(args)] == ["bfloat16", "bfloat16"]


def _grid_args() -> dict:
    return dict(default_grid_m=[5.0], default_grid_lambda=[0.08], default_tune_tokens=1024, seqlen=512,
                calib_seqlen=256, default_tune_nsamples=8)  # fmt: skip


def test_quality_configs_restrict_a_method_to_some_sparsities():
    args = argparse.Namespace(
        nsamples=8,
        calib_seqlen=256,
        seed=0,
        sparsities=[0.5, 0.6, 0.7],
        methods=["wanda", "sparsegpt"],
        allocations=["uniform", "owl", "owl-inverse"],
        only={"sparsegpt": [0.7]},
        nm=[],
        nm_lambda=0.25,
        compute_dtype="float32",
    )
    got = [(p.method, p.allocation, p.sparsity) for p, _ in quality.configs(args)]
    wanda = [("wanda", a, s) for s in (0.5, 0.6, 0.7) for a in ("uniform", "owl", "owl-inverse")]
    assert sorted(got) == sorted([*wanda, ("sparsegpt", "uniform", 0.7), ("sparsegpt", "owl", 0.7)])
    assert all(owl == OwlConfig() for _, owl in quality.configs(args))  # the paper's M, λ unless tuned
    # every row runs (and is keyed by) the study's compute dtype: a float32 study never resumes bf16 rows
    assert {p.compute_dtype for p, _ in quality.configs(args)} == {"float32"}
    assert "float32" in repr(quality.configs(args)[0])


def test_recovery_compare_pairs_windows_before_and_after_recovery(tmp_path):
    import json

    import recovery_compare

    settings = {"method": "lora", "rank": 64, "alpha": 128.0, "lr": 0.0002, "steps": 120}

    def folder(name: str, pruned: list[float], merged: list[float], allocation: str, method: str = "wanda") -> str:
        d = tmp_path / name
        d.mkdir()
        rec = {"window_nll": {"pruned": pruned, "merged_remasked": merged}, "settings": settings, "wall_seconds": 1.0,
               "perplexity": {"pruned": 2.0, "merged_remasked": 1.5}, "perplexity_text": "wiki"}  # fmt: skip
        (d / "recover.json").write_text(json.dumps(rec))
        calib = {"nsamples": 128, "seqlen": 512, "text": "news"}
        (d / "sparsity.json").write_text(json.dumps({"method": method, "allocation": allocation, "calibration": calib}))
        return f"{name}={d}"

    uni = folder("uniform", [3.0, 3.2, 3.1, 2.9], [2.0, 2.2, 2.1, 1.9], "uniform")
    # better pruned, same recovered
    owl = folder("owl", [2.8, 3.0, 2.9, 2.7], [2.01, 2.19, 2.12, 1.9], "owl", "sparsegpt")
    rows = recovery_compare.compare([recovery_compare.load(uni), recovery_compare.load(owl)])
    assert rows[0]["pruned"]["verdict"] == "reference"
    assert rows[1]["pruned"]["verdict"] == "better" and rows[1]["pruned"]["delta_nll"] == pytest.approx(-0.2)
    assert rows[1]["merged_remasked"]["verdict"] == "same within noise"
    md = recovery_compare.markdown({"rows": rows, "text": "wiki", "windows": 4})
    # what differs between recoveries is named on each row: the method, the calibration and the recovery's settings
    assert "| owl | sparsegpt, owl, 128×512 | lora r64 α128, lr 0.0002, 120 steps | 2.00 |" in md
    assert "| uniform | wanda, uniform, 128×512 |" in md
    assert recovery_compare.recovered_how({}) == "?, lr ?, ? steps"
    masked = {"method": "masked-lora", "rank": 64, "alpha": 128.0, "lr": 2e-4, "steps": 200}
    assert recovery_compare.recovered_how(masked) == "masked-lora r64 α128, lr 0.0002, 200 steps"
    shaped = {**masked, "batch_size": 2, "seqlen": 512}
    assert recovery_compare.recovered_how(shaped) == "masked-lora r64 α128, lr 0.0002, 200 steps of 2×512"
    assert recovery_compare.recovered_how({**shaped, "mix": "equal"}).endswith("of 2×512, equal mix")
    norms = recovery_compare.recovered_how({**masked, "norms": True})
    assert norms.startswith("masked-lora r64 α128 + norms and biases,")
    with pytest.raises(SystemExit, match="LABEL=FOLDER"):
        recovery_compare.load(f"x={tmp_path}")


def _cgroup_writable() -> bool:
    import os

    import export_memory as script

    return any(os.access(p, os.W_OK) and p.exists() for p in (script.CGROUP_V1, script.CGROUP_V2))


def test_memory_script_runs_an_export_and_reads_an_earlier_one(tmp_path):
    """benchmarks/export_memory.py on a tiny model: one export run in its own process, one reused, each beside its
    estimate; bad --run specs are refused before anything runs."""
    import json

    import export_memory as script
    from tiny_models import save_tiny

    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    model = save_tiny("llama", tmp_path / "m", hidden=32, layers=2)
    earlier = tmp_path / "earlier"
    export_model(model, earlier, ExportConfig(sequence_length=64, greedy_tokens=4), engines=("onnxruntime",))
    stem = tmp_path / "res" / "memory-tiny"
    argv = ["--model", str(model), "--sequence-length", "64", "--out", str(stem)]
    assert script.main([*argv, "--run", "fp32", "--reuse", f"old={earlier}"]) == 0
    result = json.loads(stem.with_name("memory-tiny.json").read_text())
    run, old = result["runs"]["fp32"], result["runs"]["old"]
    assert run["exit_code"] == 0 and run["cgroup"] is None and "--max-memory off" in run["command"]
    for m in (run["measured"], old["measured"]):
        assert m["ok"] and m["peak_rss_gb"] > 0 and m["estimate_gb"] > 0 and "export_onnx" in m["phases_mb"]
    assert run["measured"]["anon_peak_gb"] <= run["measured"]["peak_rss_gb"]
    md = stem.with_name("memory-tiny.md").read_text()
    assert "| fp32 | — | 0 |" in md
    assert script.main([*argv, "--rerender"]) == 0  # the estimates again from what was recorded: same numbers
    assert stem.with_name("memory-tiny.md").read_text() == md
    assert json.loads(stem.with_name("memory-tiny.json").read_text()) == result
    assert script.main(["--model", str(model), "--run", "fp16", "--out", str(stem)]) == 1
    assert script.main(["--model", str(model), "--run", "fp32@lots", "--out", str(stem)]) == 1


@pytest.mark.skipif(not _cgroup_writable(), reason="needs a writable memory cgroup (root)")
def test_memory_script_hard_limit_kills_an_export_past_it(tmp_path):
    """Under a cgroup far below what it needs, the export is refused up front by its own guard (same limit
    passed as --max-memory) and the run records the failure with its one-line reason."""
    import json

    import export_memory as script
    from tiny_models import save_tiny

    model = save_tiny("llama", tmp_path / "m", hidden=32, layers=2)
    stem = tmp_path / "memory-tiny"
    argv = ["--model", str(model), "--sequence-length", "64", "--out", str(stem)]
    assert script.main([*argv, "--run", "fp32@500M"]) == 0
    run = json.loads(stem.with_name("memory-tiny.json").read_text())["runs"]["fp32@500M"]
    assert run["exit_code"] == 1 and run["error"].startswith("error: export would need about")
    assert run["cgroup"]["limit_bytes"] == 500_000_000 and "measured" not in run


def test_prune_memory_script_runs_prunes_in_their_own_processes(tmp_path):
    """benchmarks/prune_memory.py on a tiny model: two runs of the same options, each in its own process, prune
    block by block and write the same weights; each is recorded beside its estimate."""
    import json

    import prune_memory as script
    from tiny_models import save_tiny

    model = save_tiny("llama", tmp_path / "m", hidden=32, layers=2)
    stem = tmp_path / "res" / "prune-memory-tiny"
    args = ["--", "--method", "magnitude", "--allocation", "uniform", "--sparsity", "0.5"]
    assert script.main(["--model", str(model), "--run", "a", "--run", "b", "--out", str(stem), *args]) == 0
    result = json.loads(stem.with_name("prune-memory-tiny.json").read_text())
    a, b = result["runs"]["a"], result["runs"]["b"]
    assert a["exit_code"] == b["exit_code"] == 0 and "--max-memory off" in a["command"]
    assert a["weights_digest"] == b["weights_digest"]
    for m in (a["measured"], b["measured"]):
        assert m["loading"] == "block by block" and m["global_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert m["peak_rss_gb"] > 0 and m["estimate_gb"] > 0 and m["estimate"].startswith(f"{m['estimate_gb']:.1f}")
    assert "| a | block by block | — | 0 |" in stem.with_name("prune-memory-tiny.md").read_text()
    bad = ["--model", str(model), "--run", "a", "--out", str(stem), "--", "--out", "x"]
    assert script.main(bad) == 1


@pytest.mark.skipif(not _cgroup_writable(), reason="needs a writable memory cgroup (root)")
def test_prune_memory_script_under_a_hard_limit(tmp_path):
    """Under a cgroup below its estimate, the prune is refused up front by its own guard and the run records why."""
    import json

    import prune_memory as script
    from tiny_models import save_tiny

    model = save_tiny("llama", tmp_path / "m", hidden=32, layers=2)
    stem = tmp_path / "prune-memory-tiny"
    argv = ["--model", str(model), "--run", "x@500M", "--out", str(stem), "--", "--sparsity", "0.5"]
    assert script.main(argv) == 0
    run = json.loads(stem.with_name("prune-memory-tiny.json").read_text())["runs"]["x@500M"]
    assert run["exit_code"] == 1 and run["error"].startswith("error: prune would need about")
    assert run["cgroup"]["limit_bytes"] == 500_000_000 and "measured" not in run


def test_quality_same_compares_shared_rows_bit_for_bit():
    import quality_same

    def study(nll_owl: list[float], ray: bool) -> dict:
        def row(alloc, nll, seconds):
            cfg = {"method": "wanda", "allocation": alloc, "sparsity": 0.7, "nm": None, "compute_dtype": "auto"}
            return {"config": cfg, "perplexity": 2.0, "window_nll": nll, "block_sparsity": [0.7], "seconds": seconds}

        return {
            "meta": {"ray": {"address": "127.0.0.1:1"} if ray else None},
            "dense": {"perplexity": 1.5, "window_nll": [0.4, 0.41]},
            "rows": [row("uniform", [1.0, 1.1], 3.0), row("owl", nll_owl, 4.0)],
        }

    rows = quality_same.compare(study([0.9, 1.0], False), study([0.9, 1.0 + 2**-40], True))
    assert [(r["row"], r["same"]) for r in rows] == [("dense", True), ("wanda 70%", True), ("OWL+wanda 70%", False)]
    assert rows[2]["max_window_diff"] == 2**-40  # timings differ in every row and are not compared
    b = study([0.9, 1.0], True)
    b["rows"][0]["config"]["sparsity"] = 0.6
    assert [r["row"] for r in quality_same.compare(study([0.9, 1.0], False), b)] == ["dense", "OWL+wanda 70%"]

    # a study cut off (or still running) is compared from its checkpoint: finished rows only, held-out ones left out
    full = study([0.9, 1.0], True)
    owl = full["rows"][1]
    held = {**owl, "window_nll": [5.0, 5.0]}
    partial = {"args": {}, "rows": {"dense": full["dense"], "(owl)": owl, "held-out (owl)": held}}
    rows = quality_same.compare(partial, full)
    assert [(r["row"], r["same"]) for r in rows] == [("dense", True), ("OWL+wanda 70%", True)]
    del partial["rows"]["dense"]
    assert [r["row"] for r in quality_same.compare(partial, full)] == ["OWL+wanda 70%"]
    assert "did not complete" in quality_same.markdown("a.partial.json", "b.partial.json", partial, partial, rows)


def test_quality_report_says_where_a_study_ran():
    """A cluster study's header names the cluster, the CPU's ISA and the dtype, and does not pass the driver's
    memory off as the study's; a serial one from before those fields existed renders as it did."""
    import json

    import quality_report

    root = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    ray = json.loads((root / "quality-qwen2.5-coder-1.5b-ray2-xeon-avx512.json").read_text())
    head = quality_report.markdown(ray).splitlines()[2:4]
    assert "on Ray at 127.0.0.1:60631, 1 thread(s) per worker, float32 calibration forwards" in head[0]
    assert "AVX512-BF16" in head[0] and "(the driver; the Ray workers are not counted)" in head[1]
    old = json.loads((root / "quality-qwen2.5-coder-1.5b.json").read_text())
    head = quality_report.markdown(old).splitlines()[2:4]
    assert "(Intel(R) Xeon(R) Processor, 2 threads, torch" in head[0] and "calibration forwards" not in head[0]
    assert head[1].endswith("Peak RSS 18755 MB.")


def test_prune_speed_names_the_cpu_isa_and_what_auto_picks():
    """A prune-speed result says which ISA its bf16 ran on; a result recorded before the flags renders its name."""
    import prune_speed

    flags = {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_int8": False}
    new = {"cpu_model": "Intel(R) Xeon(R) Processor", "flags": flags, "auto_compute_dtype": "bfloat16"}
    assert prune_speed.cpu_line(new) == "Intel(R) Xeon(R) Processor, AVX512-BF16; `auto` computes in bfloat16 here"
    assert prune_speed.cpu_line({"cpu_model": "AMD EPYC"}) == "AMD EPYC"


def test_peers_times_the_runs_asked_for_and_always_the_reference():
    """peers.py --engines times our int8 deployments in DeepSparse beside the peers; dense ORT stays the
    reference; without it, every deployment in ORT and DeepSparse on the sparse one; a typo is one line."""
    import peers as peers_script

    from owl_deploy.errors import OwlError

    deps = {"dense": Path("d"), "sparse": Path("s"), "dense-int8": Path("i")}
    asked = peers_script.timed_runs("ds/sparse,ds/dense-int8", deps)
    assert asked == [("onnxruntime", "dense"), ("deepsparse", "sparse"), ("deepsparse", "dense-int8")]
    default = peers_script.timed_runs(None, deps)
    assert ("deepsparse", "sparse") in default and ("deepsparse", "dense-int8") not in default
    assert {("onnxruntime", m) for m in deps} <= set(default)
    with pytest.raises(OwlError, match="unknown model 'int8'"):
        peers_script.timed_runs("ds/int8", deps)


def test_peers_prepare_only_writes_no_report(monkeypatch, tmp_path, capsys):
    """peers.py --no-quality without --bench prepares and prints the folders; a report with nothing measured
    would replace the recorded one of the same name, so none is written."""
    import peers as peers_script

    import owl_deploy.specs

    prepared = {"llama.cpp/q8_0": tmp_path / "work" / "llama.cpp-q8_0"}
    monkeypatch.setattr(owl_deploy.specs, "resolve_model", lambda spec: tmp_path / spec)
    monkeypatch.setattr(peers_script.peers, "prepare_peers", lambda *args, **kwargs: prepared)
    results = tmp_path / "results"
    results.mkdir()
    peers_script.main(["--model", "m", "--peers", "llama.cpp/q8_0", "--no-quality", "--results", str(results)])
    assert list(results.iterdir()) == []
    assert f"llama.cpp/q8_0: {prepared['llama.cpp/q8_0']}" in capsys.readouterr().out


def test_comma_lists_of_the_scripts_parse_check_and_fail_in_one_line():
    from owl_deploy.cli_options import arg_list, number_list
    from owl_deploy.errors import OwlError

    assert number_list("1, 4,16,") == [1, 4, 16] and number_list("0,2.5", float) == [0.0, 2.5]
    assert number_list("") == []  # no floor: the click options' empty list
    parse = arg_list()
    assert parse("1,16") == [1, 16]
    for bad, msg in (("1,x", "expected comma-separated integers, got '1,x'"), ("0,4", "expected integers ≥ 1"),
                     ("", "expected integers ≥ 1")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse(bad)
    with pytest.raises(OwlError, match="numbers ≥ 0"):
        number_list("-1.5", float, least=0)
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=arg_list(), default="1,4,16")
    assert p.parse_args([]).concurrency == [1, 4, 16]
    # counts (rounds, steps, tokens): positive_int, argparse's one-line error for anything else
    from owl_deploy.cli_options import positive_int

    assert positive_int("3") == 3
    for bad in ("0", "-2", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected an integer ≥ 1, got '{bad}'"):
            positive_int(bad)
