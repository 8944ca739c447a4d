"""Recover: LoRA (merged, re-masked) and masked fine-tuning learn and keep every zero; determinism, resume
after a kill, the CLI and its bad inputs, and an export of the result whose zero proof passes unchanged."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import save_tiny, tiny_model

from owl_deploy.cli import main
from owl_deploy.configs import OwlConfig, PruneConfig, RecoverConfig
from owl_deploy.errors import OwlError
from owl_deploy.masked_lora import MaskedLowRank, masked_linears
from owl_deploy.prune import prune_model
from owl_deploy.recover import masks_of, merge, recover_model


def _pruned(seed: int = 0):
    """A tiny LLaMA, 60% pruned. Its lm_head is scaled up: the random init (std 0.02) caps the logits the
    blocks can reach far below a confident prediction, so nothing could be learnt through the blocks alone."""
    model = tiny_model("llama", seed=seed, layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    prune_model(model, PruneConfig(method="magnitude", allocation="uniform", sparsity=0.6), OwlConfig(), progress=False)
    return model


def _pattern(n: int, seqlen: int = 32, offset: int = 0) -> torch.Tensor:
    """Windows of a repeating 7-token cycle: a pattern a model can learn in a few dozen steps."""
    cycle = torch.tensor([10, 50, 90, 130, 170, 210, 250])
    return torch.stack([cycle[(torch.arange(seqlen) + i + offset) % 7] for i in range(n)])


def _pruned_qwen2(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Qwen2 (biases, RMSNorms) pruned 60% through the CLI, and its calibration text file."""
    dense = save_tiny("qwen2", tmp_path / "dense", hidden=64, layers=2)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n" * 400)
    pruned = tmp_path / "pruned"
    res = CliRunner().invoke(main, ["prune", "--model", str(dense), "--sparsity", "0.6", "--nsamples", "4",
                                    "--seqlen", "32", "--calib", str(text), "--out", str(pruned)])  # fmt: skip
    assert res.exit_code == 0, res.output
    return pruned, text


#: every recover method, with a learning rate that learns _pattern in 40 steps (full fine-tuning needs a lower one)
METHODS = [("lora", 1e-2), ("masked-lora", 1e-2), ("masked", 3e-3)]


def _cfg(**kw) -> RecoverConfig:
    base = dict(steps=40, batch_size=2, seqlen=32, lr=1e-2, eval_every=10, patience=10)
    return RecoverConfig(**{**base, **kw})


@pytest.mark.parametrize(("method", "lr"), METHODS)
def test_recovery_learns_and_keeps_exactly_the_pruned_zeros(method, lr):
    model = _pruned()
    masks = masks_of(model)
    trained, record = recover_model(model, _pattern(80), _pattern(4, offset=3), _cfg(method=method, lr=lr),
                                    progress=False)  # fmt: skip
    losses = [e["heldout_loss"] for e in record["evals"]]
    assert record["evals"][0]["step"] == 0 and losses[-1] < 0.1 * losses[0], losses  # the pattern is learnt
    assert record["best"]["heldout_loss"] == pytest.approx(min(losses[1:]), abs=1e-5) and record["steps_run"] == 40
    merged = merge(trained, masks)
    after = masks_of(merged)
    assert all(torch.equal(masks[k], after[k]) for k in masks)  # every zero, and no other, is a zero
    if method == "lora":
        assert not hasattr(merged, "peft_config")  # the adapters are merged into plain weights
    if method == "masked-lora":
        assert not masked_linears(merged) and not any("lora_" in n for n, _ in merged.named_parameters())


