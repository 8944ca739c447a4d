"""int8 export (MatMulInteger pattern, SmoothQuant) and perplexity of an exported deployment.

The maths is checked on hand-made matrices; the export on a tiny random LLaMA with half of every block
linear zeroed (the same fixture shape as test_export.py), in ONNX Runtime and DeepSparse.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_export import SEQ, _prune_folder
from tiny_models import save_tiny

from owl_deploy import ort_int8
from owl_deploy.errors import OwlError
from owl_deploy.export import int8 as q


# ---------------------------------------------------------------- pure maths
def test_quantize_weight_by_hand():
    # [K=4, N=2]: column 0 max 2.54 -> s = 0.02; column 1 all zero -> s = 1, every entry the zero point
    w = np.array([[2.54, 0.0], [-1.27, 0.0], [0.0, 0.0], [0.011, 0.0]], dtype=np.float32)
    qw, s = q.quantize_weight(w)
    assert qw.dtype == np.uint8
    np.testing.assert_allclose(s, [0.02, 1.0], rtol=1e-6)
    # round(w / s) + 128: 127, -64 (-63.5 rounds half to even), 0, 1 (0.55)
    np.testing.assert_array_equal(qw[:, 0], [255, 64, 128, 129])
    np.testing.assert_array_equal(qw[:, 1], [128] * 4)
    np.testing.assert_allclose(q.dequantize_weight(qw, s)[:, 0], [2.54, -1.28, 0.0, 0.02], atol=1e-6)


def test_pruned_zeros_stay_zero_and_error_is_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0.0
    qw, s = q.quantize_weight(w)
    assert np.all(qw[w == 0] == q.ZERO_POINT)  # every pruned weight is stored as the zero point
    assert np.all(np.abs(q.dequantize_weight(qw, s) - w) <= s / 2 + 1e-7)


def test_smooth_and_quantize_by_column_slices_is_the_whole_weights_result(monkeypatch):
    """A large weight is smoothed and quantized a slice of columns at a time (never a whole fp32 temporary):
    per-column maths, so the same bytes and scales as doing it whole, pruned zeros counted before scaling."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 10, generator=gen).numpy()
    w[:, ::3] = 0
    mul, div = torch.rand(4, generator=gen) + 0.5, torch.rand(10, generator=gen) + 0.5
    whole_q, whole_s = q.quantize_weight(q.scale_weight_t(w, (mul, div)))
    monkeypatch.setattr(q, "COLUMNS_PER_SLICE", 3)
    got_q, got_s, zeros = q.smooth_and_quantize(w, (mul, div))
    assert np.array_equal(got_q, whole_q) and np.array_equal(got_s, whole_s) and zeros == 16
    assert np.all(got_q[:, ::3] == q.ZERO_POINT)


def test_activation_scale():
    assert q.activation_scale(127.0) == pytest.approx(1.0)
    assert q.activation_scale(0.0) == 1.0  # a dead input still gets a usable scale
    with pytest.raises(OwlError):
        q.activation_scale(float("nan"))


