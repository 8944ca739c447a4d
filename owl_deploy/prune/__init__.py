"""The prune stage's orchestration: calibrate block by block, allocate, prune, report.

The maths lives elsewhere and is pure: the per-layer methods in ``magnitude.py`` / ``wanda.py`` /
``sparsegpt.py`` (registered in ``methods.py``), OWL's per-block targets in ``owl_deploy.allocation``,
the report in ``report.py``. ``prune_model`` works on an in-memory model (tests use tiny random
models); ``run_prune`` is the ``owl-deploy prune`` command: load, calibrate, prune, write a Hugging
Face folder plus ``sparsity.json`` atomically (a failure leaves no output folder). "ref" is owl-method.md.

Design decisions:
- OWL ratios come from a separate **dense** sequential pass, as in the reference: block l's ratio uses
  the dense model's own inputs to block l, not the already-pruned stream. That pass is one forward of
  the model with hooks, about half of Wanda's cost (two forwards), so by default it runs on the first
  ``owl.nsamples = 8`` calibration windows only, which moves the allocated sparsities far less than
  lambda spreads them (measured in docs/results.md). ``owl.nsamples = None`` (CLI ``--owl-nsamples all``)
  uses every window, exactly the reference.
- Bounds: a block's sparsity is clipped to [0, 0.99] and the others re-centred so the unweighted mean
  stays the target (allocation.owl_sparsities); impossible targets raise OwlError.
- N:M with OWL: per-block N from allocation.owl_nm (ref item 7); the global mean is then not
  guaranteed, and the report says what it is.
- ``compute_dtype`` ``auto`` (the default) runs the calibration forwards under bf16 CPU autocast where the
  CPU has AMX, or AVX512-BF16 on an AMD CPU (calibrate.resolve_dtype: a Xeon with AVX512-BF16 alone is slower),
  float32 elsewhere; statistics stay float64 and weights float32. On an AMX Xeon it is 2.2-2.4x faster and
  moves perplexity within noise at 50% (0.27% of the mask differs; docs/results.md, "Status in detail"); ``float32``
  reproduces the reference's arithmetic.
- Per-layer ablation (``granularity="layer"``): one outlier ratio per linear and the allocation spread
  over all linears of the model; the linears' sparsities are then shifted by one common amount so the
  parameter-weighted mean (the measured global sparsity) stays the target.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from owl_deploy import memory
from owl_deploy.allocation import allocate, outlier_ratio
from owl_deploy.calibrate import SequentialRunner, autocast_dtype, resolve_dtype
from owl_deploy.configs import CalibrationConfig, OwlConfig, PruneConfig
from owl_deploy.errors import OwlError
from owl_deploy.lazy import Resident, Streamed
from owl_deploy.model import block_linears, blocks_prefix, decoder_blocks
from owl_deploy.prune.methods import METHODS
from owl_deploy.prune.report import sparsity_report, zero_counts
from owl_deploy.prune.wanda import wanda_scores
from owl_deploy.versions import cpu_record


def needs_calibration(prune: PruneConfig) -> bool:
    return METHODS[prune.method].needs_calibration or prune.allocation != "uniform"


def owl_windows(owl: OwlConfig, nsamples: int) -> int:
    """Windows of the dense OWL pass: the first min(owl.nsamples, nsamples), or all of them."""
    return nsamples if owl.nsamples is None else min(owl.nsamples, nsamples)


def block_ratios(
    model: nn.Module,
    ids: torch.Tensor,
    prune: PruneConfig,
    owl: OwlConfig,
    progress: bool,
    store: Resident | Streamed | None = None,
) -> tuple[list[float], list[dict[str, float]]]:
    """Dense sequential pass: each block's pooled outlier ratio and each linear's own ratio (ref 1-3)."""
    store = store or Resident()
    with store.outside():
        runner = SequentialRunner(model, ids, prune.batch_size, autocast_dtype(prune.compute_dtype))
    blocks = runner.blocks
    ratios: list[float] = []
    layer_ratios: list[dict[str, float]] = []
    for i in tqdm(range(len(blocks)), desc="OWL dense pass", disable=not progress, leave=False):
        store.load(i)
        stats = runner.collect(i, advance=i < len(blocks) - 1)
        scores = {name: wanda_scores(lin.weight, stats[name].sq_norm) for name, lin in block_linears(blocks[i]).items()}
        store.release(i)
        ratios.append(outlier_ratio(list(scores.values()), owl.m))
        layer_ratios.append(
            {name: outlier_ratio([a], owl.m) for name, a in scores.items()} if prune.granularity == "layer" else {}
        )
        del scores
    return ratios, layer_ratios


def _check_nm_shapes(linears: list[dict[str, nn.Linear]], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for i, block in enumerate(linears):
        for name, lin in block.items():
            if lin.in_features % nm[1]:
                raise OwlError(
                    f"N:M {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}; "
                    f"block {i} {name} has {lin.in_features}"
                )


def prune_model(
    model: nn.Module,
    prune: PruneConfig,
    owl: OwlConfig | None = None,
    calib_ids: torch.Tensor | None = None,
    progress: bool | None = None,
    ratios: tuple[list[float], list[dict[str, float]]] | None = None,
    store: Resident | Streamed | None = None,
) -> dict:
    """Prune ``model`` in place and return the report (sparsity.json without the I/O parts).

    ``calib_ids`` ([nsamples, seqlen] token ids) is required when the method or the allocation needs
    calibration. Timings are in ``report["timings"]`` (seconds per phase), the only non-deterministic part.
    ``ratios`` lets a caller that prunes the same dense model many times (the quality study) pass the
    output of :func:`block_ratios` computed once, instead of repeating the dense pass.
    ``store`` (a :class:`~owl_deploy.lazy.Streamed`) holds one block's weights at a time and writes each
    pruned block out; by default the model is in memory.
    """
    owl = owl or OwlConfig()
    store = store or Resident()
    if progress is None:
        progress = sys.stderr.isatty()
    method = METHODS[prune.method]
    blocks = decoder_blocks(model)
    linears = [block_linears(b) for b in blocks]
    _check_nm_shapes(linears, prune.nm_pair)
    if needs_calibration(prune) and (calib_ids is None or calib_ids.dim() != 2):
        raise OwlError(f"{prune.method} with {prune.allocation} allocation needs [nsamples, seqlen] calibration ids")
    timings: dict[str, float] = {}

    # 1. allocation (OWL ratios from a dense sequential pass, ref items 1-4)
    t0 = time.perf_counter()
    layer_ratios = None
    windows = 0
    if prune.allocation != "uniform":
        assert calib_ids is not None
        windows = owl_windows(owl, len(calib_ids))
        ratios, layer_ratios = ratios or block_ratios(model, calib_ids[:windows], prune, owl, progress, store)
    names = [list(d) for d in linears]
    sizes = [[lin.weight.numel() for lin in d.values()] for d in linears]
    targets = allocate(
        names,
        sizes,
        prune.target_sparsity,
        prune.nm_pair,
        prune.allocation,
        owl.lambda_,
        block_ratios=ratios,
        layer_ratios=[list(d.values()) for d in layer_ratios]
        if prune.granularity == "layer" and layer_ratios
        else None,
    )
    timings["owl_ratios"] = time.perf_counter() - t0

    # 2. pruning pass: hooks -> prune -> re-run the pruned block for the next block's inputs
    t0 = time.perf_counter()
    runner = None
    if method.needs_calibration:
        with store.outside():
            runner = SequentialRunner(model, calib_ids, prune.batch_size, autocast_dtype(prune.compute_dtype))
    counts = []
    io = mask = 0.0  # seconds reading/writing blocks (streamed) and computing + applying the masks
    for i in tqdm(range(len(blocks)), desc=f"pruning ({prune.method})", disable=not progress, leave=False):
        t = time.perf_counter()
        store.load(i)
        io += time.perf_counter() - t
        stats = runner.collect(i, hessian=method.needs_hessian) if runner is not None else {}
        t = time.perf_counter()
        for name, lin in linears[i].items():
            tgt = targets[i][name]
            method.prune(lin, stats.get(name), tgt.sparsity, tgt.nm)
        mask += time.perf_counter() - t
        del stats
        counts.append(zero_counts(linears[i]))
        if runner is not None and i < len(blocks) - 1:
            runner.advance(i)
        t = time.perf_counter()
        store.finish(i)
        io += time.perf_counter() - t
    timings["prune"] = time.perf_counter() - t0
    # the pruning pass split: block forwards, hook statistics, masks, block I/O (the rest: bookkeeping)
    if runner is not None:
        timings.update({f"prune_{k}": v for k, v in runner.seconds.items()})
    timings.update(prune_mask=mask, prune_io=io)
    del runner

    report = sparsity_report(prune, owl, counts, targets, ratios, layer_ratios, windows)
    report["structure"] = {
        "model_class": type(model).__name__,
        "blocks_prefix": blocks_prefix(model),
        "n_blocks": len(blocks),
        "linears_per_block": list(linears[0]),
    }
    report["compute_dtype"] = resolve_dtype(prune.compute_dtype)
    report["timings"] = timings
    report["machine"] = cpu_record(torch.get_num_threads())  # the timings' CPU: bf16 pays on some, not others
    return report


def _block_store(src: Path) -> tuple[Streamed | None, str]:
    """A store that reads ``src`` block by block, or None (and why) when it must be loaded whole."""
    if not src.is_dir():
        return None, "whole model (a .gguf is dequantized as a whole)"
    try:
        return Streamed(src), "block by block"
    except OwlError as exc:
        return None, f"whole model ({exc})"


def run_prune(
    model_spec: str,
    out: Path,
    prune: PruneConfig,
    owl: OwlConfig | None = None,
    calibration: CalibrationConfig | None = None,
    tune: dict | None = None,
    max_memory: memory.Limit = None,
) -> dict:
    """The ``prune`` command: load, calibrate, prune, and write ``out`` (HF folder + sparsity.json).
    ``tune``: the tune stage's decision (choice, reason), recorded in sparsity.json so the allocation used —
    uniform when the guard fell back — is explained where the model is.

    Everything that can fail is checked before ``out`` is touched, and ``out`` itself is written through
    ``atomic_dir``: a failure at any point leaves no output folder (an existing one is left as it was).
    A safetensors folder is pruned block by block (``owl_deploy.lazy``): one block's weights are resident at a
    time and each is written to the output as it finishes; a .gguf (or a checkpoint whose names transformers
    would rewrite on load) is loaded whole. ``sparsity.json`` says which (``loading``).
    """
    from owl_deploy.data import calibration_windows
    from owl_deploy.io import atomic_dir, write_json
    from owl_deploy.model import save_model, save_tokenizer
    from owl_deploy.specs import load_model, load_tokenizer, resolve_model
    from owl_deploy.versions import package_versions

    owl = owl or OwlConfig()
    calibration = calibration or CalibrationConfig()
    t_start = time.perf_counter()
    out = Path(out)
    src = resolve_model(model_spec)
    src_dir = src if src.is_dir() else src.parent
    if out.resolve() == src_dir.resolve():
        raise OwlError(f"--out {out} is the model's own folder; choose another")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "sparsity.json").is_file())):
        # replacing a previous prune output is fine; silently replacing anything else is not
        raise OwlError(f"--out {out} exists and is not an earlier prune output; remove it or choose another")
    timings: dict[str, float] = {}
    calibrated = needs_calibration(prune)

    t0 = time.perf_counter()
    store, loading = _block_store(src)
    shape = memory.model_shape(src)
    if shape is not None:
        windows = calibration.nsamples if calibrated else 0
        hessian = prune.method == "sparsegpt"
        args = (shape, windows, calibration.seqlen, prune.batch_size, hessian)
        memory.check(memory.prune_estimate(*args, streamed=store is not None), max_memory)
    if store is not None:
        model, tokenizer = store.model, load_tokenizer(src)
    else:
        model, tokenizer = load_model(src)
    decoder_blocks(model)  # fail early on a model without recognisable decoder blocks
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if calibrated and isinstance(max_pos, int) and calibration.seqlen > max_pos:
        raise OwlError(f"seqlen {calibration.seqlen} exceeds the model's max_position_embeddings ({max_pos})")
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids = None
    if calibrated:
        c = calibration
        ids = calibration_windows(tokenizer, c.text, c.nsamples, c.seqlen, c.seed)
    timings["calibration_data"] = time.perf_counter() - t0

    with atomic_dir(out) as tmp:
        if store is not None:
            store.out = tmp  # each pruned block is written as it finishes
        report = prune_model(model, prune, owl, ids, store=store)
        timings.update(report.pop("timings"))
        t0 = time.perf_counter()
        if store is not None:
            store.write_rest()
            save_tokenizer(tokenizer, tmp)
        else:
            model.config.use_cache = True  # load_model turned the KV cache off for calibration only
            save_model(model, tokenizer, tmp)
        timings["save"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        report.update(
            model=str(model_spec),
            calibration={**calibration.to_json(), "used": calibrated},
            config={"prune": prune.to_json(), "owl": owl.to_json()},
            **({"tune": tune} if tune is not None else {}),
            loading=loading,
            versions=package_versions(("torch", "transformers")),
            timings=timings,
            peak_rss_mb=memory.peak_rss_mb(),
        )
        write_json(tmp / "sparsity.json", report)
    return report
