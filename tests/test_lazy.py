"""Pruning block by block from the safetensors folder (owl_deploy.lazy): the same result as a whole-model
prune, on every architecture family and method, with one block's weights resident at a time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, calib_ids, save_tiny

from owl_deploy.configs import OwlConfig, PruneConfig
from owl_deploy.errors import OwlError
from owl_deploy.lazy import INDEX, Streamed
from owl_deploy.model import block_linears, decoder_blocks, load_causal_lm
from owl_deploy.prune import prune_model


def _weights(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "method,allocation", [("wanda", "owl"), ("sparsegpt", "owl"), ("magnitude", "uniform"), ("wanda", "owl-inverse")]
)
def test_streamed_prune_equals_whole_model_prune(family, method, allocation, tmp_path):
    """Same report, same tensors bit for bit, and the written folder loads to the whole-model result
    (tied output embeddings included: Qwen3 and Gemma3's tiny configs tie them)."""
    src = save_tiny(family, tmp_path / "src")
    ids = calib_ids(8, 32)
    prune = PruneConfig(method=method, allocation=allocation, sparsity=0.6, batch_size=4)
    whole = load_causal_lm(src)
    expected = prune_model(whole, prune, OwlConfig(), ids, progress=False)

    out = tmp_path / "out"
    out.mkdir()
    store = Streamed(src, out)
    got = prune_model(store.model, prune, OwlConfig(), ids, progress=False, store=store)
    store.write_rest()
    expected.pop("timings"), got.pop("timings")
    assert got == expected
    state = whole.state_dict()
    written = _weights(out)
    assert set(written) == set(load_file(src / "model.safetensors"))  # the source's own tensor names
    assert all(torch.equal(t, state[k]) for k, t in written.items())
    reloaded = load_causal_lm(out).state_dict()
    assert all(torch.equal(reloaded[k], t) for k, t in state.items())
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())


def test_one_block_resident_at_a_time(tmp_path):
    """While the runner works on block i, every other block's weights are on the meta device; the
    embeddings are real only during the captures, and the output embeddings are never read."""
    src = save_tiny("llama", tmp_path / "src", layers=4)
    store = Streamed(src)
    blocks = decoder_blocks(store.model)
    seen: list[list[int]] = []
    loaded_outside: list[bool] = []

    def resident() -> list[int]:
        return [i for i, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())]

    load, outside = store.load, store.outside

    def watch_load(i):
        load(i)
        seen.append(resident())

    def watch_outside():
        loaded_outside.append(store.model.get_input_embeddings().weight.device.type != "meta")
        return outside()

    store.load, store.outside = watch_load, watch_outside
    prune_model(store.model, PruneConfig(sparsity=0.5), OwlConfig(), calib_ids(8, 32), progress=False, store=store)
    assert seen == [[i] for i in range(4)] * 2  # the OWL dense pass, then the pruning pass
    assert resident() == [] and loaded_outside == [False, False]
    assert store.model.get_input_embeddings().weight.device.type == "meta"
    assert store.model.get_output_embeddings().weight.device.type == "meta"
    assert all(p.device.type == "meta" for b in blocks for lin in block_linears(b).values() for p in lin.parameters())


def test_a_checkpoint_with_foreign_names_is_not_streamed(tmp_path):
    """Names transformers would rewrite or reject on load: refused here (the prune stage then loads it whole)."""
    src = save_tiny("llama", tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OwlError, match="cannot be read block by block: 1 checkpoint tensors the model does not have"):
        Streamed(src)
    del tensors["model.layers.0.extra.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OwlError, match="1 weights not in the checkpoint"):
        Streamed(src)


def test_bf16_checkpoint_is_read_as_fp32(tmp_path):
    """A bf16 checkpoint is widened to fp32 exactly as a whole-model fp32 load widens it."""
    src = save_tiny("qwen2", tmp_path / "src")
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    store = Streamed(src)
    store.load(1)
    block = dict(decoder_blocks(store.model)[1].named_parameters())
    whole = dict(decoder_blocks(load_causal_lm(src))[1].named_parameters())
    assert all(p.dtype == torch.float32 and torch.equal(p, whole[n]) for n, p in block.items())


def test_truncated_checkpoint_is_refused_before_anything_is_written(tmp_path):
    from click.testing import CliRunner

    from owl_deploy.cli import main

    src = save_tiny("llama", tmp_path / "src")
    blob = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(OwlError, match="is truncated"):
        Streamed(src)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune", "--model", str(src), "--method", "magnitude", "--allocation", "uniform",
                                    "--sparsity", "0.5", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "cannot load model" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
