"""Issue 2: real assets, loading, the data path, the CLI surface and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from owl_deploy import assets, data
from owl_deploy.errors import OwlError
from owl_deploy.evaluate import paired_nll, perplexity, resolved, torch_logits_fn, verdict

CLI = [sys.executable, "-m", "owl_deploy"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------ the real model and text


@pytest.mark.slow
def test_real_smollm2_greedy_generation_is_stable(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
    new = out[0, ids.shape[1] :].tolist()
    # measured once on this machine (transformers 5.24, torch 2.13 CPU)
    assert new == [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]
    assert tok.decode(new).startswith(" Paris.")


@pytest.mark.slow
def test_real_smollm2_dense_perplexity_on_wiki_slice(smollm2):
    model, tok = smollm2
    tokens = data.eval_tokens(tok, "wiki", max_tokens=4096)
    result = perplexity(torch_logits_fn(model), tokens, seqlen=512, progress=False)
    assert (result.windows, result.tokens) == (8, 4096)
    # measured once: 23.53646766436843 (first 4096 tokens of `wiki`, 512-token windows)
    assert result.perplexity == pytest.approx(23.5365, rel=1e-4)


def test_model_asset_is_fp32_safetensors_with_tokenizer(smollm2_dir):
    info = json.loads((smollm2_dir / "asset.json").read_text())
    assert info["params"] == 134_515_008
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3
    assert "quantization_config" not in cfg


def test_texts_are_real_and_cleaned():
    wiki = data.load_text("wiki")
    assert wiki.startswith("Anarchism\n") and "<ref" not in wiki and "[[" not in wiki and "{{" not in wiki
    assert 400_000 < len(wiki.split()) < 520_000  # ≈480k words in offline-assets.md
    assert "Emma Woodhouse, handsome, clever, and rich" in data.load_text("austen")
    assert "hacker" in data.load_text("jargon").lower()
    assert "bushfire" in data.load_text("news")


def test_second_fetch_is_a_noop(smollm2_dir):
    proc = run_cli("assets", "fetch", "smollm2-135m", "wiki")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m: already present" in proc.stderr and "wiki: already present" in proc.stderr
    assert "downloading" not in proc.stderr


def test_assets_list_shows_paths():
    proc = run_cli("assets", "list")
    assert proc.returncode == 0
    for name in assets.ASSETS:
        assert name in proc.stdout
    assert str(assets.asset_path("wiki")) in proc.stdout


def test_failed_preparation_leaves_nothing(tmp_path, monkeypatch):
    """An asset whose preparation dies half-way leaves neither the asset nor temp files behind."""
    monkeypatch.setenv("OWL_DEPLOY_HOME", str(tmp_path))

    def boom(files, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    fake = assets.Asset("broken", "model", "a model whose conversion fails", (), boom)
    monkeypatch.setitem(assets.ASSETS, "broken", fake)
    with pytest.raises(RuntimeError):
        assets.fetch(["broken"])
    assert not assets.is_present("broken")
    assert list((tmp_path / "models").iterdir()) == []


def test_download_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OWL_DEPLOY_HOME", str(tmp_path))
    cached = assets.home() / "downloads"
    cached.mkdir(parents=True)
    bad = assets.Download("deb", "jargon-text=4.4.7-4.1", assets.JARGON.filename, "0" * 64)
    with pytest.raises(OwlError, match="does not match the pinned"):
        assets._download(bad)
    assert list(cached.iterdir()) == []


# ------------------------------------------------------------------ data


def test_calibration_windows_are_seeded_and_deterministic(smollm2):
    _, tok = smollm2
    a = data.calibration_windows(tok, "news", nsamples=8, seqlen=64, seed=0)
    b = data.calibration_windows(tok, "news", nsamples=8, seqlen=64, seed=0)
    c = data.calibration_windows(tok, "news", nsamples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = data.tokenize(tok, data.load_text("news"))
    joined = ",".join(map(str, stream.tolist()))
    for row in a:  # every window is a contiguous slice of the tokenized text
        assert ",".join(map(str, row.tolist())) in joined


def test_calibration_mix_equal_shares_windows_among_sources_not_by_length(tmp_path, smollm2):
    _, tok = smollm2
    words = "the quick brown fox jumps over the lazy dog and runs far away "
    (tmp_path / "long.txt").write_text(words * 400)
    (tmp_path / "short.txt").write_text(words.upper() * 40)  # a tenth of the length, other tokens
    spec = f"{tmp_path / 'long.txt'}+{tmp_path / 'short.txt'}"
    short = set(data.tokenize(tok, data.load_text(str(tmp_path / "short.txt"))).tolist())

    def from_short(mix: str) -> int:
        w = data.calibration_windows(tok, spec, nsamples=200, seqlen=16, seed=0, mix=mix)
        return sum(set(row.tolist()) <= short for row in w)

    assert from_short("length") < 40 < 70 < from_short("equal") < 130  # about 1 in 11, then about 1 in 2
    assert torch.equal(
        data.calibration_windows(tok, spec, 8, 16, 0, "equal"), data.calibration_windows(tok, spec, 8, 16, 0, "equal")
    )
    with pytest.raises(OwlError, match="mix must be"):
        data.calibration_windows(tok, spec, 8, 16, 0, "sqrt")


def test_text_files_txt_and_jsonl(tmp_path, smollm2):
    _, tok = smollm2
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    assert data.load_text(str(tmp_path / "a.jsonl")) == "first doc\n\nsecond doc"
    (tmp_path / "b.txt").write_text("plain text\n")
    assert data.load_text(f"{tmp_path / 'a.jsonl'}+{tmp_path / 'b.txt'}") == "first doc\n\nsecond doc\n\nplain text\n"
    ids = data.eval_tokens(tok, str(tmp_path / "b.txt"))
    assert ids.tolist() == tok("plain text\n", add_special_tokens=False)["input_ids"]  # no BOS added


def test_bad_text_inputs(tmp_path, smollm2):
    _, tok = smollm2
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(OwlError, match="is empty"):
        data.load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(OwlError, match=r"bad\.jsonl:1"):
        data.load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(OwlError, match="not UTF-8"):
        data.load_text(str(tmp_path / "latin1.txt"))
    (tmp_path / "short.txt").write_text("only a few words here")
    with pytest.raises(OwlError, match="larger than the text"):
        data.calibration_windows(tok, str(tmp_path / "short.txt"), nsamples=4, seqlen=64, seed=0)


# ------------------------------------------------------------------ CLI surface and bad inputs


def _all_commands() -> list[list[str]]:
    from owl_deploy.cli import main

    out: list[list[str]] = [[]]

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            out.append([*prefix, name])
            if hasattr(cmd, "commands"):
                walk(cmd, [*prefix, name])

    walk(main, [])
    return out


@pytest.mark.parametrize("cmd", _all_commands(), ids=lambda c: " ".join(c) or "owl-deploy")
def test_every_command_has_help(cmd):
    proc = run_cli(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def _one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert pattern in lines[0]


def test_cli_unknown_asset():
    _one_error_line(run_cli("assets", "fetch", "gpt-17"), "unknown asset 'gpt-17'")


def test_cli_missing_model_path(tmp_path):
    _one_error_line(run_cli("eval", "--model", str(tmp_path / "nope")), "model not found")


def test_cli_not_a_model_folder(tmp_path):
    _one_error_line(run_cli("eval", "--model", str(tmp_path)), "not a Hugging Face model folder")


def test_cli_truncated_gguf(tmp_path, smollm2_dir):
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    _one_error_line(run_cli("eval", "--model", str(gguf), "--max-tokens", "64"), "cannot load")


def test_cli_truncated_safetensors(tmp_path, smollm2_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((smollm2_dir / name).read_bytes())
    with open(smollm2_dir / "model.safetensors", "rb") as fh:
        (broken / "model.safetensors").write_bytes(fh.read(1 << 20))
    _one_error_line(run_cli("eval", "--model", str(broken), "--max-tokens", "64"), "cannot load model")


def test_cli_empty_text_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    _one_error_line(run_cli("eval", "--model", "smollm2-135m", "--text", str(tmp_path / "empty.txt")), "is empty")


def test_cli_eval_json(tmp_path):
    """--json carries every window's NLL; --against pairs a run with it (the same model: exactly zero, unresolved),
    and refuses, in one line and before scoring, a file whose windows cannot be this run's."""
    proc = run_cli("eval", "--model", "smollm2-135m", "--max-tokens", "1100", "--seqlen", "512", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["windows"], out["tokens"], out["seqlen"]) == (2, 1024, 512)
    assert 5 < out["perplexity"] < 100
    assert len(out["window_nll"]) == 2 and abs(sum(out["window_nll"]) / 2 - out["mean_nll"]) < 1e-9
    ref = tmp_path / "ref.json"
    ref.write_text(proc.stdout)
    again = run_cli("eval", "--model", "smollm2-135m", "--max-tokens", "1100", "--seqlen", "512", "--against", str(ref))
    assert again.returncode == 0, again.stderr
    assert f"against {ref} (smollm2-135m): +0.0000 ± 0.0000 NLL per window (the same within noise" in again.stdout
    both = run_cli("eval", "--model", "smollm2-135m", "--max-tokens", "1100", "--json", "--against", str(ref))
    assert json.loads(both.stdout)["paired"] == {"against": str(ref), "against_model": "smollm2-135m",
                                                 "delta_nll": 0.0, "se": 0.0, "resolved": 0}  # fmt: skip
    short = run_cli("eval", "--model", "smollm2-135m", "--max-tokens", "600", "--against", str(ref))
    _one_error_line(short, "2 windows there, 1 here")
    _one_error_line(run_cli("eval", "--model", "smollm2-135m", "--seqlen", "256", "--against", str(ref)),
                    "windows of 512 tokens, this run on 'wiki' in windows of 256")  # fmt: skip
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({k: v for k, v in out.items() if k != "window_nll"}))
    _one_error_line(run_cli("eval", "--model", "smollm2-135m", "--against", str(bare)), "no window_nll in it")
    _one_error_line(run_cli("eval", "--model", "smollm2-135m", "--against", str(tmp_path / "none.json")),
                    "cannot read an eval JSON")  # fmt: skip
    tasks = run_cli("eval", "--model", "smollm2-135m", "--tasks", "lambada_wiki", "--against", str(ref))
    assert tasks.returncode == 2 and "does not apply to --tasks" in tasks.stderr