def test_masked_lora_updates_only_kept_weights_and_its_merge_changes_no_number():
    """On a 4x8 linear: the effective weight is zero wherever pruning put a zero, the adapters' gradients are
    those of the masked update alone, and the trained model is the merged one (plain LoRA's is not)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    pruned = torch.rand(4, 8) < 0.5
    with torch.no_grad():
        lin.weight.masked_fill_(pruned, 0.0)
    w0 = lin.weight.detach().clone()
    param = MaskedLowRank(~pruned, rank=2, alpha=4.0)
    with torch.no_grad():
        param.lora_B.normal_()
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", param)
    eff = lin.weight
    assert torch.equal(eff[pruned], torch.zeros(int(pruned.sum())))
    assert torch.allclose(eff, w0 + 2.0 * (param.lora_B @ param.lora_A) * ~pruned)
    x = torch.randn(3, 8)
    lin(x).square().sum().backward()
    a, b = param.lora_A.detach().clone().requires_grad_(), param.lora_B.detach().clone().requires_grad_()
    (x @ (w0 + 2.0 * (b @ a) * ~pruned).T).square().sum().backward()
    assert torch.allclose(param.lora_A.grad, a.grad) and torch.allclose(param.lora_B.grad, b.grad)

    model = _pruned()
    masks = masks_of(model)
    trained, _ = recover_model(model, _pattern(40), _pattern(4, offset=3), _cfg(method="masked-lora", steps=20),
                               progress=False)  # fmt: skip
    batch = _pattern(2, offset=1)
    with torch.no_grad():
        before = trained(batch).logits
        after = merge(trained, masks)(batch).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


def test_early_stopping_keeps_the_best_held_out_state(monkeypatch):
    """Held-out losses 5, 3, 2, 2.5, 2.6: two evaluations without improvement (patience 2) stop the run at step
    20, and the weights of step 10 (the best) are the ones returned."""
    from owl_deploy import recover

    scripted = iter([5.0, 3.0, 2.0, 2.5, 2.6, 2.7])
    snapshots = []
    monkeypatch.setattr(
        recover, "heldout_loss", lambda model, *_: (snapshots.append(_lora_sum(model)), next(scripted))[1]
    )
    cfg = _cfg(steps=60, eval_every=5, patience=2)
    trained, record = recover_model(_pruned(), _pattern(120), _pattern(4, offset=3), cfg, progress=False)
    assert record["stopped_early"] and record["steps_run"] == 20
    assert record["best"] == {"step": 10, "heldout_loss": 2.0}
    assert _lora_sum(trained) == pytest.approx(snapshots[2])  # the step-10 adapters, not the step-20 ones


def _lora_sum(model) -> float:
    return float(sum(p.detach().abs().sum() for n, p in model.named_parameters() if "lora_" in n))


@pytest.mark.parametrize(("method", "lr"), METHODS)
def test_same_seed_same_weights_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, method, lr):
    """Each method's checkpoint holds what it trains (adapters, their parametrized form, or the linears)."""
    from owl_deploy import recover

    masks = masks_of(_pruned())

    def weights(model):
        return [p.detach().clone() for p in merge(model, masks).parameters()]

    cfg = _cfg(steps=30, method=method, lr=lr)
    whole = weights(recover_model(_pruned(), _pattern(60), _pattern(4, offset=3), cfg, progress=False)[0])
    again = weights(recover_model(_pruned(), _pattern(60), _pattern(4, offset=3), cfg, progress=False)[0])
    assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))

    real = recover._lr
    calls = {"n": 0}

    def dies_at_step_25(step, c):
        calls["n"] += 1
        if step == 25:
            raise KeyboardInterrupt  # a kill after the checkpoint of step 20
        return real(step, c)

    monkeypatch.setattr(recover, "_lr", dies_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        recover_model(_pruned(), _pattern(60), _pattern(4, offset=3), cfg, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / recover.CHECKPOINT).is_file()
    monkeypatch.setattr(recover, "_lr", real)
    model, record = recover_model(
        _pruned(), _pattern(60), _pattern(4, offset=3), cfg, checkpoint_dir=tmp_path, progress=False
    )
    assert record["resumed_from"] == 20
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights(model), whole, strict=True))