def test_smoothing_scales_balance_ranges():
    # s = a^0.5 / w^0.5: [4, 1] vs [1, 4] -> [2, 0.5]; afterwards both ranges are 2 and 0.5... equal per channel
    a, w = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0])
    s = q.smoothing_scales(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(a / s, w * s)  # α = 0.5 makes activation and weight ranges equal
    torch.testing.assert_close(q.smoothing_scales(a, w, 0.0), 1 / w)  # α = 0: all range stays in activations


def test_int8_config_validation():
    from owl_deploy.configs import QuantizeConfig, build

    with pytest.raises(OwlError, match="smooth_alpha: must be <= 1"):
        build(QuantizeConfig, {"smooth_alpha": 1.5})
    with pytest.raises(OwlError, match="attention is not a projection"):
        build(QuantizeConfig, {"keep_fp32": ["attention"]})


def test_int8_output_error_by_hand():
    # steps that are powers of two: x on a 0.5 grid (range 63.5 -> s = 0.5), every row of w on a 1/16 grid with
    # its maximum 127/16 (s = 1/16): int8 represents both exactly, so the error is exactly zero
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (4, 8), generator=gen).float() * 0.5
    w = torch.randint(-127, 128, (3, 8), generator=gen).float() / 16
    w[:, 0] = 127 / 16
    err, norm = q.int8_output_error(x, w, 63.5)
    assert err == 0.0 and norm == pytest.approx(float(((x @ w.T) ** 2).sum()))
    # anything else: the numpy path of the export (quantize_weight on the [K, N] layout, a saturating activation)
    x, w = torch.randn(4, 8, generator=gen) * 3, torch.randn(3, 8, generator=gen)
    wq = q.dequantize_weight(*q.quantize_weight(w.T.numpy())).T
    s = q.activation_scale(2.0)  # |x| reaches ~9: the rest saturates at -128 / 127 steps
    xq = np.clip(np.rint(x.numpy() / s), -128, 127) * s
    want = float((((xq @ wq.T) - (x @ w.T).numpy()) ** 2).sum())
    err, _ = q.int8_output_error(x, w, 2.0)
    assert err == pytest.approx(want, rel=1e-5) and err > 0


def test_worst_is_the_largest_errors_ties_by_name():
    errors = {"b": 0.3, "a": 0.1, "c": 0.3, "d": 0.0}
    assert q.worst(errors, 2) == ["b", "c"]
    assert q.worst(errors, 0) == []
    assert q.worst(errors, 9) == ["b", "c", "a", "d"]