def test_heldout_tail_is_disjoint_from_calibration(smollm2):
    _, tok = smollm2
    stream = data.tokenize(tok, data.load_text("news"))
    held = data.heldout_tokens(tok, "news", None, 128)
    cut = len(stream) - int(len(stream) * data.HOLDOUT_FRACTION)
    tail = stream[cut:]
    assert torch.equal(held, tail[: len(tail) // 128 * 128])
    windows = data.calibration_windows(tok, "news", nsamples=64, seqlen=128, seed=3)
    calib = ",".join(map(str, stream[:cut].tolist()))
    for row in windows:
        assert ",".join(map(str, row.tolist())) in calib


def test_heldout_windows_take_every_source_in_turn(smollm2):
    """The first N held-out tokens once came from the first source only: now window i is source i mod k's."""
    _, tok = smollm2
    tails = data.calibration_streams(tok, "news+austen+jargon", "heldout")
    held = data.heldout_tokens(tok, "news+austen+jargon", 6 * 64 + 63, 64).view(-1, 64)
    assert held.shape == (6, 64)
    for i, row in enumerate(held):
        assert torch.equal(row, tails[i % 3][(i // 3) * 64 : (i // 3 + 1) * 64])
    everything = data.heldout_tokens(tok, "news+austen+jargon", None, 64)
    assert len(everything) == sum(len(t) // 64 * 64 for t in tails)  # a spent source drops out of the turn
    with pytest.raises(OwlError, match="no window of 64 tokens within 63"):
        data.heldout_tokens(tok, "news", 63, 64)


def test_max_tokens_tokenizes_a_prefix_with_the_whole_texts_tokens(smollm2, tmp_path):
    """--max-tokens cuts before tokenizing (a prefix, doubled until it is long enough): the tokens are
    exactly the first N of the whole text's, on the real evaluation text and on one huge line."""
    _, tok = smollm2
    whole = data.tokenize(tok, data.load_text("wiki"))
    assert torch.equal(data.eval_tokens(tok, "wiki", 16384), whole[:16384])
    line = tmp_path / "line.txt"
    line.write_text(("word " * 7 + "punctuation, and digits 12345! ") * 20_000)  # 1 MB, no newline
    assert torch.equal(data.eval_tokens(tok, str(line), 512), data.tokenize(tok, line.read_text())[:512])


def test_long_texts_are_tokenized_once_and_cached_by_content(smollm2, tmp_path, monkeypatch):
    """The cache returns the very tokens of a fresh tokenization; another text gets its own entry;
    a damaged entry is re-made; short texts and OWL_DEPLOY_TOKEN_CACHE=0 write nothing."""
    _, tok = smollm2
    monkeypatch.setenv("OWL_DEPLOY_HOME", str(tmp_path))
    text = data.load_text("news")
    assert len(text) >= data._CACHE_MIN_CHARS
    monkeypatch.setenv("OWL_DEPLOY_TOKEN_CACHE", "0")
    fresh = data.tokenize(tok, text)
    assert not (tmp_path / "tokens").exists()
    monkeypatch.delenv("OWL_DEPLOY_TOKEN_CACHE")
    assert torch.equal(data.tokenize(tok, text), fresh)  # made
    (entry,) = (tmp_path / "tokens").glob("*.npy")
    cached = data.tokenize(tok, text)  # read
    assert cached.dtype == torch.long and torch.equal(cached, fresh)
    other = data.tokenize(tok, text[:-1] + "!")
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2 and not torch.equal(other, fresh)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated by a crash or a full disk
    assert torch.equal(data.tokenize(tok, text), fresh)
    assert torch.equal(data.tokenize(tok, text), fresh)  # the re-made entry
    data.tokenize(tok, "short text")
    assert len(list((tmp_path / "tokens").glob("*"))) == 2  # nothing for short texts, no temp files left


def test_paired_nll_is_the_mean_difference_with_its_standard_error_and_resolved_needs_two_of_them():
    import numpy as np

    a, b = [3.0, 2.5, 4.0, 3.2], [2.9, 2.6, 3.8, 3.1]
    d = np.array(a) - np.array(b)
    mean, se = paired_nll(a, b)
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 2)
    assert resolved(-0.5, 0.2) == -1 and resolved(0.5, 0.2) == 1 and resolved(0.3, 0.2) == 0
    assert [verdict(d, 0.2) for d in (-0.5, 0.5, 0.3)] == ["better", "worse", "same within noise"]
    assert verdict(-0.5, 0.2, "OWL better", "uniform better", "not resolved") == "OWL better"
    with pytest.raises(ValueError, match="differ in number"):
        paired_nll(a, b[:3])


def test_perplexity_draws_its_bar_on_a_terminal_only(capsys):
    """By default no bar where stderr is not a terminal (a log file, CI): tqdm there writes a carriage-returned
    line per window. Asked for, it is drawn anyway. The numbers are the same either way."""
    logits = torch.log_softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    quiet = perplexity(lambda ids: logits[: ids.shape[1]], tokens, 16)
    assert capsys.readouterr().err == ""
    shown = perplexity(lambda ids: logits[: ids.shape[1]], tokens, 16, progress=True)
    assert "perplexity" in capsys.readouterr().err and shown.window_nll == quiet.window_nll


def test_write_report_appends_suffixes_to_a_dotted_stem_and_makes_the_folder(tmp_path):
    from owl_deploy.io import write_report

    write_report(tmp_path / "results" / "quality-qwen2.5-coder-1.5b", {"b": 1, "a": 2}, "# table\n")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "quality-qwen2.5-coder-1.5b.json",
        "quality-qwen2.5-coder-1.5b.md",
    ]
    assert json.loads((tmp_path / "results" / "quality-qwen2.5-coder-1.5b.json").read_text()) == {"a": 2, "b": 1}
    assert (tmp_path / "results" / "quality-qwen2.5-coder-1.5b.md").read_text() == "# table\n"