def test_a_dense_model_or_distillation_without_teacher_is_refused(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense", hidden=32, layers=2)
    res = CliRunner().invoke(main, ["recover", "--model", str(dense), "--steps", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "has no zero weights" in res.stderr and not (tmp_path / "o").exists()
    res = CliRunner().invoke(main, ["recover", "--model", str(dense), "--distill", "0.5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "needs a dense teacher" in res.stderr
    with pytest.raises(OwlError, match="need 16 windows"):
        recover_model(_pruned(), _pattern(4), _pattern(2), _cfg(steps=8), progress=False)


def test_cli_recover_then_export_proves_the_zeros(tmp_path):
    """The whole path: prune (CLI), recover with distillation from the dense model (CLI), export: zeros proven."""
    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    dense = save_tiny("llama", tmp_path / "dense", hidden=32, layers=2)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n" * 400)
    pruned = tmp_path / "pruned"
    common = ["--calib", str(text)]
    res = CliRunner().invoke(main, ["prune", "--model", str(dense), "--sparsity", "0.5", "--nsamples", "4",
                                    "--seqlen", "32", *common, "--out", str(pruned)])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "recovered"
    args = ["recover", "--model", str(pruned), "--teacher", str(dense), "--distill", "0.5", "--steps", "6",
            "--batch-size", "2", "--seqlen", "32", "--eval-every", "3", "--heldout-tokens", "128", *common,
            "--eval-text", str(text), "--eval-seqlen", "32", "--eval-tokens", "256", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    # no terminal: one line per held-out evaluation instead of a progress bar (a log file is not silent for an hour)
    lines = [line for line in res.stderr.splitlines() if line.startswith("recover: step")]
    assert [line.split(",")[0] for line in lines] == ["recover: step 3/6", "recover: step 6/6"], res.stderr
    assert all("held-out" in line and "tok/s" in line and "min left" in line for line in lines)
    report = json.loads((out / "recover.json").read_text())
    assert report["zeros"]["identical_mask"] and report["zeros"]["pruned"] == report["zeros"]["recovered"]
    assert set(report["perplexity"]) == {"pruned", "adapter", "merged_remasked"} and report["teacher"] == str(dense)
    assert (out / "sparsity.json").is_file() and not list(tmp_path.glob(".recovered.recover-*"))
    assert report["machine"]["threads"] == torch.get_num_threads() and "isa" in report["machine"]
    exported = export_model(out, tmp_path / "odir", ExportConfig(sequence_length=64, greedy_tokens=4),
                            engines=("onnxruntime",))  # fmt: skip
    assert exported["zeros_preserved"] and exported["zeros"]["total_onnx_zeros"] == report["zeros"]["pruned"]


@pytest.mark.parametrize("method", ["lora", "masked-lora"])
def test_norms_trains_the_norm_scales_and_biases_too_and_keeps_the_zeros(tmp_path, method):
    """--norms (the default): a Qwen2 (q/k/v biases, RMSNorm scales) recovered through the CLI's lean bf16 path
    (trained on bf16 frozen linears, merged on the fp32 weights read back): every 1-D tensor moves, every zero
    stays; with --no-norms, none moves."""
    from safetensors.torch import load_file

    pruned, text = _pruned_qwen2(tmp_path)
    args = ["recover", "--model", str(pruned), "--steps", "4", "--batch-size", "2", "--seqlen", "32",
            "--eval-every", "2", "--heldout-tokens", "128", "--calib", str(text), "--eval-text", str(text),
            "--eval-seqlen", "32", "--eval-tokens", "256", "--compute-dtype", "bfloat16", "--lr", "0.01",
            "--method", method]  # fmt: skip

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    before = tensors(pruned)
    vectors = [k for k, v in before.items() if v.ndim == 1]
    assert any(k.endswith("q_proj.bias") for k in vectors) and any(k.endswith("layernorm.weight") for k in vectors)
    for norms in (True, False):
        out = tmp_path / f"norms-{norms}"
        res = CliRunner().invoke(main, [*args, *([] if norms else ["--no-norms"]), "--out", str(out)])
        assert res.exit_code == 0, res.output
        report = json.loads((out / "recover.json").read_text())
        assert report["settings"]["norms"] is norms and report["zeros"]["identical_mask"]
        after = tensors(out)
        moved = [k for k in vectors if not torch.equal(before[k], after[k])]
        assert moved == (vectors if norms else []), moved
        for k, v in before.items():
            if v.ndim == 2 and k.endswith("proj.weight"):
                assert torch.equal(after[k] == 0, v == 0), k  # the same zeros, no others


def test_auto_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_fast(monkeypatch):
    """Training follows the calibration's rule: an AVX512-BF16 Xeon without AMX trained 16 LoRA steps of SmolLM2
    in 128 s in bf16 against 81 s in float32 (2026-12-03), a Zen 5 EPYC 2.1x faster in bf16."""
    from owl_deploy import calibrate, recover

    monkeypatch.delenv(calibrate.AUTO_DTYPE_ENV, raising=False)
    assert RecoverConfig().compute_dtype == "auto"
    assert recover.resolve_dtype("float32") == "float32" and recover.resolve_dtype("bfloat16") == "bfloat16"
    cases = ((True, False, "AuthenticAMD", "bfloat16"), (True, False, "GenuineIntel", "float32"))
    cases += ((False, True, "GenuineIntel", "bfloat16"), (False, False, "AuthenticAMD", "float32"))
    for bf16, amx, vendor, want in cases:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(calibrate, "cpu_info", lambda v=vendor: {"vendor": v, "flags": set(), "model": "x"})
        assert recover.resolve_dtype("auto") == want


@pytest.mark.parametrize("method", ["lora", "masked-lora"])
def test_lean_bf16_training_changes_no_number(tmp_path, monkeypatch, method):
    """LoRA (plain or masked) in bf16 with the frozen linears stored in bf16 (the default) against the same run
    with them in fp32: the same loss curve, held-out losses, perplexities and merged weights, to the last bit;
    the masks are read back from the fp32 weights for the merge."""
    from safetensors.torch import load_file

    from owl_deploy import recover

    pruned, text = _pruned_qwen2(tmp_path)
    args = ["recover", "--model", str(pruned), "--steps", "6", "--batch-size", "2", "--seqlen", "32",
            "--eval-every", "3", "--heldout-tokens", "128", "--calib", str(text), "--eval-text", str(text),
            "--eval-seqlen", "32", "--eval-tokens", "256", "--compute-dtype", "bfloat16", "--lr", "0.01",
            "--method", method]  # fmt: skip
    reports, weights = {}, {}
    for name in ("lean", "fp32"):
        if name == "fp32":
            monkeypatch.setattr(recover, "lean", lambda cfg: False)
        out = tmp_path / name
        res = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert res.exit_code == 0, res.output
        reports[name] = json.loads((out / "recover.json").read_text())
        weights[name] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    a, b = reports["lean"], reports["fp32"]
    assert a["frozen_weights"] == "bfloat16" and b["frozen_weights"] == "float32"
    for key in ("curve", "evals", "best", "perplexity", "window_nll", "zeros"):
        if key == "curve":
            a[key] = [{k: v for k, v in c.items() if k != "tokens_per_s"} for c in a[key]]
            b[key] = [{k: v for k, v in c.items() if k != "tokens_per_s"} for c in b[key]]
        assert a[key] == b[key], key
    assert a["zeros"]["identical_mask"] and a["curve"][-1]["loss"] < a["curve"][0]["loss"]
    if method == "masked-lora":  # trained and deployed are one function
        assert a["perplexity"]["adapter"] == pytest.approx(a["perplexity"]["merged_remasked"], rel=1e-5)
    assert weights["lean"].keys() == weights["fp32"].keys()
    assert all(torch.equal(weights["lean"][k], weights["fp32"][k]) for k in weights["lean"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_bf16_teacher_gives_the_same_logits_under_autocast(family):
    """The distillation teacher's linears held in bf16 (half its memory): under bf16 autocast its logits are
    the fp32-stored teacher's to the last bit (qwen2: biased projections; llama: lm_head tied to the
    embedding, which stays fp32)."""
    from owl_deploy.recover import teacher_to_bf16

    teacher = tiny_model(family, seed=3, layers=2)
    batch = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = teacher(input_ids=batch, use_cache=False).logits.float()
    embed = teacher.get_input_embeddings().weight
    assert teacher_to_bf16(teacher) == 2 * 7 + 1
    assert teacher.get_input_embeddings().weight is embed and embed.dtype == torch.float32
    assert all(lin.weight.dtype == torch.bfloat16 for lin in teacher.modules() if isinstance(lin, torch.nn.Linear))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher(input_ids=batch, use_cache=False).logits.float()
    assert torch.equal(got, want)


def test_release_checkpoint_copies_every_frozen_fp32_tensor_off_the_mapped_file(tmp_path):
    """After the bf16 copies replace the block linears, nothing may keep the fp32 checkpoint's mapping alive:
    every frozen fp32 parameter and buffer gets its own storage, with the same values; trainable ones stay."""
    from owl_deploy.recover import release_checkpoint
    from owl_deploy.specs import load_model

    model, _ = load_model(save_tiny("llama", tmp_path / "m", hidden=64, layers=2))
    model.lm_head.weight.requires_grad_(True)  # stands for a trainable tensor (an adapter)
    before = {n: (t.data_ptr(), t.detach().clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert release_checkpoint(model) > 0
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        ptr, value = before[n]
        assert torch.equal(t, value), n
        moved = t.data_ptr() != ptr
        assert moved == (t.dtype == torch.float32 and not (n == "lm_head.weight" or t.requires_grad)), n


def test_a_teacher_loaded_from_its_folder_keeps_nothing_mapped(tmp_path):
    """A freshly loaded model's parameters require grad, so release_checkpoint (frozen tensors only) left the
    teacher's norms and embeddings on the file: the whole fp32 checkpoint stayed mapped (the Qwen distillation
    run peaked at 22.7 GB against its 17.6 GB estimate). teacher_to_bf16 freezes the teacher first."""
    from owl_deploy.recover import teacher_to_bf16
    from owl_deploy.specs import load_model

    folder = save_tiny("qwen2", tmp_path / "t", hidden=64, layers=2)
    teacher, _ = load_model(folder)

    def mapped() -> bool:
        return any(str(folder) in line for line in Path("/proc/self/maps").read_text().splitlines())

    assert mapped()  # the loader maps the checkpoint (zero-copy); else this test proves nothing
    teacher_to_bf16(teacher)
    gc.collect()
    assert not mapped()
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    """Two runs writing one --out would resume from each other's checkpoints and overwrite them: the second stops
    at once with a one-line error (before loading anything), and the lock goes with the run that held it."""
    from owl_deploy.io import exclusive
    from owl_deploy.recover import run_recover

    out = tmp_path / "recovered"
    lock = tmp_path / ".recovered.recover.lock"
    with exclusive(lock, "held by this test"):
        with pytest.raises(
            OwlError, match=r"^another `owl-deploy recover` is writing .*recovered .*choose another --out$"
        ):
            run_recover("no-such-model", out, _cfg())
        with pytest.raises(OwlError, match=r"^held by this test$"), exclusive(lock, "held by this test"):
            pass
        assert lock.exists()  # the refused one leaves the holder's lock alone
    assert not lock.exists()
    with pytest.raises(OwlError, match="model not found"):  # free again: the run goes on to its own checks
        run_recover("no-such-model", out, _cfg())
    assert not lock.exists() and not out.exists()
