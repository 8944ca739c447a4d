"""The decode benchmark: statistics, the regression gate, noise detection, the bytes-per-token ceiling,
and short end-to-end runs in both engines on tiny decode graphs built here in the export contract.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from owl_deploy import bench
from owl_deploy.bench import gate, machine, measure, report, sessions, weights
from owl_deploy.configs import BenchConfig, build
from owl_deploy.contract import Contract, GraphSpec
from owl_deploy.errors import OwlError
from owl_deploy.versions import isa_label


# ---------------------------------------------------------------- a tiny decode graph in the contract
def export_tiny(
    out: Path,
    seq_len: int = 64,
    sparsity: float = 0.0,
    hidden_heads: int = 2,
    head_dim: int = 16,
    mlp: int = 128,
    vocab: int = 128,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A 2-layer attention + MLP decoder with DeepSparse's KV-cache inputs/outputs (static n = 1, L)."""
    import onnx
    import torch
    from torch import nn

    kv, hd = hidden_heads, head_dim
    hid = kv * hd

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)

            def r(*shape):
                return nn.Parameter(torch.randn(*shape, generator=g) * 0.2, requires_grad=False)

            self.embed, self.pos = r(vocab, hid), r(2 * seq_len, hid)
            self.w = nn.ParameterList(r(*s) for _ in range(layers) for s in [(hid, hid)] * 4 + [(hid, mlp), (mlp, hid)])
            self.lm = r(hid, vocab)
            if sparsity:
                for p in [*self.w, self.lm]:
                    thr = p.abs().flatten().kthvalue(int(p.numel() * sparsity)).values
                    p.data[p.abs() <= thr] = 0.0

        def forward(self, input_ids, attention_mask, positions, causal_mask, *past):
            n = input_ids.shape[1]
            x = self.embed[input_ids] + self.pos[positions]
            bias = (1 - causal_mask * attention_mask.unsqueeze(1).unsqueeze(1)).float() * -1e9
            presents = []
            for i in range(layers):
                wq, wk, wv, wo, w1, w2 = self.w[6 * i : 6 * i + 6]
                q, k, v = ((x @ w).reshape(1, n, kv, hd).transpose(1, 2) for w in (wq, wk, wv))
                pk, pv = torch.cat((past[2 * i], k), dim=2), torch.cat((past[2 * i + 1], v), dim=2)
                att = torch.softmax(q @ pk.transpose(2, 3) * hd**-0.5 + bias, dim=-1)
                x = x + (att @ pv).transpose(1, 2).reshape(1, n, hid) @ wo
                x = x + torch.relu(x @ w1) @ w2
                presents += [pk, pv]
            return (x @ self.lm, *presents)

    out.mkdir(parents=True, exist_ok=True)
    ins = ["input_ids", "attention_mask", "positions", "causal_mask"]
    outs = ["logits"]
    dyn = {"input_ids": {1: "n"}, "positions": {1: "n"}, "attention_mask": {1: "L"}, "causal_mask": {2: "n", 3: "L"}}
    dyn["logits"] = {1: "n"}
    for i in range(layers):
        for kind in ("key", "value"):
            ins.append(f"past_key_values.{i}.{kind}")
            outs.append(f"present.{i}.{kind}")
            dyn[f"past_key_values.{i}.{kind}"] = {2: "past"}
            dyn[f"present.{i}.{kind}"] = {2: "L"}
    n, total = 2, 8  # trace with no dimension equal to 1
    args = (
        torch.zeros(1, n, dtype=torch.int64),
        torch.ones(1, total, dtype=torch.int64),
        torch.arange(total - n, total)[None],
        torch.ones(1, 1, n, total, dtype=torch.int64),
        *[torch.zeros(1, kv, total - n, hd) for _ in range(2 * layers)],
    )
    path = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            Tiny().eval(),
            args,
            str(path),
            input_names=ins,
            output_names=outs,
            dynamic_axes=dyn,
            opset_version=14,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    static = {
        "input_ids": [1, 1],
        "positions": [1, 1],
        "attention_mask": [1, seq_len],
        "causal_mask": [1, 1, 1, seq_len],
    }
    for inp in proto.graph.input:
        dims = [1, kv, seq_len - 1, hd] if inp.name.startswith("past") else static[inp.name]
        shape = inp.type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = d
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))
    (out / "export.json").write_text(json.dumps({"sequence_length": seq_len}))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_tiny")
    return {"dense": export_tiny(root / "dense"), "sparse": export_tiny(root / "sparse", sparsity=0.7)}


FAST = dict(measure_bandwidth=False, gap_seconds=0.0)


def _hardware():
    hw = machine.hardware_info(measure_bandwidth=False, deepsparse_view=False)
    hw["memory_read_gb_per_s"] = {"1_thread": 10.0, "all_cores": 20.0}
    return hw


