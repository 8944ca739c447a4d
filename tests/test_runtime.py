"""owl_deploy.runtime: one interface over DeepSparse and ONNX Runtime, explicit prefill + decode.

A tiny random LLaMA (4 heads / 2 KV heads) is exported once per module with ``export_onnx`` alone
(no verification), so these tests only exercise the runtime.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from owl_deploy.errors import OwlError

SEQ = 48
IDS = [5, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 99]  # 21 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(deployment folder, torch model, tokenizer)."""
    from tiny_models import tiny_model, tiny_tokenizer

    from owl_deploy.export.graph import export_onnx

    model = tiny_model("llama", seed=1)
    tok = tiny_tokenizer()
    out = tmp_path_factory.mktemp("rt") / "odir"
    out.mkdir()
    export_onnx(model, out, SEQ)
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


def _ref(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _greedy(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(_ref(model, seq)[-1].argmax()))
    return seq[len(ids) :]


CONFIGS = [
    ("onnxruntime", None, 1),
    ("onnxruntime", None, 8),
    ("deepsparse", "internal", 1),
    ("deepsparse", "internal", 8),
    ("deepsparse", "external", 8),
]


@pytest.fixture(scope="module")
def sessions(tiny):
    from owl_deploy import runtime

    out, _, _ = tiny
    # one thread: DeepSparse pins its threads to cores; on a busy shared machine two pinned threads
    # can stall each other for a second per step, which would only make these tests slow
    return {cfg: runtime.compile(out, cfg[0], prefill_length=cfg[2], kv_cache=cfg[1], threads=1) for cfg in CONFIGS}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-p{c[2]}")
def test_forward_matches_torch_in_any_split(tiny, sessions, cfg):
    """One call, token by token, or uneven chunks: the same logits as torch over the whole prompt."""
    _, model, _ = tiny
    s = sessions[cfg]
    ref = _ref(model, IDS)
    s.reset()
    whole = s.forward(IDS)
    assert whole.shape == (len(IDS), model.config.vocab_size)
    assert np.abs(whole - ref).max() < 1e-4
    s.reset()
    steps = np.stack([s.step(t) for t in IDS])
    assert np.abs(steps - ref).max() < 1e-4
    s.reset()
    parts = [s.forward(IDS[:3]), s.forward(IDS[3:12]), s.forward(IDS[12:])]
    assert np.abs(np.concatenate(parts) - ref).max() < 1e-4
    assert s.num_cached == len(IDS)


def test_onnxruntime_feeds_the_rest_of_a_prompt_in_one_call(sessions):
    """ONNX Runtime's graph takes any length: 19 tokens at prefill length 8 are 8 + 8 + 3, not 8 + 8 + 1 + 1 + 1;
    DeepSparse's graphs have static lengths, so its rest goes one token at a time."""
    for cfg, want in [(("onnxruntime", None, 8), [8, 8, 3]), (("deepsparse", "external", 8), [8, 8, 1, 1, 1])]:
        s = sessions[cfg]
        calls, run = [], s._run
        s._run = lambda ids, run=run, calls=calls: calls.append(len(ids)) or run(ids)
        try:
            s.reset()
            s.forward(IDS[:19])
        finally:
            del s._run
        assert calls == want, cfg


@pytest.mark.parametrize("kv", ["internal", "external"])
def test_deepsparse_feeds_a_rest_shorter_than_the_prefill_length_in_16_token_chunks(tiny, kv):
    """A 19-token prompt at prefill length 24 (20 with an internal cache, which needs sequence_length > 2n) is
    16 + 1 x 3 calls, not 19 single tokens; the logits are torch's."""
    from owl_deploy import runtime

    out, model, _ = tiny
    assert runtime.prefill_cascade(24) == [1, 16, 24] and runtime.prefill_cascade(16) == [1, 16]
    assert runtime.prefill_cascade(8) == [1, 8] and runtime.prefill_cascade(1) == [1]
    s = runtime.compile(out, "deepsparse", prefill_length=24, kv_cache=kv, threads=1)
    calls, run = [], s._run
    s._run = lambda ids: calls.append(len(ids)) or run(ids)
    logits = s.forward(IDS[:19])
    assert calls == [16, 1, 1, 1]
    assert np.abs(logits - _ref(model, IDS[:19])).max() < 1e-4


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-p{c[2]}")
def test_generate_streams_torch_greedy_tokens(tiny, sessions, cfg):
    _, model, _ = tiny
    s = sessions[cfg]
    got = list(s.generate(IDS, 10))
    assert got == _greedy(model, IDS, 10)
    # generate starts from a fresh cache every time
    assert list(s.generate(IDS[:5], 4)) == _greedy(model, IDS[:5], 4)


def test_generate_stops_at_eos_and_at_capacity(tiny, sessions):
    _, model, _ = tiny
    s = sessions[("onnxruntime", None, 8)]
    first = _greedy(model, IDS, 3)
    assert list(s.generate(IDS, 10, eos_token_id=first[1])) == first[:2]
    assert list(s.generate(IDS, 10, eos_token_id=[first[0], 7])) == first[:1]
    # the sequence length caps generation: 21 prompt tokens + 27 new = 48
    out = list(s.generate(IDS, 100))
    assert len(out) == SEQ - len(IDS) + 1  # the last token is produced from the full cache's logits
    assert s.num_cached == SEQ


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-p{c[2]}")
def test_every_token_up_to_the_capacity_matches_torch(tiny, sessions, cfg):
    """A whole context fed at once equals torch at every position. DeepSparse's internal cache holds one token
    fewer than the sequence length (to fill the last slot its engine evicts the oldest entry, which changed
    the logits of the whole chunk that filled it: found by this test), and one more token is refused."""
    from owl_deploy.errors import OwlError

    _, model, _ = tiny
    s = sessions[cfg]
    assert s.capacity == SEQ - (cfg[1] == "internal")
    ids = [(7 * i + 3) % 97 for i in range(s.capacity)]
    s.reset()
    assert np.abs(s.forward(ids) - _ref(model, ids)).max() < 1e-4
    with pytest.raises(OwlError, match="sequence too long"):
        s.forward([1])
    assert len(list(s.generate(ids[:-1], 100))) == 2  # prefill to capacity - 1, one step, then full


def test_internal_cache_needs_more_slots_than_prefill_tokens(tiny):
    """DeepSparse's internal cache breaks at sequence_length <= 2 * prefill: the runtime shrinks the chunk."""
    from owl_deploy import runtime

    out, model, _ = tiny
    s = runtime.compile(out, "deepsparse", sequence_length=32, prefill_length=16, threads=1)
    assert s.prefill_length == 8 and s.kv_cache == "internal"  # the largest power of two with 2n < 32
    assert [runtime.internal_prefill_length(t) for t in (8, 9, 256, 257)] == [1, 4, 64, 128]
    ids = IDS[:20]
    assert np.abs(s.forward(ids) - _ref(model, ids)).max() < 1e-4


def test_deployment_after_deepsparse_rewrote_it_in_place(tiny, tmp_path):
    """DeepSparse's pipeline re-declares model.onnx's inputs in place; the runtime still works."""
    from deepsparse.utils.onnx import overwrite_onnx_model_inputs_for_kv_cache_models

    from owl_deploy import runtime

    out, model, _ = tiny
    copy = tmp_path / "odir"
    shutil.copytree(out, copy)
    overwrite_onnx_model_inputs_for_kv_cache_models(str(copy / "model.onnx"), sequence_length=SEQ, input_ids_length=16)
    dep = runtime.open_deployment(copy)
    assert dep.sequence_length == SEQ and dep.spec.num_kv_heads == 2
    for engine in ("onnxruntime", "deepsparse"):
        s = runtime.compile(copy, engine, prefill_length=4, threads=1)
        assert np.abs(s.forward(IDS) - _ref(model, IDS)).max() < 1e-4


def test_longer_sequence_length_than_exported(tiny):
    """The graph can be re-declared to any length up to the RoPE table (the model's positions)."""
    from owl_deploy import runtime

    out, model, _ = tiny
    dep = runtime.open_deployment(out)
    assert dep.max_sequence_length == 256  # tiny_config max_position_embeddings
    s = runtime.compile(out, "onnxruntime", sequence_length=96)
    ids = list(range(10, 80))
    assert np.abs(s.forward(ids) - _ref(model, ids)).max() < 1e-4


def test_errors_are_one_line_owlerrors(tiny):
    from owl_deploy import runtime

    out, _, _ = tiny
    cases = [
        (dict(engine="tensorrt"), "unknown engine"),
        (dict(engine="onnxruntime", sequence_length=10_000), "does not fit this deployment"),
        (dict(engine="onnxruntime", sequence_length=1), "does not fit this deployment"),
        (dict(engine="onnxruntime", prefill_length=6), "multiple of 4"),
        (dict(engine="onnxruntime", kv_cache="internal"), "internal KV cache is a DeepSparse feature"),
        (dict(engine="deepsparse", kv_cache="paged"), "unknown kv_cache"),
    ]
    for kwargs, match in cases:
        with pytest.raises(OwlError, match=match) as err:
            runtime.compile(out, **kwargs)
        assert "\n" not in str(err.value)
    s = runtime.compile(out, "onnxruntime")
    with pytest.raises(OwlError, match="prompt has 48 tokens"):
        list(s.generate([5] * SEQ, 3))
    with pytest.raises(OwlError, match="the prompt is empty"):
        list(s.generate([], 3))
    s.reset()
    s.forward([5] * 40)
    with pytest.raises(OwlError, match="exceed the sequence length 48"):
        s.forward([5] * 9)


def test_tokenizer_from_the_folder(tiny, tmp_path):
    from owl_deploy import runtime

    out, _, tok = tiny
    dep = runtime.open_deployment(out)
    assert dep.tokenizer()("hello")["input_ids"] == tok("hello")["input_ids"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    for f in broken.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(OwlError, match="has no tokenizer files"):
        runtime.open_deployment(broken).tokenizer()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(OwlError, match="cannot load the tokenizer"):
        runtime.open_deployment(broken).tokenizer()


def test_default_engine_kv_modes(sessions):
    assert sessions[("deepsparse", "internal", 8)].kv_cache == "internal"
    assert sessions[("onnxruntime", None, 8)].kv_cache == "external"
    assert all(s.compile_seconds >= 0 for s in sessions.values())
    assert isinstance(sessions[("onnxruntime", None, 8)].deployment.folder, Path)


@pytest.mark.parametrize("engine,kv", [("onnxruntime", "external"), ("deepsparse", "internal")])
def test_last_logits_session_returns_the_last_row_and_keeps_decoding(tiny, engine, kv):
    """A server's prefill graph computes the lm_head for its last token only: the same row as torch's, and a
    cache the next calls continue exactly (the slice sits after every block)."""
    from owl_deploy import runtime

    out, model, _ = tiny
    ref = _ref(model, IDS)
    s = runtime.compile(out, engine, prefill_length=8, kv_cache=kv, threads=1, last_logits=True)
    s.reset()
    head = s.forward(IDS[:13])  # 8 + 5 single tokens in DeepSparse, one call in ONNX Runtime
    assert head.shape == (1, model.config.vocab_size)
    assert np.abs(head[0] - ref[12]).max() < 1e-4
    rest = s.forward(IDS[13:20])
    assert np.abs(rest[0] - ref[19]).max() < 1e-4
    assert np.abs(s.step(IDS[20]) - ref[20]).max() < 1e-4
    assert s.num_cached == len(IDS)


def test_last_logits_needs_an_lm_head_matmul():
    """A graph whose logits do not come from a [hidden, vocab] MatMul is refused in one line, not mis-sliced."""
    from onnx import TensorProto, helper

    from owl_deploy.contract import GraphSpec, last_logits

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8])
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x], [y]))
    spec = GraphSpec(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, hidden_size=8, vocab_size=8,
                     max_positions=16)  # fmt: skip
    with pytest.raises(OwlError, match="cannot find the lm_head MatMul"):
        last_logits(proto, spec)
