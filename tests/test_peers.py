"""Peers: llama.cpp on a GGUF and the standard ONNX Runtime export, prepared from a tiny random LLaMA and
from the real SmolLM2-135M, scored on the same windows as our graphs, and timed by the benchmark.

Everything that runs a peer needs the optional extra ``peers`` (CI installs only ``.[dev]``): those tests
skip with the reason.  The tiny LLaMA gets a SentencePiece ``tokenizer.model`` of its 260 byte-level ids
(llama.cpp's converter recognises a SentencePiece vocabulary without a known BPE pre-tokenizer hash).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from owl_deploy import peers
from owl_deploy.bench.peers import PeerTarget, parse_peers
from owl_deploy.configs import BenchConfig, EvalConfig, ExportConfig
from owl_deploy.errors import OwlError
from owl_deploy.evaluate import perplexity, torch_logits_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import VOCAB, save_tiny

LLAMA_MISSING = peers.available(peers.LLAMA_CPP)
ORT_MISSING = peers.available(peers.ORT_STANDARD)
needs_llama = pytest.mark.skipif(bool(LLAMA_MISSING), reason=f"optional extra 'peers' not installed: {LLAMA_MISSING}")
needs_ort = pytest.mark.skipif(bool(ORT_MISSING), reason=f"optional extra 'peers' not installed: {ORT_MISSING}")


def _spm_model(path: Path) -> None:
    """A SentencePiece model of the tiny tokenizer's ids: <pad> <s> </s> <unk>, then the 256 bytes."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    kind = pb.ModelProto.SentencePiece.Type
    m = pb.ModelProto()
    for piece, t in (("<pad>", kind.CONTROL), ("<s>", kind.CONTROL), ("</s>", kind.CONTROL), ("<unk>", kind.UNKNOWN)):
        m.pieces.add(piece=piece, score=0.0, type=t)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=kind.BYTE)
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = VOCAB
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.pad_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.unk_id = 0, 1, 2, 3
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    path.write_bytes(m.SerializeToString())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    # 256 wide: every row is a whole number of Q4_K super-blocks, so q4_k_m quantizes every projection
    folder = save_tiny("llama", tmp_path_factory.mktemp("peers") / "tiny-llama", hidden=256, layers=2)
    if not LLAMA_MISSING:
        _spm_model(folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def tiny_windows() -> torch.Tensor:
    return torch.randint(4, VOCAB, (4 * 64,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def torch_ppl(tiny_llama, tiny_windows):
    from owl_deploy.model import load_causal_lm

    return perplexity(torch_logits_fn(load_causal_lm(tiny_llama)), tiny_windows, 64, progress=False)


# ---------------------------------------------------------------- no extra needed
def test_peer_options_and_keys_are_checked_in_one_line():
    assert parse_peers(["llama.cpp/q8_0=a.gguf", "ort-standard/dense-int8=dir"]) == {
        "llama.cpp/q8_0": Path("a.gguf"),
        "ort-standard/dense-int8": Path("dir"),
    }
    for bad, match in (
        ("llama.cpp/q8_0", "ENGINE/LABEL=PATH"),
        ("llama.cpp=x.gguf", "ENGINE/LABEL=PATH"),
        ("vllm/fp16=x", "unknown engine 'vllm'"),
        ("llama.cpp/a b=x", "ENGINE/LABEL=PATH"),
    ):
        with pytest.raises(OwlError, match=match):
            parse_peers([bad])
    with pytest.raises(OwlError, match="given twice"):
        parse_peers(["llama.cpp/x=a.gguf", "llama.cpp/x=b.gguf"])
    with pytest.raises(OwlError, match="unknown peer"):
        peers.split_key("deepsparse/sparse")
    with pytest.raises(OwlError, match=r"llama\.cpp variants are"):
        peers.prepare_peers(".", "/nonexistent-out", ["llama.cpp/q2_k"])


def test_missing_extra_is_a_one_line_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an install without the extra sees
    assert "pip install -e '.[peers]'" in peers.available(peers.LLAMA_CPP)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(OwlError, match=r"llama.cpp peers are not available .*\[peers\]"):
        PeerTarget("llama.cpp/q8_0", tmp_path / "m.gguf", BenchConfig())


# ---------------------------------------------------------------- the standard ONNX Runtime export
@needs_ort
def test_ort_standard_export_scores_like_torch_and_is_reused(tiny_llama, tiny_windows, torch_ppl, tmp_path):
    out = tmp_path / "peers"
    logs: list[str] = []
    made = peers.prepare_peers(tiny_llama, out, ["ort-standard/dense", "ort-standard/dense-int8"], log=logs.append)
    meta = json.loads((made["ort-standard/dense"] / peers.PEER_JSON).read_text())
    assert meta["spec"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "vocab_size": VOCAB}
    assert meta["fused_operators"].get("SkipSimplifiedLayerNormalization")  # the optimizer fused the RMSNorms
    dense = perplexity(peers.peer_logits_fn("ort-standard", made["ort-standard/dense"], 64), tiny_windows, 64)
    int8 = perplexity(peers.peer_logits_fn("ort-standard", made["ort-standard/dense-int8"], 64), tiny_windows, 64)
    assert dense.windows == torch_ppl.windows == 4
    assert dense.mean_nll == pytest.approx(torch_ppl.mean_nll, abs=1e-4)
    assert int8.mean_nll == pytest.approx(torch_ppl.mean_nll, rel=0.02) and int8.mean_nll != dense.mean_nll
    import onnx

    ops = {n.op_type for n in onnx.load(str(made["ort-standard/dense-int8"] / peers.ONNX_FILE)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops

    # the KV-cache path: token by token equals the whole window at once (the decode the benchmark times)
    runner = peers.open_runner("ort-standard", made["ort-standard/dense"], 64)
    ids = tiny_windows[:20].tolist()
    whole = runner.forward(ids)
    runner.reset()
    steps = np.concatenate([runner.forward(ids[:12])] + [runner.forward([t]) for t in ids[12:]])
    np.testing.assert_allclose(steps, whole, atol=1e-4)

    stamp = (made["ort-standard/dense"] / peers.ONNX_FILE).stat().st_mtime_ns
    again = peers.prepare_peers(tiny_llama, out, ["ort-standard/dense-int8"], log=logs.append)
    assert (again["ort-standard/dense-int8"] / peers.ONNX_FILE).is_file()
    assert (made["ort-standard/dense"] / peers.ONNX_FILE).stat().st_mtime_ns == stamp
    assert sum("reusing" in line for line in logs) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written left


# ---------------------------------------------------------------- llama.cpp
@pytest.fixture(scope="module")
def tiny_ggufs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    if LLAMA_MISSING:
        pytest.skip(f"optional extra 'peers' not installed: {LLAMA_MISSING}")
    out = tmp_path_factory.mktemp("peers-gguf")
    return peers.prepare_peers(tiny_llama, out, ["llama.cpp/f32", "llama.cpp/q8_0", "llama.cpp/q4_k_m"], threads=1)


@needs_llama
def test_llama_cpp_gguf_f32_matches_torch_and_quantizations_cost_little(tiny_ggufs, tiny_windows, torch_ppl):
    f32 = perplexity(peers.peer_logits_fn("llama.cpp", tiny_ggufs["llama.cpp/f32"], 64, 1), tiny_windows, 64)
    q8 = perplexity(peers.peer_logits_fn("llama.cpp", tiny_ggufs["llama.cpp/q8_0"], 64, 1), tiny_windows, 64)
    q4 = perplexity(peers.peer_logits_fn("llama.cpp", tiny_ggufs["llama.cpp/q4_k_m"], 64, 1), tiny_windows, 64)
    assert f32.windows == torch_ppl.windows
    # llama.cpp keeps its KV cache in f16: close to torch, not bit-equal
    assert f32.mean_nll == pytest.approx(torch_ppl.mean_nll, abs=2e-3)
    assert q8.mean_nll == pytest.approx(torch_ppl.mean_nll, rel=0.01)
    assert q4.mean_nll == pytest.approx(torch_ppl.mean_nll, rel=0.05)
    metas = {k: peers.gguf_metadata(peers.artifact(f)) for k, f in tiny_ggufs.items()}
    assert {m["num_layers"] for m in metas.values()} == {2} and metas["llama.cpp/q8_0"]["vocab_size"] == VOCAB
    kinds = {k: {t for _, t, _ in m["tensors"].values()} for k, m in metas.items()}
    assert "Q8_0" in kinds["llama.cpp/q8_0"] and "Q4_K" in kinds["llama.cpp/q4_k_m"]
    w = {k: peers.gguf_weight_bytes(m) for k, m in metas.items()}
    assert w["llama.cpp/q4_k_m"] < w["llama.cpp/q8_0"] < 0.35 * w["llama.cpp/f32"]


@needs_llama
def test_llama_cpp_decode_token_by_token_matches_the_window(tiny_ggufs, tiny_windows):
    window = peers.open_runner("llama.cpp", tiny_ggufs["llama.cpp/f32"], 64, 1, all_logits=True)
    ids = tiny_windows[:20].tolist()
    whole = window.forward(ids)
    last = peers.open_runner("llama.cpp", tiny_ggufs["llama.cpp/f32"], 64, 1)
    last.forward(ids[:12], all_logits=False)
    steps = np.concatenate([last.forward([t], all_logits=False) for t in ids[12:]])
    np.testing.assert_allclose(steps, whole[12:], atol=2e-3)
    assert last.num_cached == 20
    with pytest.raises(OwlError, match="context full"):
        last.forward(list(range(4, 50)))


# ---------------------------------------------------------------- in the benchmark
@needs_llama
@needs_ort
def test_peers_in_the_interleaved_benchmark(tiny_llama, tiny_ggufs, tmp_path):
    """Our tiny deployment, llama.cpp and the standard export of the same model in one run: every peer
    timed like the deployment, its bytes counted, every ratio against the strongest peer too."""
    from owl_deploy import bench
    from owl_deploy.bench import report
    from owl_deploy.export import export_model

    odir = tmp_path / "dense"
    export_model(tiny_llama, odir, ExportConfig(sequence_length=64, greedy_tokens=4), engines=("onnxruntime",))
    std = peers.prepare_peers(tiny_llama, tmp_path / "std", ["ort-standard/dense"])
    cfg = BenchConfig(engines="ort", context=8, steps=4, rounds=2, warmup_rounds=1, measure_bandwidth=False, threads=1)
    peer_paths = {
        "llama.cpp/f32": tiny_ggufs["llama.cpp/f32"] / peers.GGUF_FILE,
        "llama.cpp/q8_0": tiny_ggufs["llama.cpp/q8_0"],
        "ort-standard/dense": std["ort-standard/dense"],
    }
    res = bench.bench_command({"dense": odir}, tmp_path / "bdir", cfg, log=None, peers=peer_paths)
    assert set(res["runs"]) == {"onnxruntime/dense", *peer_paths}
    for key in peer_paths:
        run = res["runs"][key]
        assert run["decode_tokens_per_s"]["n"] == 8 and run["prefill_tokens_per_s"]["n"] == 2
        assert run["engine"] == key.split("/")[0] and run["speedup_vs_strongest_peer"] > 0
    strongest = res["strongest_peer"]
    assert strongest in peer_paths and res["runs"][strongest]["speedup_vs_strongest_peer"] == pytest.approx(1.0)
    bpt = {k: res["peers"][k]["bytes_per_token"] for k in peer_paths}
    assert bpt["llama.cpp/q8_0"]["weights_dense"] < 0.35 * bpt["llama.cpp/f32"]["weights_dense"]
    # f16 KV cache in llama.cpp, fp32 in the standard export, both at context + steps / 2 = 10 tokens:
    # (key, value) x 2 layers x 2 KV heads x 64 x 10 x 4 bytes
    assert bpt["ort-standard/dense"]["kv_cache"] == 2 * bpt["llama.cpp/f32"]["kv_cache"] == 2 * 2 * 2 * 64 * 10 * 4
    agree = res["peer_agreement"]
    assert agree["ort-standard/dense"]["same_greedy_tokens"]  # the same model as our graph
    assert agree["ort-standard/dense"]["first_step_max_abs_logit_diff"] < 1e-3
    assert agree["llama.cpp/f32"]["first_step_max_abs_logit_diff"] < 2e-2  # f16 KV cache
    assert "AVX" in res["peers"]["llama.cpp/f32"]["runtime"]["system_info"]
    assert res["peers"]["llama.cpp/f32"]["runtime"]["threads"] == 1
    md = (tmp_path / "bdir" / "results.md").read_text()
    assert "## Peers" in md and "llama.cpp/q8_0" in md and "| vs strongest peer |" in md
    assert report.summary_lines(res)


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
@needs_llama
def test_smollm2_gguf_q8_0_perplexity_is_that_of_our_fp32_graph(smollm2_dir, tmp_path):
    """SmolLM2-135M on the first 2048 wiki tokens (4 windows of 512): llama.cpp's Q8_0 and f32 GGUFs, written
    from our fp32 folder, score within a few % of our own fp32 ONNX graph in ONNX Runtime."""
    from owl_deploy.data import eval_tokens
    from owl_deploy.evaluate import evaluate_model
    from owl_deploy.export import export_model
    from owl_deploy.model import load_tokenizer

    made = peers.prepare_peers(smollm2_dir, tmp_path / "peers", ["llama.cpp/f32", "llama.cpp/q8_0"], threads=2)
    odir = tmp_path / "dense"
    export_model(smollm2_dir, odir, engines=("onnxruntime",))
    ours = evaluate_model(str(odir), EvalConfig(max_tokens=2048), threads=2)
    tokens = eval_tokens(load_tokenizer(smollm2_dir), "wiki", 2048)
    f32 = perplexity(peers.peer_logits_fn("llama.cpp", made["llama.cpp/f32"], 512, 2), tokens, 512)
    q8 = perplexity(peers.peer_logits_fn("llama.cpp", made["llama.cpp/q8_0"], 512, 2), tokens, 512)
    assert f32.windows == q8.windows == ours.windows == 4
    assert f32.perplexity == pytest.approx(ours.perplexity, rel=0.01)
    assert q8.perplexity == pytest.approx(ours.perplexity, rel=0.03)
    assert peers.gguf_metadata(peers.artifact(made["llama.cpp/q8_0"]))["vocab_size"] == 49152


def test_llama_cpp_repacking_follows_llama_arg_repack_else_off_on_amx_cpus():
    from owl_deploy.peers.runners import llama_repack

    amx, avx2 = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n", "flags\t\t: fpu avx2 fma\n"
    assert llama_repack({}, avx2) and not llama_repack({}, amx)  # segfaults repacking Q8_0 on an AMX Xeon
    assert llama_repack({"LLAMA_ARG_REPACK": "1"}, amx) and not llama_repack({"LLAMA_ARG_REPACK": "0"}, avx2)
    assert not llama_repack({"LLAMA_ARG_REPACK": "false"}, avx2) and llama_repack({"LLAMA_ARG_REPACK": "on"}, amx)