def test_isa_label_names_the_widest_matrix_isa():
    """The same CPU name came with AMX, with AVX512-BF16 alone and as an AVX2 EPYC: the label tells them apart."""
    amx = {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_int8": True}
    assert isa_label(amx) == "AMX"
    assert isa_label(amx | {"amx_int8": False}) == "AVX512-BF16"
    assert isa_label({"avx2": True, "avx512f": True}) == "AVX-512"
    assert isa_label({"avx2": True}) == "AVX2"
    assert isa_label({}) == ""
    assert isa_label(_hardware()["flags"]) in {"AMX", "AVX512-BF16", "AVX-512", "AVX2", ""}


# ---------------------------------------------------------------- statistics and options
def test_summarize_median_and_percentiles():
    s = measure.summarize([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    assert s["median"] == 6 and s["n"] == 11
    assert s["p10"] == pytest.approx(2.0) and s["p90"] == pytest.approx(10.0)
    assert measure.summarize([])["median"] is None
    assert measure.summarize([float("nan"), 2.0])["n"] == 1


def test_parse_engines():
    assert len(measure.parse_engines(None)) == 4
    assert measure.parse_engines("ds/sparse") == [("onnxruntime", "dense"), ("deepsparse", "sparse")]
    assert ("onnxruntime", "sparse") in measure.parse_engines("ort")
    with pytest.raises(OwlError, match="unknown engine"):
        measure.parse_engines("tensorrt/sparse")
    with pytest.raises(OwlError, match="unknown model"):
        measure.parse_engines("ds/medium")


# ---------------------------------------------------------------- the regression gate
def _synthetic(speedups: dict[str, float], cpu: str = "Test CPU") -> dict:
    runs = {"onnxruntime/dense": {"speedup_vs_dense_ort": 1.0, "decode_tokens_per_s": {"median": 20.0}}}
    for key, sp in speedups.items():
        # absolute speeds deliberately unrelated to the ratio: the gate must look at ratios only
        runs[key] = {"speedup_vs_dense_ort": sp, "decode_tokens_per_s": {"median": 999.0}}
    return {
        "schema": measure.SCHEMA,
        "runs": runs,
        "headline": {"run": "deepsparse/sparse", "reference": "onnxruntime/dense"},
        "hardware": {"cpu_model": cpu},
        "noise": {"noisy": False},
    }


def test_gate_passes_within_tolerance_and_fails_beyond_it():
    base = _synthetic({"deepsparse/sparse": 1.00, "deepsparse/dense": 0.50, "onnxruntime/sparse": 1.0})
    ok = gate.compare(
        _synthetic({"deepsparse/sparse": 0.91, "deepsparse/dense": 0.55, "onnxruntime/sparse": 1.0}), base, 0.10
    )
    assert ok["passed"] and not ok["regressed"]
    assert {c["run"] for c in ok["checks"]} == {"deepsparse/sparse", "deepsparse/dense", "onnxruntime/sparse"}

    bad = gate.compare(
        _synthetic({"deepsparse/sparse": 0.89, "deepsparse/dense": 0.50, "onnxruntime/sparse": 1.0}), base, 0.10
    )
    assert not bad["passed"] and bad["regressed"] == ["deepsparse/sparse"]
    msg = gate.gate_message(bad)
    assert "deepsparse/sparse" in msg and "11.0% below" in msg and "deepsparse/dense" not in msg

    # a control regressing is named too; the exact boundary is not a regression
    ctl = gate.compare(
        _synthetic({"deepsparse/sparse": 0.90, "deepsparse/dense": 0.30, "onnxruntime/sparse": 1.0}), base, 0.10
    )
    assert ctl["regressed"] == ["deepsparse/dense"]
    assert gate.compare(_synthetic({"deepsparse/sparse": 0.5}), base, 0.6)["passed"]


def test_gate_notes_missing_runs_and_other_hardware():
    base = _synthetic({"deepsparse/sparse": 1.0, "deepsparse/dense": 0.5}, cpu="Other CPU")
    res = gate.compare(_synthetic({"deepsparse/sparse": 1.2}), base, 0.1)
    assert res["passed"]
    assert any("deepsparse/dense" in n for n in res["notes"])
    assert any("different CPU" in n for n in res["notes"])
    with pytest.raises(OwlError, match="tolerance"):
        gate.compare(res, base, 1.5)


def test_cli_gate_exit_status_names_the_engine(tmp_path, monkeypatch):
    """The command writes BDIR, then exits 3 naming the regressed engine (benchmark stubbed out)."""
    from click.testing import CliRunner

    from owl_deploy.cli import main

    base_file = tmp_path / "base.json"
    base_file.write_text(json.dumps(_synthetic({"deepsparse/sparse": 1.5, "deepsparse/dense": 0.5})))
    current = _full_synthetic({"deepsparse/sparse": 1.2, "deepsparse/dense": 0.5})
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: copy.deepcopy(current))
    out = tmp_path / "bdir"
    args = ["bench", "--sparse", "S", "--dense", "D", "--baseline", str(base_file), "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == bench.EXIT_REGRESSION, r.output
    assert "regression: deepsparse/sparse" in r.output and "20.0% below" in r.output
    written = json.loads((out / "results.json").read_text())
    assert written["gate"]["passed"] is False and written["gate"]["regressed"] == ["deepsparse/sparse"]
    assert (out / "results.md").is_file() and (out / "decode.png").is_file()

    base_file.write_text(json.dumps(_synthetic({"deepsparse/sparse": 1.25})))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output

    base_file.write_text("{}")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "not a results.json" in r.output


def _full_synthetic(speedups: dict[str, float], noisy: bool = False) -> dict:
    """A complete results dictionary (what run_benchmark returns) for the reporting code."""
    stat = {"median": 10.0, "p10": 9.0, "p90": 11.0, "mean": 10.0, "min": 8.0, "max": 12.0, "n": 10}
    runs = {}
    for key, sp in {"onnxruntime/dense": 1.0, **speedups}.items():
        engine, model = key.split("/")
        runs[key] = {
            "engine": engine,
            "model": model,
            "decode_tokens_per_s": {**stat, "median": 10.0 * sp},
            "decode_step_ms": stat,
            "decode_tokens_per_s_by_round": [10.0 * sp],
            "prefill_tokens_per_s": stat,
            "compile_seconds": 1.0,
            "bytes_per_token": 100,
            "bytes_per_token_encoding": "dense",
            "ceiling_tokens_per_s": 50.0,
            "speedup_vs_dense_ort": sp,
            "speedup_by_round": stat,
            "fraction_of_ceiling": 0.2,
        }
    weights = {"sparsity": 0.7}
    bpt = {"dense": 100, "bitmask": 40}
    return {
        "schema": measure.SCHEMA,
        "settings": {
            "context": 8,
            "steps": 4,
            "rounds": 1,
            "warmup_rounds": 1,
            "sequence_length": 16,
            "prefill_length": 4,
        },
        "models": {m: {"path": m, "weights": weights, "bytes_per_token": bpt} for m in ("sparse", "dense")},
        "runs": runs,
        "headline": {
            "run": "deepsparse/sparse",
            "reference": "onnxruntime/dense",
            "speedup_vs_dense_ort": speedups.get("deepsparse/sparse"),
            "speedup_by_round": stat,
            "decode_tokens_per_s": 12.0,
            "reference_decode_tokens_per_s": 10.0,
            "ceiling_speedup_bytes": 2.5,
        },
        "agreement": {},
        "noise": {
            "noisy": noisy,
            "reasons": ["synthetic"] if noisy else [],
            "loadavg_before": [0, 0, 0],
            "loadavg_after": [0, 0, 0],
            "other_cpu_before": 0.0,
            "other_cpu_mean": 0.0,
            "other_cpu_rounds": [0.0],
            "own_cpu_mean": 2.0,
        },
        "hardware": {
            "cpu_model": "Test CPU",
            "physical_cores": 2,
            "logical_cpus": 2,
            "flags": {"avx2": True},
            "memory_gb": 1.0,
        },
        "versions": {"python": "3.11"},
    }


# ---------------------------------------------------------------- noise
def test_noise_verdict_thresholds():
    policy = machine.NoisePolicy()
    quiet = {
        "loadavg_before": [0.3, 0.2, 0.1],
        "other_cpu_before": 0.05,
        "other_cpu_mean": 0.04,
        "other_cpu_rounds": [0.03, 0.6],
        "round_seconds": [2.0, 0.1],
        "steal_mean": 0.0,
    }
    assert machine.noise_verdict(quiet, policy, cpus=2) == []  # a burst in a too-short round is not judged
    busy = {**quiet, "other_cpu_mean": 0.9, "top_other_during": [{"pid": 7, "command": "cc1plus", "cores": 0.9}]}
    reasons = machine.noise_verdict(busy, policy, cpus=2)
    assert len(reasons) == 1 and "0.90 cores" in reasons[0] and "cc1plus (pid 7)" in reasons[0]
    assert machine.noise_verdict({**quiet, "loadavg_before": [2.5, 1, 1]}, policy, cpus=2)
    assert machine.noise_verdict({**quiet, "other_cpu_rounds": [0.03, 0.7], "round_seconds": [2, 2]}, policy, 2)
    assert machine.noise_verdict({**quiet, "steal_mean": 0.3}, policy, cpus=2)


def test_two_speeds_and_the_cpu_phase_check():
    """The CPU's own phases: two groups of session-rounds, found only when the slow one spans sessions."""
    sp = machine.two_speeds([1.0, 1.02, 1.38, 0.99, 1.41])
    assert (sp["fast"], sp["slow"], sp["slow_over_fast"]) == (3, 2, 1.4) and sp["cut"] == pytest.approx(1.2, abs=0.01)
    assert machine.two_speeds([1.0, 1.1, 1.15])["slow"] == 0 and machine.two_speeds([])["fast"] == 0
    policy = machine.NoisePolicy()

    def pts(rows):
        return [{"session": k, "relative": r, "seconds": sec} for k, r, sec in rows]

    both = pts([("ds", 1.0, 0.3), ("ds", 1.4, 0.3), ("ort", 1.0, 0.5), ("ort", 1.38, 0.5), ("ds", 0.98, 0.3)])
    ph = machine.speed_phases(both, policy)
    assert ph["two_speeds"] and ph["slow_sessions"] == ["ds", "ort"] and ph["slow_rounds"] == 2
    one = pts([("ds", 1.0, 0.3), ("ds", 1.4, 0.3), ("ort", 1.0, 0.5), ("ort", 1.02, 0.5)])
    assert not machine.speed_phases(one, policy)["two_speeds"]  # one engine's quirk, not the machine
    assert machine.speed_phases(pts([("ds", 1.0, 0.3), ("ds", 1.5, 0.3)]), policy)["two_speeds"]  # the only session
    short = pts([("ds", 1.0, 0.01), ("ds", 1.4, 0.01), ("ort", 1.0, 0.01), ("ort", 1.4, 0.01)])
    assert machine.speed_phases(short, policy) == {"judged_rounds": 0, "slow_rounds": 0, "slow_over_fast": None,
                                                   "slow_sessions": [], "two_speeds": False}  # fmt: skip
    quiet = {"loadavg_before": [0.3, 0.2, 0.1], "other_cpu_before": 0.0, "other_cpu_mean": 0.0, "steal_mean": 0.0}
    assert machine.noise_verdict({**quiet, "cpu_speed": machine.speed_phases(one, policy)}, policy, cpus=2) == []
    (reason,) = machine.noise_verdict({**quiet, "cpu_speed": ph}, policy, cpus=2)
    assert "two speeds: 2 of 5 session-rounds were 1.39x slower" in reason and "in 2 sessions" in reason
    # the bench's samples as points: each round's median step over the session's usual one
    smp = measure.Samples(rounds=[100.0, 80.0, 100.0], round_seconds=[0.32, 0.4, 0.32])
    assert measure.phase_points({"ds/sparse": smp}) == pts(
        [("ds/sparse", 1.0, 0.32), ("ds/sparse", 1.25, 0.4), ("ds/sparse", 1.0, 0.32)]
    )


def test_noisy_machine_detected_with_a_busy_loop(tmp_path_factory):
    """A busy loop beside a short benchmark: flagged, named by pid; --strict refuses before compiling.

    ONNX Runtime only: DeepSparse's pinned threads slow down by orders of magnitude beside a busy
    loop (that collapse is why the check exists), which would make this test slow.
    """
    root = tmp_path_factory.mktemp("bench_busy")
    model = export_tiny(root / "m", seq_len=160, hidden_heads=4, head_dim=64, mlp=1024, vocab=2048)
    policy = machine.NoisePolicy(before_sample_seconds=0.3)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        cfg = BenchConfig(context=8, steps=150, rounds=3, warmup_rounds=1, **FAST)
        res = bench.run_benchmark(
            {"dense": model}, [("onnxruntime", "dense")], cfg, policy, headline=None, log=None, hardware=_hardware()
        )
        noise = res["noise"]
        assert noise["noisy"], noise
        assert noise["other_cpu_mean"] > policy.other_cpu_mean
        assert busy.pid in [p["pid"] for p in noise["top_other_during"]]
        assert any("during the timed sessions" in r for r in noise["reasons"])
        strict = BenchConfig(context=8, steps=150, rounds=3, warmup_rounds=1, strict=True, **FAST)
        with pytest.raises(bench.NoisyMachine, match="busy"):
            bench.bench_command({"dense": model}, root / "never", strict, log=None, policy=policy)
        assert not (root / "never").exists()
    finally:
        busy.kill()
        busy.wait()


# ---------------------------------------------------------------- bytes per token
def test_bytes_per_token_ceiling_math(tmp_path):
    """Exact byte counts on a hand-built graph: fp32 MatMul, int8 MatMulInteger, Gather table, a norm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((16, 8), np.float32)
    w.flat[:32] = 1.0  # 32 of 128 nonzero
    q = np.full((8, 4), 128, np.uint8)
    q.flat[:8] = 7  # 8 of 32 differ from the zero point 128
    emb = np.ones((100, 16), np.float32)
    norm = np.ones(16, np.float32)
    inits = [
        numpy_helper.from_array(w, "model.layers.0.mlp.up_proj.weight.T"),
        numpy_helper.from_array(q, "lm_head.weight.T"),
        numpy_helper.from_array(emb, "model.embed_tokens.weight"),
        numpy_helper.from_array(norm, "norm.weight"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp_w"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp_x"),
    ]
    nodes = [
        helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["x"]),
        helper.make_node("Mul", ["x", "norm.weight"], ["xn"]),
        helper.make_node("MatMul", ["xn", "model.layers.0.mlp.up_proj.weight.T"], ["h"]),
        helper.make_node("Cast", ["h"], ["hq"], to=TensorProto.UINT8),
        helper.make_node("MatMulInteger", ["hq", "lm_head.weight.T", "zp_x", "zp_w"], ["li"]),
        helper.make_node("Cast", ["li"], ["logits"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 4])],
        inits,
    )
    proto = helper.make_model(graph)
    spec = GraphSpec(
        num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, hidden_size=8, vocab_size=4, max_positions=0
    )
    contract = Contract(spec, 10, 10, 1, 9, "float32", [], [])
    stats, bpt = weights.weight_statistics(proto, tmp_path, contract)
    kv = 2 * 1 * 2 * 10 * 4 * 4  # key+value x layers x kv heads x L x head_dim x fp32
    small = 16 * 4 + 1 + 1 + 16 * 4  # norm, two zero points, one embedding row
    assert bpt["kv_cache"] == kv
    assert bpt["weights_dense"] == 128 * 4 + 32 * 1 + small
    assert bpt["weights_bitmask"] == (32 * 4 + 128 // 8) + (8 * 1 + 32 // 8) + small
    assert bpt["dense"] == bpt["weights_dense"] + kv and bpt["bitmask"] == bpt["weights_bitmask"] + kv
    assert stats["nnz"] == 40 and stats["numel"] == 160
    assert stats["sparsity_excluding_lm_head"] == pytest.approx(0.75)
    assert stats["lm_head_sparsity"] == pytest.approx(0.75)
    assert stats["sparsity_by_role"] == {"lm_head": pytest.approx(0.75), "up_proj": pytest.approx(0.75)}
    # the model-level numbers the reference quotes: 70% sparse fp32 with a bitmask ~ 1.325 B/weight vs 4
    dense_w = np.ones((1000, 1000), np.float32)
    dense_w.flat[:700_000] = 0
    g2 = helper.make_graph(
        [helper.make_node("MatMul", ["a", "W"], ["logits"])],
        "g2",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1000])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        [numpy_helper.from_array(dense_w, "W")],
    )
    _, b2 = weights.weight_statistics(helper.make_model(g2), tmp_path, contract)
    assert b2["weights_bitmask"] / 1e6 == pytest.approx(1.325) and b2["weights_dense"] == 4_000_000
    onnx.checker.check_model(proto)


# ---------------------------------------------------------------- inputs and the contract
def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    with pytest.raises(OwlError, match=r"^model 'sparse': .*missing: no such folder$"):
        weights.load_model_info(tmp_path / "missing", "sparse")
    with pytest.raises(OwlError, match="not a deployment folder"):
        weights.load_model_info(tmp_path, "sparse")
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(OwlError, match="not a readable ONNX"):
        weights.load_model_info(tmp_path, "dense")
    cfg = BenchConfig(context=40, steps=32, **FAST)
    with pytest.raises(OwlError, match="exceeds the deployment's sequence length 64"):
        bench.run_benchmark(tiny, measure.parse_engines(None), cfg, log=None, hardware=_hardware())
    with pytest.raises(OwlError, match="context: must be >= 1"):
        build(BenchConfig, {"context": 0})
    with pytest.raises(OwlError, match="prefill_length: must be 1 or a multiple of 4"):
        build(BenchConfig, {"prefill_length": 6})
    with pytest.raises(OwlError, match="--prompt-lengths 65 exceeds the deployment's sequence length 64"):
        cfg = BenchConfig(context=8, steps=4, prompt_lengths=[65], **FAST)
        bench.run_benchmark(tiny, measure.parse_engines(None), cfg, log=None, hardware=_hardware())
    with pytest.raises(OwlError, match="batch sizes must be 1 to 256"):
        build(BenchConfig, {"batch_sizes": [0, 4]})


def _contract_greedy(folder: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding that feeds ONNX Runtime through the export contract alone (numpy KV cache, one
    token per call): an implementation independent of owl_deploy.runtime to check the benchmark's sessions."""
    import onnxruntime as ort

    from owl_deploy import contract

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros(i.shape, np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    total = sess.get_inputs()[1].shape[1]
    out_names = [o.name for o in sess.get_outputs()]
    tokens, token = [], None
    for pos, t in enumerate([*prompt, *([None] * steps)]):
        token = t if t is not None else token
        res = dict(zip(out_names, sess.run(None, {**contract.feeds([token], pos, total), **past}), strict=True))
        past = {n: res[n.replace("past_key_values", "present")][:, :, 1:, :] for n in past}
        if pos >= len(prompt) - 1:
            token = int(np.argmax(res["logits"][0, -1]))
            tokens.append(token)
    return tokens[:steps]


def test_sessions_decode_what_the_contract_alone_decodes(tiny):
    """The benchmark's sessions (DeepSparse internal cache, prefill in chunks of 4; ONNX Runtime one
    token at a time) produce the greedy tokens of a direct, contract-only feeding of the graph."""
    info = weights.load_model_info(tiny["dense"], "dense")
    prompt = [5, 9, 17, 3, 11, 2, 40, 8, 1, 99]
    want = _contract_greedy(tiny["dense"], prompt, 6)
    for engine, chunk in (("deepsparse", 4), ("onnxruntime", 1)):
        session = sessions.RuntimeSession(engine, info, BenchConfig(prefill_length=chunk))
        first, seconds = session.prefill(prompt)
        times, tokens, logits = session.decode(first, 5)
        assert [first, *tokens] == want, engine
        assert seconds > 0 and len(times) == 5 and logits.shape == (128,)


# ---------------------------------------------------------------- statistics from samples (pure)
def _samples(steps_ms: list[float], rounds: list[float]) -> measure.Samples:
    return measure.Samples(steps=[ms / 1e3 for ms in steps_ms], rounds=rounds, prefill=[100.0, 120.0])


def test_run_stats_speedups_and_ceilings_from_hand_numbers():
    """Speedup = ratio of median decode tok/s; per round, the paired ratio; ceiling = bandwidth / bytes."""
    samples = {
        "onnxruntime/dense": _samples([50, 50, 40], [20.0, 25.0]),  # median step 50 ms: 20 tok/s
        "deepsparse/sparse": _samples([20, 25, 20], [50.0, 40.0]),  # median step 20 ms: 50 tok/s
    }
    bpt = {"onnxruntime/dense": {"dense": 400, "bitmask": 400}, "deepsparse/sparse": {"dense": 400, "bitmask": 100}}
    runs = measure.run_stats(samples, bpt, "onnxruntime/dense", bandwidth_gb_per_s=1e-6)  # 1000 bytes/s
    ds, ort = runs["deepsparse/sparse"], runs["onnxruntime/dense"]
    assert ds["decode_tokens_per_s"]["median"] == pytest.approx(50.0)
    assert ds["speedup_vs_dense_ort"] == pytest.approx(2.5) and ort["speedup_vs_dense_ort"] == pytest.approx(1.0)
    assert ds["speedup_by_round"]["median"] == pytest.approx((50 / 20 + 40 / 25) / 2)  # rounds paired
    assert ds["decode_throughput_tokens_per_s"] == pytest.approx(3 / 0.065, rel=1e-3)  # outliers included
    assert ds["bytes_per_token_encoding"] == "bitmask" and ds["ceiling_tokens_per_s"] == pytest.approx(10.0)
    assert ort["ceiling_tokens_per_s"] == pytest.approx(2.5) and ds["fraction_of_ceiling"] == pytest.approx(5.0)
    head = measure.headline_of(runs, bpt, "onnxruntime/dense", "deepsparse/sparse")
    assert head["speedup_vs_dense_ort"] == pytest.approx(2.5) and head["ceiling_speedup_bytes"] == pytest.approx(4.0)
    assert "second_reference" not in head
    assert measure.headline_of(runs, bpt, "onnxruntime/dense", "deepsparse/dense") is None


def test_headline_second_reference_is_the_dense_int8_peer():
    samples = {
        "onnxruntime/dense": _samples([100], [10.0, 10.0]),
        "onnxruntime/dense-int8": _samples([40], [30.0, 20.0]),
        "deepsparse/sparse": _samples([20], [60.0, 40.0]),
    }
    bpt = {k: {"dense": 1000, "bitmask": 1000} for k in samples} | {
        "deepsparse/sparse": {"dense": 1000, "bitmask": 200}
    }
    bpt["onnxruntime/dense-int8"] = {"dense": 300, "bitmask": 300}
    runs = measure.run_stats(samples, bpt, "onnxruntime/dense", None)
    head = measure.headline_of(runs, bpt, "onnxruntime/dense", "deepsparse/sparse")
    assert head["second_reference"] == "onnxruntime/dense-int8"
    assert head["speedup_vs_second_reference"] == pytest.approx(50 / 25)  # medians: 50 tok/s vs 25 tok/s
    assert head["speedup_vs_second_reference_by_round"]["median"] == pytest.approx(2.0)  # 60/30 and 40/20
    assert head["ceiling_speedup_bytes_vs_second_reference"] == pytest.approx(1.5)
    assert runs["deepsparse/sparse"]["ceiling_tokens_per_s"] is None  # no bandwidth measured
    assert "dense int8 reference" in report.render_markdown(
        _full_synthetic({"deepsparse/sparse": 2.0}) | {"headline": head}
    )


def test_every_ratio_also_against_the_strongest_peer():
    """The fastest peer run (llama.cpp, the standard ORT export) is the second yardstick of every run and of
    the headline; per round the ratios are paired like the ones against dense ORT."""
    samples = {
        "onnxruntime/dense": _samples([100], [10.0, 10.0]),
        "deepsparse/sparse": _samples([20], [60.0, 40.0]),  # 50 tok/s
        "llama.cpp/q8_0": _samples([25], [50.0, 30.0]),  # 40 tok/s: the strongest peer
        "ort-standard/dense-int8": _samples([50], [20.0, 20.0]),  # 20 tok/s
    }
    bpt = {k: {"dense": 1000, "bitmask": 1000} for k in samples}
    bpt["deepsparse/sparse"] = {"dense": 1000, "bitmask": 200}
    bpt["llama.cpp/q8_0"] = {"dense": 300, "bitmask": 300}
    peers = ["llama.cpp/q8_0", "ort-standard/dense-int8"]
    runs = measure.run_stats(samples, bpt, "onnxruntime/dense", None, peers)
    assert measure.strongest_peer(runs, peers) == "llama.cpp/q8_0"
    assert runs["onnxruntime/dense"]["speedup_vs_strongest_peer"] == pytest.approx(10 / 40)
    assert runs["ort-standard/dense-int8"]["speedup_vs_strongest_peer"] == pytest.approx(20 / 40)
    assert runs["llama.cpp/q8_0"]["speedup_vs_strongest_peer"] == pytest.approx(1.0)
    head = measure.headline_of(runs, bpt, "onnxruntime/dense", "deepsparse/sparse", peers)
    assert head["strongest_peer"] == "llama.cpp/q8_0" and head["strongest_peer_decode_tokens_per_s"] == 40.0
    assert head["speedup_vs_strongest_peer"] == pytest.approx(50 / 40)
    assert head["speedup_vs_strongest_peer_by_round"]["median"] == pytest.approx((60 / 50 + 40 / 30) / 2)
    assert head["ceiling_speedup_bytes_vs_strongest_peer"] == pytest.approx(1.5)  # 300 / 200 bytes
    assert (
        "speedup_vs_strongest_peer" not in measure.run_stats(samples, bpt, "onnxruntime/dense", None)["llama.cpp/q8_0"]
    )
    res = _full_synthetic({"deepsparse/sparse": 5.0}) | {"headline": head, "strongest_peer": "llama.cpp/q8_0"}
    for run in res["runs"].values():
        run["speedup_vs_strongest_peer"] = 0.5
    md = report.render_markdown(res)
    assert "Against the strongest peer, llama.cpp/q8_0" in md and "| vs strongest peer |" in md
    assert any("vs llama.cpp/q8_0" in line for line in report.summary_lines(res))


# ---------------------------------------------------------------- end to end, both engines
def test_end_to_end_tiny_both_engines(tiny, tmp_path):
    cfg = BenchConfig(context=8, steps=4, rounds=2, warmup_rounds=1, prefill_length=4, **FAST)
    policy = machine.NoisePolicy(before_sample_seconds=0.3)
    res = bench.run_benchmark(tiny, measure.parse_engines(None), cfg, policy, log=None, hardware=_hardware())
    assert set(res["runs"]) == {"deepsparse/sparse", "deepsparse/dense", "onnxruntime/sparse", "onnxruntime/dense"}
    for run in res["runs"].values():
        d = run["decode_tokens_per_s"]
        assert d["n"] == 8 and d["p10"] <= d["median"] <= d["p90"]  # steps x rounds, warm-up excluded
        assert run["prefill_tokens_per_s"]["n"] == 2
        assert len(run["decode_tokens_per_s_by_round"]) == 2
        assert run["ceiling_tokens_per_s"] > 0
    assert res["runs"]["deepsparse/sparse"]["kv_cache"] == "internal"
    assert res["runs"]["onnxruntime/sparse"]["kv_cache"] == "external"
    head = res["headline"]
    assert head["run"] == "deepsparse/sparse" and head["speedup_vs_dense_ort"] > 0
    assert head["ceiling_speedup_bytes"] > 1.0  # 70% zeros read fewer bytes with a bitmask
    sp = res["models"]["sparse"]["weights"]["sparsity"]
    assert sp == pytest.approx(0.7, abs=0.01) and res["models"]["dense"]["weights"]["sparsity"] == 0.0
    for label in ("sparse", "dense"):  # both engines run the same computation
        assert res["agreement"][label]["same_greedy_tokens"]
        assert res["agreement"][label]["first_step_max_abs_logit_diff"] < 1e-3
    assert {"loadavg_before", "loadavg_after", "other_cpu_mean", "reasons"} <= set(res["noise"])
    assert res["settings"]["prefill_length"] == 4 and res["settings"]["sequence_length"] == 64
    assert res["versions"]["deepsparse"] == "1.8.0"

    out = report.write_results(res, tmp_path / "bdir")
    loaded = gate.load_results(out)
    assert (
        loaded["runs"]["deepsparse/sparse"]["decode_tokens_per_s"]
        == res["runs"]["deepsparse/sparse"]["decode_tokens_per_s"]
    )
    assert "Headline" in (out / "results.md").read_text()
    # the Markdown is a function of the JSON: re-rendering results.json gives the same file
    assert report.render_markdown(json.loads((out / "results.json").read_text())) == (out / "results.md").read_text()
    assert (out / "decode.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bdir")]  # nothing half-written left


def test_results_never_replace_a_folder_holding_other_files(tmp_path):
    """--out is replaced whole, so a folder with anything a bench did not write is refused (nothing lost, nothing
    written); a bench's own folder is rewritten; a file is not a folder. bench_command checks before the run."""
    from owl_deploy.bench import bench_command
    from owl_deploy.errors import OwlError

    res = _full_synthetic({"deepsparse/sparse": 1.3, "deepsparse/dense": 0.6})
    mine = report.write_results(res, tmp_path / "mine")
    report.write_results(res, mine)  # its own files: rewritten
    assert sorted(p.name for p in mine.iterdir()) == sorted(report.RESULT_FILES)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "eval.json").write_text("{}")
    with pytest.raises(OwlError, match=r"holds files a bench did not write \(eval.json\)"):
        report.write_results(res, mixed)
    assert [p.name for p in mixed.iterdir()] == ["eval.json"]
    with pytest.raises(OwlError, match="holds files a bench did not write"):
        bench_command({"dense": tmp_path / "no-such-deployment"}, mixed)  # refused before anything runs
    (tmp_path / "file").write_text("x")
    with pytest.raises(OwlError, match="is a file, not a folder"):
        report.check_out_dir(tmp_path / "file")


def test_reports_render_a_noisy_run(tmp_path):
    res = _full_synthetic({"deepsparse/sparse": 1.3, "deepsparse/dense": 0.6}, noisy=True)
    md = report.render_markdown(res)
    assert "NOISY RUN" in md and "1.300x" in md
    report.render_png(res, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_cli_extra_model_label_errors(tiny, tmp_path):
    from click.testing import CliRunner

    from owl_deploy.cli import main

    base = ["bench", "--sparse", str(tiny["sparse"]), "--dense", str(tiny["dense"]), "--out", str(tmp_path / "b")]
    for bad, msg in ((["--model", "nolabel"], "LABEL=ODIR"), (["--model", f"dense={tiny['dense']}"], "is taken")):
        res = CliRunner().invoke(main, [*base, *bad])
        assert res.exit_code == 1 and msg in res.output
    res = CliRunner().invoke(main, [*base, "--model", f"peer={tiny['dense']}", "--engines", "ort/nope"])
    assert res.exit_code == 1 and "unknown model 'nope'" in res.output
    assert not (tmp_path / "b").exists()


def test_cli_peer_option_errors_are_one_line(tiny, tmp_path):
    """--peer is checked before anything compiles: its syntax, its engine, its file (and, when they are
    missing, the optional extra the peer needs is named)."""
    from click.testing import CliRunner

    from owl_deploy import peers
    from owl_deploy.cli import main

    base = ["bench", "--dense", str(tiny["dense"]), "--out", str(tmp_path / "b")]
    for bad, msg in (
        (["--peer", "llama.cpp/q8_0"], "ENGINE/LABEL=PATH"),
        (["--peer", "vllm/x=y"], "unknown engine 'vllm'"),
        (["--peer", "ort-standard/dense=/nonexistent/peer"], "no such file or folder"),
    ):
        res = CliRunner().invoke(main, [*base, *bad])
        missing = peers.available(bad[1].split("/")[0]) if "=" in bad[1] and "vllm" not in bad[1] else None
        assert res.exit_code == 1 and (msg in res.output or (missing and "[peers]" in res.output)), res.output
        assert res.output.count("\n") == 1  # one line
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny Llama through the real exporter (the batched path re-declares the graph's batch dimension)."""
    from tiny_models import save_tiny

    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    root = tmp_path_factory.mktemp("bench_exported")
    out = root / "odir"
    cfg = ExportConfig(sequence_length=64, prefill_length=4, greedy_tokens=0)
    export_model(save_tiny("llama", root / "model"), out, cfg, engines=("onnxruntime",))
    return out


def test_single_model_prefill_lengths_and_batched_throughput(exported):
    """No dense model: statistics without speedups. Prefill/TTFT per prompt length; batch 2 decodes through
    the serving path, every row equal to batch 1 of the same plan (fp32: ONNX Runtime's tokens), aggregate = 2 x per
    stream."""
    cfg = BenchConfig(context=8, steps=4, rounds=2, warmup_rounds=1, prefill_length=4, batch_sizes=[2],
                      prompt_lengths=[4, 16], **FAST)  # fmt: skip
    runs = measure.parse_engines(None, ["sparse"])
    res = bench.run_benchmark({"sparse": exported}, runs, cfg, log=None, hardware=_hardware())
    assert set(res["runs"]) == {"deepsparse/sparse", "onnxruntime/sparse"}
    assert res["headline"] is None
    for key, run in res["runs"].items():
        assert run["speedup_vs_dense_ort"] is None
        assert set(run["prefill_by_length"]) == {"4", "16"}
        for n, v in run["prefill_by_length"].items():
            assert v["ttft_ms"]["n"] == 2  # one per timed round
            assert v["tokens_per_s"]["min"] == pytest.approx(int(n) / (v["ttft_ms"]["max"] / 1e3), rel=1e-6)
        tp = res["throughput"][key]
        assert list(tp) == ["1", "2"]
        assert tp["1"]["same_greedy_tokens_as_batch_1"] is None
        two = tp["2"]
        assert two["per_stream_tokens_per_s"]["n"] == 8  # steps x timed rounds
        assert two["aggregate_tokens_per_s"]["median"] == pytest.approx(2 * two["per_stream_tokens_per_s"]["median"])
        assert two["same_greedy_tokens_as_batch_1"] is True, key
        # the server's caches: one inside DeepSparse per row (fp32 graph), numpy arrays in ONNX Runtime
        assert two["kv_cache"] == ("internal (batched)" if key.startswith("deepsparse") else "external (batched)")
    md = report.render_markdown(res)
    assert "Decode throughput by batch size" in md and "time to first token" in md
    rows = report.table_rows(res)
    # read back from JSON (keys sorted as strings): prompt lengths and batch sizes still in numeric order
    reread = report.table_rows(json.loads(json.dumps(res, sort_keys=True)))
    assert [r["test"] for r in reread if r["engine"] == "deepsparse"] == ["pp4", "pp16", "tg4@d8", "tg4@d8"]
    tests = {(r["engine"], r["batch"], r["test"]) for r in rows}
    assert ("deepsparse", 2, "tg4@d8") in tests and ("onnxruntime", 1, "pp16") in tests
    assert "| DeepSparse | sparse |" in report.render_table(res)


def test_cli_prints_the_table_without_out_and_refuses_bad_formats(exported, tmp_path):
    import csv
    import io

    from click.testing import CliRunner

    from owl_deploy.cli import main

    args = ["bench", "--sparse", str(exported), "--engines", "ort", "--context", "8", "--steps", "2",
            "--rounds", "1", "--warmup-rounds", "0", "--prompt-lengths", "4", "--batch-sizes", "1,2"]  # fmt: skip
    res = CliRunner().invoke(main, [*args, "--csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert {(r["engine"], r["batch"], r["test"]) for r in rows} == {
        ("onnxruntime", "1", "pp4"),
        ("onnxruntime", "1", "tg2@d8"),
        ("onnxruntime", "2", "tg2@d8"),
    }
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    res = CliRunner().invoke(main, [*args, "--json", "--csv"])
    assert res.exit_code == 1 and "exclusive" in res.output
    res = CliRunner().invoke(main, [*args, "--baseline", str(tmp_path / "x.json")])
    assert res.exit_code == 1 and "--baseline" in res.output  # no file read: the gate needs --dense first


def test_report_explains_int8_greedy_tokens_parting_between_engines():
    """A bare "DIFFER" on an int8 graph reads like a broken export; the report says why and how to compare."""
    res = _full_synthetic({"deepsparse/sparse": 2.0})
    res["agreement"] = {"sparse": {"same_greedy_tokens": False, "first_step_max_abs_logit_diff": 1.5}}
    assert "rounds int8 differently" not in report.render_markdown(res)  # fp32: no excuse offered
    res["models"]["sparse"]["export"] = {"quantize": "int8"}
    md = report.render_markdown(res)
    assert "sparse: greedy tokens DIFFER" in md and "rounds int8 differently" in md
    res["agreement"]["sparse"]["same_greedy_tokens"] = True
    assert "rounds int8 differently" not in report.render_markdown(res)