# ---------------------------------------------------------------- smoothing on a real (tiny) model
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gemma3"])
def test_smooth_model_keeps_function_and_zeros(family, tmp_path):
    """Gemma's norms scale by 1 + w and Gemma 3's gate/up read pre_feedforward_layernorm: folding into the wrong
    norm, or dividing w instead of 1 + w, changes the logits."""
    from owl_deploy.model import block_linears, decoder_blocks
    from owl_deploy.specs import load_model

    folder = _prune_folder(save_tiny(family, tmp_path / "dense"), tmp_path / "pruned", 0.5)
    model, _ = load_model(folder)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    zeros = [(lin.weight == 0).clone() for b in decoder_blocks(model) for lin in block_linears(b).values()]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    absmax = q.activation_absmax(model, ids)
    smoothed = q.smooth_model(model, absmax, 0.5)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    after_zeros = [(lin.weight == 0) for b in decoder_blocks(model) for lin in block_linears(b).values()]
    assert all(torch.equal(a, b) for a, b in zip(zeros, after_zeros, strict=True))
    # the smoothed ranges are the ones the model now produces
    again = q.activation_absmax(model, ids)
    for name, rng in smoothed.items():
        torch.testing.assert_close(again[name], rng, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_smoothing_of_a_graph_weight_is_the_torch_smoothing_bit_for_bit(family, tmp_path):
    """The export scales each projection weight in the ONNX layout as it reads it (scale_weight_t on W.T);
    the same numbers as scaling the torch weight, to the last bit, while smoothing_plan itself folds only
    the norms and biases (the projection weights are untouched until then) and leaves tied embeddings alone."""
    from owl_deploy.specs import load_model

    folder = _prune_folder(save_tiny(family, tmp_path / "dense"), tmp_path / "pruned", 0.5)
    model, _ = load_model(folder)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    absmax = q.activation_absmax(model, ids)
    before = {n: lin.weight.detach().clone() for n, lin in q._projections(model).items()}
    embed = model.get_input_embeddings().weight.detach().clone()
    plan = q.smoothing_plan(model, absmax, 0.5)
    after_plan = q._projections(model)
    assert all(torch.equal(after_plan[n].weight, w) for n, w in before.items())  # weights untouched
    assert set(plan.weights) == set(before)  # every projection, lm_head included, carries a share
    q.apply_weight_scales(model, plan)
    for name, lin in q._projections(model).items():
        graph = q.scale_weight_t(before[name].T.numpy(), plan.weights[name])
        assert np.array_equal(graph, lin.weight.detach().T.numpy()), name
    assert torch.equal(model.get_input_embeddings().weight, embed)


@pytest.mark.parametrize(("family", "offset"), [("llama", 0.0), ("qwen3", 0.0), ("gemma", 1.0), ("gemma3", 1.0)])
def test_norm_offset_is_found_by_running_the_norm(family, offset):
    from tiny_models import tiny_model

    from owl_deploy.model import decoder_blocks

    model = tiny_model(family, layers=1)
    block = decoder_blocks(model)[0]
    norms = [block.input_layernorm, block.post_attention_layernorm, model.model.norm]
    assert {q.norm_offset(n) for n in norms} == {offset}
    with pytest.raises(OwlError, match="neither w nor 1 \\+ w"):
        q.norm_offset(torch.nn.LayerNorm(8))  # x - mean(x) of a constant row is 0: not an RMSNorm


def test_int8_errors_run_the_unfolded_model_and_match_the_pure_error(tmp_path):
    """The ranking pass needs the model as it was (fold=False leaves every tensor alone) and gives each projection
    the pure error of its own smoothed input and weight (nothing quantized upstream)."""
    from owl_deploy.specs import load_model

    folder = _prune_folder(save_tiny("qwen2", tmp_path / "dense"), tmp_path / "pruned", 0.5)
    model, _ = load_model(folder)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    absmax = q.activation_absmax(model, ids)
    plan = q.smoothing_plan(model, absmax, 0.7, fold=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ranges = {name: float(r.max()) for name, r in plan.ranges.items()}
    errors = q.int8_errors(model, ids, plan, ranges)
    assert set(errors) == set(ranges) and all(0 < e < 1 for e in errors.values())

    name = "model.layers.1.mlp.down_proj"  # smoothed on its input (its scale folded into up_proj's rows)
    lin = dict(model.named_modules())[name]
    seen = []
    handle = lin.register_forward_hook(lambda _m, args, _o: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    handle.remove()
    mul, _ = plan.weights[name]
    parts = [q.int8_output_error(x / mul, lin.weight.detach() * mul, ranges[name]) for x in seen]
    assert errors[name] == pytest.approx(sum(e for e, _ in parts) / sum(n for _, n in parts), rel=1e-6)


# ---------------------------------------------------------------- the int8 export
@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_int8")
    return _prune_folder(save_tiny("llama", root / "dense"), root / "pruned", 0.5)


@pytest.fixture(scope="module")
def int8_export(tiny_pruned, tmp_path_factory, tiny_text) -> tuple[Path, dict]:
    from owl_deploy.configs import CalibrationConfig, ExportConfig, QuantizeConfig
    from owl_deploy.export import export_model

    out = tmp_path_factory.mktemp("tiny_int8_odir") / "odir"
    report = export_model(
        tiny_pruned,
        out,
        ExportConfig(sequence_length=SEQ, prefill_length=4, greedy_tokens=8),
        QuantizeConfig(scheme="int8", nsamples=4, seqlen=32),
        CalibrationConfig(text=str(tiny_text)),
    )
    return out, report


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    """Real English text (a public-domain paragraph, repeated) for calibration and scoring."""
    para = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters.\n"
    )
    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(para * 12)
    return path


def test_int8_graph_is_the_matmulinteger_pattern(int8_export):
    import onnx

    out, report = int8_export
    assert report["ok"], report["problems"]
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    layers = report["spec"]["num_layers"]
    assert ops.count("MatMulInteger") == 7 * layers + 1  # every block projection + lm_head
    assert "DequantizeLinear" not in ops  # DeepSparse runs that pattern 25x slower
    # q/k/v share one QuantizeLinear, gate/up another: 5 per block (qkv, o, gate/up, down) ... + lm_head
    assert ops.count("QuantizeLinear") == 4 * layers + 1
    inits = {i.name: i for i in proto.graph.initializer}
    w = inits["model.layers.0.self_attn.q_proj.weight.T"]
    assert w.data_type == onnx.TensorProto.UINT8


def test_int8_zeros_preserved_and_reported(int8_export):
    _, report = int8_export
    zeros = report["zeros"]
    assert zeros["zeros_preserved"] is True
    assert all(t["onnx_dtype"] == "uint8" for t in zeros["tensors"].values())
    assert zeros["total_onnx_zeros"] == zeros["total_torch_zeros"] + zeros["extra_onnx_zeros"]
    layers = report["int8"]["layers"]
    for hf, entry in layers.items():
        if hf != "lm_head":
            assert entry["zero_weights"] >= entry["source_zero_weights"] > 0


def test_int8_engines_agree_and_error_is_small(int8_export):
    _, report = int8_export
    ort = report["logits"]["engines"]["onnxruntime"]
    ds = report["logits"]["engines"]["deepsparse"]
    assert ort["reference"] is True
    assert ds["max_abs_diff"] <= ds["tolerance"]  # same int8 graph in both engines
    # quantization error vs fp32 torch: present, finite and far below the logits' own spread
    err = ort["vs_torch_fp32"]["max_abs_diff"]
    assert 0 < err < 0.5
    assert report["int8"]["smooth_alpha"] == 0.7


def test_keep_fp32_worst_leaves_the_ranked_projections_fp32(tiny_pruned, tiny_text, tmp_path):
    """--keep-fp32-worst N: the N projections with the largest int8 error stay fp32 MatMuls (recorded with every
    error in export.json), the rest are the MatMulInteger pattern, and the export passes its checks."""
    import onnx

    from owl_deploy.configs import CalibrationConfig, ExportConfig, QuantizeConfig
    from owl_deploy.export import export_model

    out = tmp_path / "odir"
    report = export_model(
        tiny_pruned,
        out,
        ExportConfig(sequence_length=SEQ, prefill_length=4, greedy_tokens=4),
        QuantizeConfig(scheme="int8", nsamples=4, seqlen=32, keep_fp32_worst=3),
        CalibrationConfig(text=str(tiny_text)),
    )
    assert report["ok"], report["problems"]
    int8 = report["int8"]
    kept = int8["kept_fp32_worst"]
    assert kept == q.worst(int8["relative_errors"], 3)
    assert len(int8["relative_errors"]) == 7 * report["spec"]["num_layers"] + 1  # ranked among every int8 target
    assert not set(kept) & set(int8["layers"]) and len(int8["layers"]) == len(int8["relative_errors"]) - 3
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 7 * report["spec"]["num_layers"] + 1 - 3
    assert report["zeros_preserved"] is True


def test_int8_gemma3_export(tiny_text, tmp_path):
    """Gemma 3 in int8: every block projection and the (untied) lm_head in the MatMulInteger pattern, zeros kept,
    DeepSparse equal to ONNX Runtime on the int8 graph, and the int8 error against fp32 torch small (SmoothQuant
    folded into (1 + w) norms and into pre_feedforward_layernorm for gate/up)."""
    import onnx

    from owl_deploy.configs import CalibrationConfig, ExportConfig, QuantizeConfig
    from owl_deploy.export import export_model

    folder = _prune_folder(save_tiny("gemma3", tmp_path / "dense"), tmp_path / "pruned", 0.5)
    out = tmp_path / "odir"
    report = export_model(
        folder,
        out,
        ExportConfig(sequence_length=16, prefill_length=4, greedy_tokens=6),
        QuantizeConfig(scheme="int8", nsamples=4, seqlen=32),
        CalibrationConfig(text=str(tiny_text)),
    )
    assert report["ok"], report["problems"]
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 7 * 3 + 1
    assert report["zeros_preserved"] is True
    ort, ds = report["logits"]["engines"]["onnxruntime"], report["logits"]["engines"]["deepsparse"]
    assert ds["max_abs_diff"] <= ds["tolerance"]
    assert 0 < ort["vs_torch_fp32"]["max_abs_diff"] < 0.5  # as for LLaMA (0.09 there, 0.12 here at α = 0.7)
    assert report["greedy"]["engines_identical"]


def test_eval_of_deployment_matches_torch(tiny_pruned, tiny_text, tmp_path):
    """fp32 export scored on its ONNX graph = the torch perplexity; the int8 one is close to it."""
    from owl_deploy.configs import EvalConfig, ExportConfig
    from owl_deploy.evaluate import evaluate_model
    from owl_deploy.export import export_model

    out = tmp_path / "fp32"
    export_model(
        tiny_pruned, out, ExportConfig(sequence_length=SEQ, prefill_length=4, greedy_tokens=0), engines=("onnxruntime",)
    )
    ref = evaluate_model(str(tiny_pruned), EvalConfig(text=str(tiny_text), seqlen=32, max_tokens=256))
    got = evaluate_model(str(out), EvalConfig(text=str(tiny_text), seqlen=32, max_tokens=256))
    assert got.windows == ref.windows == 8
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-4)
    ds = evaluate_model(str(out), EvalConfig(text=str(tiny_text), seqlen=32, max_tokens=256), engine="deepsparse")
    assert ds.perplexity == pytest.approx(ref.perplexity, rel=1e-3)
    # one token per call (the decode kernels): the same windows, the same perplexity
    one = evaluate_model(str(out), EvalConfig(text=str(tiny_text), seqlen=32, max_tokens=256), prefill_length=1)
    assert one.windows == 8 and one.perplexity == pytest.approx(ref.perplexity, rel=1e-4)
    with pytest.raises(OwlError, match="multiple of 4"):
        evaluate_model(str(out), EvalConfig(text=str(tiny_text), seqlen=32, max_tokens=256), prefill_length=6)


def test_eval_cli_on_int8_deployment(int8_export, tiny_pruned, tiny_text):
    from owl_deploy.cli import main
    from owl_deploy.configs import EvalConfig
    from owl_deploy.evaluate import evaluate_model

    out, _ = int8_export
    res = CliRunner().invoke(
        main, ["eval", "--model", str(out), "--text", str(tiny_text), "--seqlen", "32", "--max-tokens", "256", "--json"]
    )
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["engine"] == "onnxruntime" and got["windows"] == 8
    fp32 = evaluate_model(str(tiny_pruned), EvalConfig(text=str(tiny_text), seqlen=32, max_tokens=256)).perplexity
    assert math.isfinite(got["perplexity"])
    assert abs(got["perplexity"] / fp32 - 1) < 0.2  # a random tiny model: int8 stays in the same place


def test_eval_deployment_seqlen_too_long(int8_export, tiny_text):
    from owl_deploy.configs import EvalConfig
    from owl_deploy.evaluate import evaluate_model

    out, _ = int8_export
    with pytest.raises(OwlError, match="seqlen"):
        evaluate_model(str(out), EvalConfig(text=str(tiny_text), seqlen=100_000, max_tokens=None))


def test_export_int8_bad_options(tiny_pruned, tmp_path):
    from owl_deploy.cli import main

    for args, msg in (
        (["--smooth-alpha", "2"], "smooth-alpha"),
        (["--keep-fp32", "attention"], "keep-fp32"),
        (["--keep-fp32-worst", "-1"], "keep-fp32-worst"),
        (["--keep-fp32-worst", "22", "--sequence-length", "16"], "keep-fp32-worst 22 would keep every one of the 22"),
    ):
        out = tmp_path / "bad"
        res = CliRunner().invoke(
            main, ["export", "--model", str(tiny_pruned), "--out", str(out), "--quantize", "int8", *args]
        )
        assert res.exit_code != 0
        assert msg in res.output
        assert not out.exists()


# ---------------------------------------------------------------- the int8 engine check (pure)
def _logits(rows: list[list[float]]) -> list[np.ndarray]:
    return [np.asarray(rows, dtype=np.float32)]


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        # within 0.05 of the first engine on the decode graph: exact enough
        ([[0.0, 1.02], [5.0, 0.0], [1.0, 0.0], [0.0, 0.5]], (True, None)),
        # off by more, argmax everywhere the same: accepted by argmax agreement
        ([[0.0, 1.5], [5.0, 0.0], [1.0, 0.0], [0.0, 0.5]], (True, "argmax_agreement")),
        # 2 of 4 argmax differ from the first engine, but the gap (0.6) is under half the int8 error (4.0) and
        # the engine agrees with fp32's argmax as often as the first engine does: within the quantization error
        ([[0.0, 1.0], [5.0, 0.0], [0.45, 0.55], [0.6, 0.5]], (True, "within_quantization_error")),
        # a broken graph: far from the first engine and from fp32
        ([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [5.0, 0.0]], (False, None)),
    ],
)
def test_int8_engine_check_accepts_engines_within_the_quantization_error(engine, expected):
    from owl_deploy.export.verify import int8_engine_check

    torch_fp32 = _logits([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    first = _logits([[0.0, 1.0], [5.0, 0.0], [1.0, 0.0], [0.0, 0.5]])  # int8 in ONNX Runtime: 3/4 argmax of fp32
    assert int8_engine_check(first, first, torch_fp32, None)["reference"]
    res = int8_engine_check(_logits(engine), _logits(engine), torch_fp32, (first, first))
    assert (res["ok"], res.get("accepted_by")) == expected
    assert res["first_engine_vs_torch_fp32"]["max_abs_diff"] == pytest.approx(4.0)


@pytest.mark.skipif(
    not ort_int8.enabled(env={}),  # the CPU rule, whatever the environment says
    reason="ONNX Runtime's signed-weight form is exact only with VNNI",
)
def test_onnxruntime_on_signed_weights_gives_the_same_logits_and_caches(int8_export, monkeypatch):
    """The deployment's graph in ONNX Runtime, with and without the in-memory signed-weight rewrite: prefill
    and decode logits bit-identical (what lets int8 servers prefill in it and decode in DeepSparse)."""
    from owl_deploy import runtime

    out, report = int8_export
    outputs, signed = {}, {}
    for value in ("0", "1"):
        monkeypatch.setenv(ort_int8.ENV, value)
        sess = runtime.compile(out, "onnxruntime", prefill_length=4, threads=1)
        prefill = sess.forward([5, 9, 14, 3, 7, 2])
        step = sess.forward([11])
        outputs[value], signed[value] = (prefill, step), sess.signed_weights
    # only the session told to: every block projection and lm_head re-signed
    assert signed == {"0": 0, "1": 7 * report["spec"]["num_layers"] + 1}
    assert np.array_equal(outputs["0"][0], outputs["1"][0]) and np.array_equal(outputs["0"][1], outputs["1"][1])


@pytest.mark.skipif(
    not ort_int8.enabled(env={}),  # the CPU rule, whatever the environment says
    reason="ONNX Runtime's signed-weight form is exact only with VNNI",
)
def test_external_int8_weights_run_re_signed_from_the_companion_file(tiny_pruned, tmp_path, tiny_text, monkeypatch):
    """A deployment whose weights live in model.data (as a 1.5B int8 export's do): the export's own ONNX Runtime
    check writes the re-signed companion beside them, every later session reads it, the logits stay
    bit-identical, and model.data is never touched."""
    from owl_deploy import runtime
    from owl_deploy.configs import CalibrationConfig, ExportConfig, QuantizeConfig
    from owl_deploy.export import export_model

    monkeypatch.delenv(ort_int8.ENV, raising=False)
    out = tmp_path / "odir"
    report = export_model(
        tiny_pruned,
        out,
        ExportConfig(sequence_length=SEQ, prefill_length=4, greedy_tokens=4, external_data_threshold=1),
        QuantizeConfig(scheme="int8", nsamples=4, seqlen=32),
        CalibrationConfig(text=str(tiny_text)),
    )
    assert report["ok"] and report["external_data"]
    assert {ort_int8.COMPANION, ort_int8.COMPANION_INDEX} <= set(report["files"])
    data = (out / "model.data").read_bytes()
    outputs, signed = {}, {}
    for value in ("0", "1"):
        monkeypatch.setenv(ort_int8.ENV, value)
        sess = runtime.compile(out, "onnxruntime", prefill_length=4, threads=1)
        outputs[value] = (sess.forward([5, 9, 14, 3, 7, 2]), sess.forward([11]))
        signed[value] = sess.signed_weights
    assert signed == {"0": 0, "1": 7 * report["spec"]["num_layers"] + 1}
    assert np.array_equal(outputs["0"][0], outputs["1"][0]) and np.array_equal(outputs["0"][1], outputs["1"][1])
    assert (out / "model.data").read_bytes() == data


@pytest.mark.slow
def test_real_smollm2_int8_scores_alike_in_deepsparse_and_onnxruntime(smollm2_dir, tmp_path):
    """DeepSparse rounds an int8 graph differently from ONNX Runtime — its greedy answers part from ONNX Runtime's
    after some tokens, which is why the server offers ONNX Runtime for exact tokens (serve.serving_plan) — but to
    the same quality: the real SmolLM2 in int8, 4 wiki windows, per-window NLL equal within 0.02 on average (measured
    on 32 windows: 3.2206 vs 3.2220)."""
    from owl_deploy.configs import EvalConfig, ExportConfig, QuantizeConfig
    from owl_deploy.evaluate import evaluate_model
    from owl_deploy.export import export_model

    out = tmp_path / "int8"
    quantize = QuantizeConfig(scheme="int8", nsamples=4, seqlen=256)
    export_model(smollm2_dir, out, ExportConfig(sequence_length=512, greedy_tokens=4), quantize=quantize)
    cfg = EvalConfig(text="wiki", seqlen=512, max_tokens=2048)
    ort = evaluate_model(str(out), cfg, engine="onnxruntime")
    ds = evaluate_model(str(out), cfg, engine="deepsparse")
    diff = np.array(ds.window_nll) - np.array(ort.window_nll)
    assert ds.windows == ort.windows == 4 and abs(diff.mean()) < 0.02, diff
    assert 2.5 < ort.mean_nll < 4.0  # SmolLM2's int8 quality, not a broken graph (dense fp32: 3.14)


def test_bench_batched_int8_follows_the_server_plan(int8_export):
    """`bench --batch-sizes` on an int8 deployment measures what `serve` runs: DeepSparse with one internal cache
    per row (ONNX Runtime with external ones), every batched row equal to batch 1 of the same plan."""
    from test_bench import FAST, _hardware

    from owl_deploy import bench
    from owl_deploy.bench import measure
    from owl_deploy.configs import BenchConfig

    out, _ = int8_export
    cfg = BenchConfig(context=8, steps=4, rounds=1, warmup_rounds=0, prefill_length=4, batch_sizes=[2], **FAST)
    runs = measure.parse_engines(None, ["sparse"])
    res = bench.run_benchmark({"sparse": out}, runs, cfg, log=None, hardware=_hardware())
    for key, want in (("deepsparse/sparse", "internal (batched)"), ("onnxruntime/sparse", "external (batched)")):
        two = res["throughput"][key]["2"]
        assert two["kv_cache"] == want and two["same_greedy_tokens_as_batch_1"] is True, (key, two)


def test_last_logits_int8_slices_before_the_static_quantization(int8_export):
    """On the int8 graph the slice goes before the lm_head's QuantizeLinear (static scale: per-token rounding),
    so the last row is bit-for-bit the full graph's, in both engines."""
    import onnx

    from owl_deploy import runtime
    from owl_deploy.contract import last_logits
    from owl_deploy.runtime import open_deployment

    out, _ = int8_export
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    last_logits(proto, open_deployment(out).spec)
    sliced = next(n for n in proto.graph.node if n.op_type == "Slice" and n.name == "owl_last_logits.slice")
    consumer = next(n for n in proto.graph.node if sliced.output[0] in n.input)
    assert consumer.op_type == "QuantizeLinear"
    ids = list(range(3, 3 + 20))
    for engine in ("onnxruntime", "deepsparse"):
        rows = []
        for last in (False, True):
            s = runtime.compile(out, engine, prefill_length=8, threads=1, last_logits=last)
            rows.append(s.forward(ids)[-1])
        assert np.array_equal(rows[0], rows[1]), engine
