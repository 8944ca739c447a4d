"""The sequential block runner on every supported family (owl-method.md, "Sequential calibration")."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, calib_ids, tiny_model

from owl_deploy.calibrate import SequentialRunner, capture_block_inputs
from owl_deploy.errors import OwlError
from owl_deploy.model import block_linears, decoder_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_stream_matches_the_models_own_forward(family):
    """Block-0 inputs carry the family's embedding (Gemma's scale, OPT's positions), and each block run
    with the captured arguments (masks, rotary embeddings) reproduces the full model's hidden states.
    5 samples in batches of 2: an uneven last batch gets its own captured arguments."""
    model = tiny_model(family)
    ids = calib_ids(5, 24)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    runner = SequentialRunner(model, ids, batch_size=2)
    assert sorted(runner._calls) == [1, 2]
    torch.testing.assert_close(torch.cat(runner.hidden), ref[0], rtol=0, atol=0)
    n = len(runner.blocks)
    for i in range(n - 1):  # ref[n] is after the final norm
        runner.collect(i, advance=True)
        torch.testing.assert_close(torch.cat(runner.hidden), ref[i + 1], rtol=1e-5, atol=1e-5)


def test_per_layer_masks_are_captured_per_block():
    """Qwen2 with sliding-window layers: layer 0 is full attention, the others get a sliding-window mask
    (different per layer, taken from the model's own code, not guessed)."""
    model = tiny_model("qwen2")
    _, calls = capture_block_inputs(model, decoder_blocks(model), calib_ids(2, 32), batch_size=2)
    masks = [c.kwargs["attention_mask"] for c in calls[2]]
    assert masks[0] is None or masks[0] is not masks[1]
    assert masks[1] is not None and masks[1] is masks[2]


def _dense_inputs(model, ids, block_index):
    """Inputs of every linear of one block in a plain full-model forward (float64)."""
    seen: dict[str, torch.Tensor] = {}
    block = decoder_blocks(model)[block_index]
    handles = [
        lin.register_forward_hook(lambda _m, a, _o, name=name: seen.__setitem__(name, a[0].detach().double()))
        for name, lin in block_linears(block).items()
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_statistics_match_a_float64_reference(family):
    """s_j = mean over samples of sum over tokens x_j^2 and H = 2/n sum x x^T (ref OWL item 1, SparseGPT),
    equal to a float64 computation on the dense model's own activations, for a block after the first.
    Accumulators are float64; each batch's partial is float32 (documented in calibrate.py)."""
    model = tiny_model(family)
    ids = calib_ids(6, 16)
    runner = SequentialRunner(model, ids, batch_size=4)
    runner.collect(0, advance=True)
    stats = runner.collect(1, hessian=True)
    ref = _dense_inputs(model, ids, 1)
    for name, x in ref.items():
        flat = x.reshape(-1, x.shape[-1])
        assert stats[name].nsamples == 6
        torch.testing.assert_close(stats[name].sq_norm, flat.square().sum(0) / 6, rtol=1e-5, atol=1e-9)
        h_ref = 2 / 6 * flat.T @ flat
        # float32 partials per batch: error relative to the entry's natural scale sqrt(H_ii H_jj)
        scale = torch.outer(h_ref.diagonal(), h_ref.diagonal()).sqrt()
        assert float(((stats[name].hessian - h_ref).abs() / scale).max()) < 1e-5
        assert stats[name].sq_sum.dtype == stats[name].hessian.dtype == torch.float64


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_ends_each_later_forward_at_its_last_linear_with_the_same_statistics(family):
    """Without advance the block's output is discarded: from the second batch on, each forward stops at its last
    linear's pre-hook (that matmul and what follows never run), and the statistics are the same bits."""
    model = tiny_model(family)
    ids = calib_ids(6, 16)
    full = SequentialRunner(model, ids, batch_size=2).collect(0, advance=True)  # advance: every forward runs whole
    linears = block_linears(decoder_blocks(model)[0])
    ran: list[str] = []
    handles = [lin.register_forward_hook(lambda *_a, n=name: ran.append(n)) for name, lin in linears.items()]
    try:
        early = SequentialRunner(model, ids, batch_size=2).collect(0)
    finally:
        for h in handles:
            h.remove()
    assert len(ran) == 3 * len(linears) - 2  # batches 2 and 3 skip their last linear
    for name, st in full.items():
        assert torch.equal(early[name].sq_sum, st.sq_sum) and early[name].nsamples == st.nsamples == 6, name


def test_a_block_that_skips_a_linear_in_its_first_batch_never_stops_early():
    """Data-dependent blocks (a mixture of experts skips an expert no token chose): a forward may only end early
    when the first batch called every linear exactly once, else an expert seen later would lose its statistics."""
    from owl_deploy.calibrate import _Collector

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x, use_b):
            x = self.a(x)
            return self.b(x) if use_b else x

    block = Routed()
    collector = _Collector({"a": block.a, "b": block.b}, hessian=False)
    x = torch.randn(2, 3, 4)
    with torch.no_grad(), collector.attached():
        for use_b in (False, True, True):
            collector.batch = 2
            collector.stop_early = True
            block(x, use_b)  # would raise _StopForward at b's pre-hook if early stops were allowed
            collector.end_batch()
    assert collector.once_each is False
    assert collector.stats["a"].nsamples == 6 and collector.stats["b"].nsamples == 4


def test_next_block_inputs_come_from_the_pruned_block():
    """advance() re-runs block i after the caller changed it: block i+1 sees the pruned block's output."""
    model = tiny_model("llama")
    ids = calib_ids(3, 16)
    runner = SequentialRunner(model, ids, batch_size=3)
    h0 = runner.hidden[0].clone()
    runner.collect(0)
    block = runner.blocks[0]
    with torch.no_grad():
        for lin in block_linears(block).values():
            lin.weight[:, ::2] = 0
        call = runner._calls[3][0]
        expected = block(h0, *call.args, **call.kwargs)
    runner.advance(0)
    torch.testing.assert_close(runner.hidden[0], expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        runner.advance(0)  # the stream is now at block 1


def test_blocks_are_restored_after_capture():
    model = tiny_model("mistral")
    blocks = decoder_blocks(model)
    capture_block_inputs(model, blocks, calib_ids(2, 8), batch_size=1)
    assert all("forward" not in vars(b) for b in blocks)
    with torch.no_grad():
        model(input_ids=calib_ids(1, 8), use_cache=False)  # runs the real blocks again


def test_model_without_decoder_blocks_is_a_clear_error():
    """GPT-2's blocks hold Conv1D, not nn.Linear: nothing to prune, said in one line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(OwlError, match="no decoder blocks"):
        SequentialRunner(model, calib_ids(2, 8, vocab=64))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_bfloat16_autocast_forwards_keep_float64_statistics(family):
    """--compute-dtype bfloat16 runs the block matmuls in bf16 (CPU autocast): the stream stays float32
    and the statistics float64, within bf16 rounding (~0.4%) of the float32 run."""
    model = tiny_model(family)
    ids = calib_ids(4, 16)
    ref = SequentialRunner(model, ids, batch_size=2).collect(0)
    fast_runner = SequentialRunner(model, ids, batch_size=2, autocast=torch.bfloat16)
    fast = fast_runner.collect(0, advance=True)
    assert fast_runner.hidden[0].dtype == torch.float32
    for name, st in ref.items():
        assert fast[name].sq_sum.dtype == torch.float64
        torch.testing.assert_close(fast[name].sq_norm, st.sq_norm, rtol=0.03, atol=1e-6)


def test_hessian_under_bfloat16_autocast_is_a_float32_product():
    """The hooks run inside the block's bf16 autocast region; X^T X must still be a float32 product of the
    inputs the linear saw (a bf16 matmul made o_proj's Hessian indefinite on a tiny model, failing SparseGPT)."""
    model = tiny_model("llama", hidden=128, layers=2)
    runner = SequentialRunner(model, calib_ids(8, 32), batch_size=8, autocast=torch.bfloat16)
    block = decoder_blocks(model)[0]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        lin.register_forward_hook(lambda _m, args, _o, n=name: seen.__setitem__(n, args[0].detach()))
        for name, lin in block_linears(block).items()
    ]
    try:
        stats = runner.collect(0, hessian=True)
    finally:
        for h in handles:
            h.remove()
    assert {x.dtype for x in seen.values()} == {torch.float32, torch.bfloat16}  # both paths of the hook
    for name, st in stats.items():
        x = seen[name].reshape(-1, seen[name].shape[-1]).float()
        torch.testing.assert_close(st.xtx, (x.T @ x).double(), rtol=1e-5, atol=1e-5)
        # the squares are taken in a float32 copy (bf16 inputs) or a new tensor: the same bits, the input untouched
        assert torch.equal(st.sq_sum, x.square().sum(0).double()), name
        assert float(torch.linalg.eigvalsh(st.hessian).min()) > -1e-6 * float(st.hessian.diagonal().max()), name


def test_auto_compute_dtype_follows_the_cpu(monkeypatch):
    """auto -> bfloat16 on AMX, float32 without native bf16, and on AVX512-BF16 alone by vendor (AMD bfloat16,
    Intel float32); explicit names win."""
    from owl_deploy import calibrate
    from owl_deploy.calibrate import autocast_dtype, resolve_dtype

    monkeypatch.delenv(calibrate.AUTO_DTYPE_ENV, raising=False)
    assert resolve_dtype("float32") == "float32" and autocast_dtype("float32") is None
    assert autocast_dtype("bfloat16") is torch.bfloat16
    cases = [(False, False, "AuthenticAMD", None), (True, True, "GenuineIntel", torch.bfloat16)]
    cases += [(False, True, "GenuineIntel", torch.bfloat16), (True, False, "GenuineIntel", None)]
    cases += [(True, False, "AuthenticAMD", torch.bfloat16), (True, False, None, None)]
    for avx512_bf16, amx, vendor, want in cases:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(calibrate, "cpu_info", lambda v=vendor: {"vendor": v, "flags": set(), "model": "x"})
        assert autocast_dtype("auto") is want, (avx512_bf16, amx, vendor)


def test_auto_compute_dtype_can_be_pinned_by_the_environment(monkeypatch):
    """OWL_AUTO_COMPUTE_DTYPE overrides the CPU rule for ``auto`` (how a Ray driver pins its workers); an explicit
    dtype still wins; a value that is no dtype is one clear error."""
    from owl_deploy import calibrate
    from owl_deploy.errors import OwlError

    for value in ("float32", "bfloat16"):
        monkeypatch.setenv(calibrate.AUTO_DTYPE_ENV, value)
        assert calibrate.resolve_dtype("auto") == value and calibrate.worker_env() == {calibrate.AUTO_DTYPE_ENV: value}
        assert calibrate.resolve_dtype("float32") == "float32"
    monkeypatch.setenv(calibrate.AUTO_DTYPE_ENV, "fp16")
    with pytest.raises(OwlError, match="OWL_AUTO_COMPUTE_DTYPE='fp16': expected one of float32, bfloat16"):
        calibrate.resolve_dtype("auto")


def test_auto_compute_dtype_times_nothing(monkeypatch):
    """auto is a rule on the CPU, not a measurement: the same answer in every process whatever the load (a timed
    probe flipped between a Ray worker and its driver and made one study prune in two dtypes)."""
    from owl_deploy import calibrate

    def no_clock() -> float:
        raise AssertionError("resolve_dtype timed something")

    monkeypatch.setattr(calibrate.time, "perf_counter", no_clock)
    first = calibrate.resolve_dtype("auto")
    assert first in ("float32", "bfloat16") and all(calibrate.resolve_dtype("auto") == first for _ in range(3))
