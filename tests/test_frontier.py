"""benchmarks/frontier.py's bookkeeping: the deployments it plans and the answer it gives per budget."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import frontier


def test_plan_covers_every_sparsity_precision_and_recovery():
    rows = frontier.plan([0.5, 0.7], recover=True)
    names = [r["name"] for r in rows]
    assert names[:2] == ["dense-fp32", "dense-int8"]
    assert "recovered-70-int8" in names and "pruned-50-fp32" in names and len(names) == 2 + 2 * 2 * 2
    assert not [r for r in frontier.plan([0.6], recover=False) if r["recovered"]]


def test_precisions_narrow_the_sparse_rows_and_keep_both_references(capsys):
    import pytest

    names = [r["name"] for r in frontier.plan([0.3, 0.4], recover=False, precisions=("int8",))]
    assert names == ["dense-fp32", "dense-int8", "pruned-30-int8", "pruned-40-int8"]
    assert frontier._precisions("int8,fp32") == ("fp32", "int8")
    with pytest.raises(SystemExit) as exc:
        frontier.main(["--precisions", "fp16"])
    assert exc.value.code == 2 and "expected a comma list of fp32, int8 or int8-keepN (N >= 1), got 'fp16'" in (
        capsys.readouterr().err
    )


def test_int8_keep_precisions_add_their_dense_row_and_export_with_keep_fp32_worst(capsys):
    import pytest

    assert frontier._precisions("int8-keep16,int8,int8-keep4,int8") == ("int8", "int8-keep4", "int8-keep16")
    rows = frontier.plan([0.5], recover=True, precisions=frontier._precisions("int8,int8-keep8"))
    names = [r["name"] for r in rows]
    assert names == ["dense-fp32", "dense-int8", "dense-int8-keep8", "pruned-50-int8", "pruned-50-int8-keep8",
                     "recovered-50-int8", "recovered-50-int8-keep8"]  # fmt: skip
    assert frontier.export_args("fp32") == []
    assert frontier.export_args("int8") == ["--quantize", "int8"]
    assert frontier.export_args("int8-keep8") == ["--quantize", "int8", "--keep-fp32-worst", "8"]
    for bad in ("int8-keep0", "int8-keep", "int8-keep-3", "int8-keep08"):
        with pytest.raises(SystemExit) as exc:
            frontier.main(["--precisions", f"int8,{bad}"])
        assert exc.value.code == 2 and f"got 'int8,{bad}'" in capsys.readouterr().err


def _pt(name: str, ppl: float, tok: float, source: str = "pruned", engine: str = "deepsparse") -> dict:
    return {"name": name, "perplexity": ppl, "decode_tokens_per_s": tok, "source": source, "engine": engine,
            "vs_dense_fp32_ort": tok / 10, "vs_dense_int8_ort": tok / 20}  # fmt: skip


def test_answers_pick_the_fastest_within_each_budget_and_name_a_faster_peer():
    pts = [
        _pt("dense-fp32 (ort)", 20.0, 10.0, "dense", "onnxruntime"),
        _pt("dense-int8", 21.0, 30.0, "dense"),
        _pt("pruned-50-int8", 24.0, 45.0),  # +20%: only inside the 25% budget
        _pt("pruned-70-int8", 90.0, 80.0),  # fast and broken: never chosen
        _pt("llama.cpp/q4_k_m", 21.5, 40.0, "peer", "llama.cpp"),
    ]
    ten, twenty_five = frontier.answers(pts)
    assert "the fastest deployment is dense-int8" in ten and "a peer is faster: llama.cpp/q4_k_m" in ten
    assert "the fastest deployment is pruned-50-int8" in twenty_five and "peer is faster" not in twenty_five
    assert "4.50x dense fp32 ONNX Runtime" in twenty_five


def test_versus_dense_int8_names_a_winner_or_how_far_the_best_sparse_one_is():
    ref = _pt("dense-int8", 25.0, 100.0, "dense")
    close = _pt("pruned-50-int8", 26.0, 120.0)  # +4%, faster: meets the bar
    broken = _pt("pruned-70-int8", 800.0, 150.0)
    assert frontier.versus_dense_int8([ref, close, broken]).startswith("pruned-50-int8 beats dense int8")
    slow = _pt("pruned-50-int8", 26.0, 90.0)  # close in quality, but slower
    line = frontier.versus_dense_int8([ref, slow, broken])
    assert line.startswith("no sparse deployment beats dense int8") and "pruned-50-int8" in line and "0.90x" in line


def test_a_run_left_out_of_the_bench_is_reported_with_its_quality_not_dropped():
    rows = frontier.plan([0.5], recover=True)
    speed = {"decode_tokens_per_s": {"median": 10.0, "p10": 9.0, "p90": 11.0}}
    runs = {k: speed for k in ("onnxruntime/dense", "onnxruntime/dense-int8", "deepsparse/dense-int8",
                               "deepsparse/pruned-50-fp32", "deepsparse/pruned-50-int8")}  # fmt: skip
    qual = {r["name"]: {"perplexity": {"perplexity": 20.0}, "tasks": {"lambada_wiki": {"acc": 0.3, "acc_stderr": 0.05}}}
            for r in rows}  # fmt: skip
    pts = frontier.points(rows, qual, {"runs": runs}, {})
    names = {p["name"] for p in pts}
    assert "dense-fp32" not in names and {"recovered-50-int8", "dense-fp32 (ort)"} <= names
    assert [p["name"] for p in frontier.untimed(rows, qual, {"runs": runs})] == ["dense-fp32"]


def test_bench_skip_refuses_a_reference_run(capsys):
    import pytest

    with pytest.raises(SystemExit, match="--bench-skip ort/dense: not a DeepSparse run"):
        frontier.main(["--sparsities", "0.5", "--bench-skip", "ort/dense"])


def test_bench_groups_split_the_runs_and_keep_every_ratio_within_its_own_run():
    assert frontier.groups_of(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert frontier.groups_of(["a"], 3) == [["a"]]

    def run(tok: float) -> dict:
        return {"decode_tokens_per_s": {"median": tok, "p10": tok, "p90": tok}}

    def group(ort: float, ds8: float, extra: dict) -> dict:
        runs = {"onnxruntime/dense": run(ort), "onnxruntime/dense-int8": run(2 * ort),
                "deepsparse/dense-int8": run(ds8), **extra}  # fmt: skip
        return {"runs": runs, "noise": {"noisy": False, "other_cpu_mean": 0.01, "loadavg_before": [0.1]}}

    # the second run was slower overall (say, a warmer machine): its sparse model is judged against its own refs
    merged = frontier.merge_groups([
        group(10.0, 40.0, {"deepsparse/pruned-30-int8": run(38.0)}),
        group(5.0, 20.0, {"deepsparse/pruned-40-int8": run(22.0)}),
    ])  # fmt: skip
    assert merged["groups"] == 2 and merged["runs"]["onnxruntime/dense"]["decode_tokens_per_s"]["median"] == 10.0
    rows = frontier.plan([0.3, 0.4], recover=False, precisions=("int8",))
    qual = {r["name"]: {"perplexity": {"perplexity": 20.0 + r["sparsity"]},
                        "tasks": {"lambada_wiki": {"acc": 0.3, "acc_stderr": 0.05}}} for r in rows}  # fmt: skip
    pts = {p["name"]: p for p in frontier.points(rows, qual, merged, {})}
    assert pts["pruned-40-int8"]["vs_dense_fp32_ort"] == 22.0 / 5.0  # not 22 / 10
    assert pts["pruned-40-int8"]["vs_dense_int8_ds"] == 22.0 / 20.0
    assert pts["pruned-30-int8"]["vs_dense_int8_ds"] == 38.0 / 40.0
    # 40% is slower in tok/s than dense int8's first-run figure (22 < 40) but faster within its own run
    assert frontier.versus_dense_int8(list(pts.values())).startswith("pruned-40-int8 beats dense int8")


def test_bad_numbers_are_refused_before_any_work(capsys):
    """Counts and sparsities are checked when parsed: argparse's usage and one error line, exit 2, before any work."""
    import pytest

    for argv, want in (
        (["--bench-groups", "0"], "argument --bench-groups: expected an integer ≥ 1, got '0'"),
        (["--rounds", "-1"], "argument --rounds: expected an integer ≥ 1, got '-1'"),
        (["--limit", "abc"], "argument --limit: expected an integer ≥ 1, got 'abc'"),
        (["--sparsities", "0.5,x"], "argument --sparsities: expected comma-separated numbers, got '0.5,x'"),
        (["--sparsities", "0.5,1.5"], "--sparsities: each must be between 0 and 1 (exclusive), got [0.5, 1.5]"),
    ):
        with pytest.raises(SystemExit) as exc:
            frontier.main(["--work", "/nonexistent/never", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.strip().splitlines()[-1].endswith("error: " + want), err


def test_the_table_says_how_many_layers_deepsparse_runs_sparse(tmp_path):
    import json

    import frontier_report

    layers = {"num_sparse_kernels": 1, "num_layers_reported": 197, "mean_detected_sparsity": 0.31}
    (tmp_path / "export.json").write_text(json.dumps({"ok": True, "engine_sparsity": layers}))
    check = frontier.verification(tmp_path)
    assert check == {"verified": True, "problems": [], "sparse_kernels": 1, "kernel_layers": 197}
    (tmp_path / "export.json").write_text(json.dumps({"ok": True}))  # an export without the analysis
    assert frontier.verification(tmp_path) == {"verified": True, "problems": []}

    scores = {"accuracy": None, "accuracy_stderr": None}
    sparse = {**_pt("pruned-30-int8", 19.0, 15.0), **scores, "decode_p10_p90": [14, 16], **check}
    ort = {**_pt("dense-int8 (ort)", 18.0, 10.0, "dense", "onnxruntime"), **scores, "decode_p10_p90": [9, 11]}
    hardware = {"flags": {}, "cpu_model": "cpu", "physical_cores": 2}
    res = {"model": "m", "minutes": 1.0, "bench_noisy": False, "loadavg_before": [0, 0, 0], "eval_tokens": 8,
           "limit": 2, "answers": [], "versus_dense_int8": "-", "allocations": {}, "hardware": hardware,
           "points": [sparse, ort]}  # fmt: skip
    rows = {line.split(" | ")[0]: line for line in frontier_report.markdown(res).splitlines() if line[:2] == "| "}
    assert rows["| pruned-30-int8"].endswith("| 1/197 |")
    assert rows["| dense-int8 (ort)"].endswith("| — |")
    assert "pruned as the pipeline does" not in frontier_report.markdown(res)  # a dense-only frontier prunes nothing
    res["allocations"] = {"0.3": {"allocation": "owl", "m": 8.0, "lambda": 0.15, "reason": "held-out"}}
    assert "default — 30%: owl M=8 λ=0.15 (held-out)." in frontier_report.markdown(res)
