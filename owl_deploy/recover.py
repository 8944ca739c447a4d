"""Recover: a short fine-tune that wins back quality pruning cost, keeping every zero (deployable by construction).

LoRA (PEFT) trains low-rank adapters on the block linears with next-token cross-entropy on calibration text
(never the evaluation text), optionally plus a KL to the dense teacher's logits; early stopping watches the
held-out tail of the calibration sources. At the end the adapters are merged into the weights and the pruning
mask is applied again, so the result holds exactly the pruned model's zeros (``export``'s zero proof passes
unchanged); both the adapter model's and the merged, re-masked model's perplexity are reported, and only
the second is what deploys. ``masked-lora`` masks the adapters' update while it trains
(owl_deploy.masked_lora), so the trained model and the deployed one are the same function. ``masked`` trains
the block linears themselves with the gradients of pruned entries zeroed (small models: it needs the
optimizer state of every weight).

Checkpoints (trainable tensors, optimizer, step, curve) are written every ``eval_every`` steps next to the
output; a re-run with the same settings after a kill resumes from the last one.

Memory (issue 18): LoRA in bf16 autocast keeps the frozen block linears in bf16 while it trains. Autocast
multiplies them in bf16 anyway, so the forward and backward are the same numbers as with fp32 storage, but the
fp32 copy and the bf16 copy autocast saved for the backward pass of every linear are gone (on the 1.5B model
about 5 GB of the 18 GB peak). The adapters are made on the fp32 weights (their init is not rounded), and
the adapter perplexity and the merge use the fp32 weights read back from the pruned folder. A distillation
teacher's linears are held in bf16 under bf16 autocast for the same reason (the same logits, half the memory).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from owl_deploy import masked_lora, memory
from owl_deploy.calibrate import resolve_dtype
from owl_deploy.configs import ADAPTER_METHODS, CalibrationConfig, EvalConfig, RecoverConfig
from owl_deploy.errors import OwlError
from owl_deploy.io import atomic_dir, atomic_file, exclusive, write_json
from owl_deploy.model import named_block_linears
from owl_deploy.versions import cpu_record

CHECKPOINT = "checkpoint.pt"


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The pruning mask (True = a zero to keep) of every block linear, by module name."""
    return {name: lin.weight.detach() == 0 for name, lin in named_block_linears(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, lin in named_block_linears(model).items():
        lin.weight.masked_fill_(masks[name], 0.0)


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def _loss(model, batch: torch.Tensor, cfg: RecoverConfig, teacher=None) -> torch.Tensor:
    """Next-token cross-entropy, plus ``distill`` x KL(teacher || student) at ``temperature`` when a teacher is
    given (Hinton's T^2 scaling keeps the gradient scale)."""
    with _autocast(cfg.compute_dtype):
        logits = model(input_ids=batch, use_cache=False).logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    if teacher is None or cfg.distill == 0:
        return ce
    with torch.no_grad(), _autocast(cfg.compute_dtype):
        t_logits = teacher(input_ids=batch, use_cache=False).logits.float()
    t = cfg.temperature
    kl = F.kl_div(
        F.log_softmax(logits / t, -1).flatten(0, 1), F.log_softmax(t_logits / t, -1).flatten(0, 1), log_target=True,
        reduction="batchmean",
    ) * (t * t)  # fmt: skip
    return (1 - cfg.distill) * ce + cfg.distill * kl


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, cfg: RecoverConfig) -> float:
    model.eval()
    losses = [float(_loss(model, w[None], cfg)) for w in windows]
    model.train()
    return sum(losses) / len(losses)


def _lr(step: int, cfg: RecoverConfig) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to 10%."""
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _trainable(model, cfg: RecoverConfig, masks: dict[str, torch.Tensor]):
    """Wrap or unfreeze the model for ``cfg.method``; returns (model, the trainable parameters by name)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = sorted(named_block_linears(model))
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0, bias="none")
        with warnings.catch_warnings():  # PEFT reads a property transformers deprecated: nothing a user can act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, lora)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    elif cfg.method == "masked-lora":
        params = masked_lora.add_masked_adapters(model, masks, cfg.rank, cfg.alpha)
    else:
        params = {}
        for name, lin in named_block_linears(model).items():
            lin.weight.requires_grad_(True)
            keep = ~masks[name]
            lin.weight.register_hook(lambda g, keep=keep: g * keep)  # pruned entries never move
            params[f"{name}.weight"] = lin.weight
    if cfg.norms:
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales and biases: by shape, whatever the architecture names them
                p.data = p.data.clone()  # off a mapped checkpoint file: the optimizer writes in place
                params[name] = p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return model, params


def lean(cfg: RecoverConfig) -> bool:
    """Train on bf16 frozen weights: LoRA or masked LoRA under bf16 autocast (the only cases where that changes
    no number)."""
    return cfg.method in ADAPTER_METHODS and cfg.compute_dtype == "bfloat16"


def _frozen_bf16(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().to(torch.bfloat16), requires_grad=False)


@torch.no_grad()
def _frozen_to_bf16(model) -> int:
    """The LoRA-wrapped (or masked-LoRA parametrized) linears' frozen weights in bf16, what autocast multiplies;
    their biases (small) stay fp32 and autocast casts them per call. Returns the count."""
    n = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear) and base.weight.dtype == torch.float32:
            base.weight = _frozen_bf16(base.weight)
            n += 1
    for lin in masked_lora.masked_linears(model):
        plist = lin.parametrizations.weight
        if plist.original.dtype == torch.float32:
            plist.original = _frozen_bf16(plist.original)
            n += 1
    return n


@torch.no_grad()
def release_checkpoint(model: nn.Module) -> int:
    """Copy the frozen fp32 tensors still backed by the checkpoint file into the process's own memory, so the
    file's mapping (the whole fp32 model, in RSS once read) is released once the bf16 copies replace the block
    linears. Measured on SmolLM2: 518 MB of mapped checkpoint -> 113 MB. The same values; returns the count."""
    n = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.clone()
                n += 1
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dtype == torch.float32:
                module._buffers[name] = b.clone()
                n += 1
    gc.collect()
    return n


@torch.no_grad()
def teacher_to_bf16(teacher: nn.Module) -> int:
    """The teacher's linears (weights and biases) in bf16: under bf16 autocast every ``linear`` multiplies bf16
    casts of them anyway, so its logits are the same bits with about half its memory (the 1.5B teacher: 7.1 ->
    about 4 GB). Norms and embeddings, which autocast leaves in fp32, stay fp32. Returns the count."""
    teacher.requires_grad_(False)  # frozen, so release_checkpoint copies its norms and embeddings off the file
    n = 0
    for module in teacher.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
            module.weight = _frozen_bf16(module.weight)
            if module.bias is not None:
                module.bias = _frozen_bf16(module.bias)
            n += 1
    release_checkpoint(teacher)
    return n


def _settings_key(cfg: RecoverConfig, model_dir: Path, calibration: CalibrationConfig, teacher: Path | None) -> str:
    blob = json.dumps({"cfg": cfg.to_json(), "cal": calibration.to_json(), "model": str(model_dir),
                       "teacher": str(teacher)}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recover_model(
    model,
    windows: torch.Tensor,
    heldout: torch.Tensor,
    cfg: RecoverConfig,
    teacher=None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    bf16_frozen: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune ``model`` (pruned, in place) on ``windows`` [n, seqlen]; returns (the trained model — a PEFT
    wrapper for LoRA —, the training record). Resumes from ``checkpoint_dir`` when it holds a checkpoint.
    ``bf16_frozen`` (LoRA in bf16 only): the frozen linears are stored in bf16 while training, so the returned
    model must get its fp32 weights back (:func:`fp32_again`) before it is scored or merged. ``log`` gets one line
    per held-out evaluation (where no progress bar is drawn: a log file, CI)."""
    if len(windows) < cfg.steps * cfg.batch_size:
        raise OwlError(f"{cfg.steps} steps x {cfg.batch_size} windows need {cfg.steps * cfg.batch_size} windows")
    cfg = cfg.model_copy(update={"compute_dtype": resolve_dtype(cfg.compute_dtype)})
    torch.manual_seed(cfg.seed)
    masks = masks_of(model)
    model, params = _trainable(model, cfg, masks)
    if bf16_frozen and lean(cfg):
        _frozen_to_bf16(model)
        del masks  # a LoRA run needs the masks only for the merge, which reads them from the fp32 weights again
        release_checkpoint(model)
    model.train()
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    record = {"curve": [], "evals": [], "best": None, "stopped_early": False, "resumed_from": None}
    start, best_state, waited = 0, None, 0
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved["params"][n])
        opt.load_state_dict(saved["optimizer"])
        start, record, best_state, waited = saved["step"], saved["record"], saved["best_state"], saved["waited"]
        record["resumed_from"] = start
        if log is not None:
            log(f"recover: resumed from the checkpoint at step {start}/{cfg.steps}")
    if start == 0:  # the pruned model's own held-out loss: where the curve starts
        record["evals"].append({"step": 0, "heldout_loss": round(heldout_loss(model, heldout, cfg), 5)})
    bar = tqdm(range(start, cfg.steps), desc=f"recover ({cfg.method})", disable=not progress, initial=start,
               total=cfg.steps)  # fmt: skip
    t0 = time.perf_counter()
    tokens = 0
    step = start
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        batch = windows[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        loss = _loss(model, batch, cfg, teacher)
        loss.backward()
        loss = loss.item()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.method == "masked":
            apply_masks(model, masks)  # exact zeros, whatever the optimizer's arithmetic did
        tokens += batch.numel()
        rate = tokens / (time.perf_counter() - t0)
        record["curve"].append({"step": step + 1, "loss": round(loss, 5), "tokens_per_s": round(rate, 1)})
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held = heldout_loss(model, heldout, cfg)
            record["evals"].append({"step": step + 1, "heldout_loss": round(held, 5)})
            if record["best"] is None or held < record["best"]["heldout_loss"]:
                record["best"] = {"step": step + 1, "heldout_loss": held}
                best_state = {n: p.detach().clone() for n, p in params.items()}
                waited = 0
            else:
                waited += 1
            if log is not None:
                left = (cfg.steps - step - 1) * (time.perf_counter() - t0) / (step + 1 - start) / 60
                best = " (best)" if waited == 0 else ""
                log(f"recover: step {step + 1}/{cfg.steps}, loss {loss:.3f}, held-out {held:.4f}{best}, "
                    f"{rate:.0f} tok/s, about {left:.0f} min left")  # fmt: skip
            if ckpt is not None:
                _save_checkpoint(ckpt, params, opt, step + 1, record, best_state, waited)
            if waited >= cfg.patience:
                record["stopped_early"] = True
                break
    if best_state is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best_state[n])
    record["steps_run"] = len(record["curve"])
    record["train_seconds"] = round(time.perf_counter() - t0, 2)
    model.eval()
    return model, record


def _save_checkpoint(path: Path, params, opt, step: int, record: dict, best_state, waited: int) -> None:
    """Serialise in memory, then write atomically: torch.save straight to a file turns a full disk into a
    RuntimeError and leaves a torn file; a plain write gives an OSError and no file."""
    buf = io.BytesIO()
    torch.save(
        {"params": {n: p.detach() for n, p in params.items()}, "optimizer": opt.state_dict(), "step": step,
         "record": record, "best_state": best_state, "waited": waited},
        buf,
    )  # fmt: skip
    with atomic_file(path, "wb") as fh:
        fh.write(buf.getbuffer())


def adapters_of(model) -> dict[str, torch.Tensor]:
    """The trained tensors of a LoRA model, by name (copies: the model can then be freed)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fp32_again(trained: dict[str, torch.Tensor], src: Path, cfg: RecoverConfig) -> tuple[nn.Module, dict]:
    """The ``trained`` adapters on the pruned model's fp32 weights, read back from ``src`` (after a lean run),
    and that model's masks."""
    from owl_deploy.specs import load_model

    base, _ = load_model(src)
    masks = masks_of(base)
    model, params = _trainable(base, cfg, masks)
    if set(params) != set(trained):
        raise OwlError("internal: the adapters do not match the reloaded model")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(trained[n])
    model.eval()
    return model, masks


def merge(model, masks: dict[str, torch.Tensor]):
    """The deployable model: adapters merged into the weights, then the pruning mask applied again."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    masked_lora.merge_masked(model)
    apply_masks(model, masks)
    return model


def run_recover(
    model_spec: str,
    out: Path,
    cfg: RecoverConfig,
    calibration: CalibrationConfig | None = None,
    evaluate: EvalConfig | None = None,
    teacher_spec: str | None = None,
    max_memory: memory.Limit = None,
) -> dict:
    """``owl-deploy recover``: train, merge, re-mask, check the zeros, score, write ``out`` (HF folder +
    recover.json) atomically; checkpoints beside ``out`` make a killed run resumable. One run per ``out`` at a
    time: a second would resume from the first's checkpoints and overwrite them while it trains."""
    out = Path(out)
    lock = out.parent / f".{out.name}.recover.lock"
    busy = f"another `owl-deploy recover` is writing {out} (it holds {lock}); let it finish or choose another --out"
    with exclusive(lock, busy):
        return _recover(model_spec, out, cfg, calibration, evaluate, teacher_spec, max_memory)


def _recover(
    model_spec: str,
    out: Path,
    cfg: RecoverConfig,
    calibration: CalibrationConfig | None,
    evaluate: EvalConfig | None,
    teacher_spec: str | None,
    max_memory: memory.Limit,
) -> dict:
    import shutil
    import sys

    from owl_deploy.data import calibration_windows, eval_tokens, heldout_tokens
    from owl_deploy.evaluate import perplexity, torch_logits_fn
    from owl_deploy.model import save_model
    from owl_deploy.specs import load_model, resolve_model

    calibration = calibration or CalibrationConfig()
    requested = cfg.compute_dtype
    cfg = cfg.model_copy(update={"compute_dtype": resolve_dtype(requested)})
    if cfg.distill > 0 and teacher_spec is None:
        raise OwlError("distill > 0 needs a dense teacher (--teacher)")
    t_start = time.perf_counter()
    src = resolve_model(model_spec)
    out = Path(out)
    if out.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise OwlError(f"--out {out} is the model's own folder; choose another")
    shape = memory.model_shape(src)
    if shape is not None:
        bf16 = cfg.compute_dtype == "bfloat16"
        args = (cfg.batch_size, cfg.seqlen, cfg.method, bf16, teacher_spec is not None, cfg.gradient_checkpointing)
        # a lean run's own estimate: 12,135 MiB for the 1.5B model against a 12,308 MiB peak in an 8-step run once
        # the checkpoint's mapping is released (release_checkpoint; 16.0 GiB while the mapping stayed)
        memory.check(memory.recover_estimate(shape, *args, lean=lean(cfg)), max_memory)
    model, tokenizer = load_model(src)
    masks = masks_of(model)
    zeros_before = int(sum(m.sum() for m in masks.values()))
    if zeros_before == 0:
        raise OwlError(f"{src} has no zero weights in its block linears: recover fine-tunes a pruned model")
    teacher = load_model(teacher_spec)[0] if teacher_spec is not None else None
    if teacher is not None and cfg.compute_dtype == "bfloat16":
        teacher_to_bf16(teacher)
    n = cfg.steps * cfg.batch_size
    windows = calibration_windows(tokenizer, calibration.text, n, cfg.seqlen, cfg.seed, cfg.mix)
    held = heldout_tokens(tokenizer, calibration.text, cfg.heldout_tokens, cfg.seqlen)
    held_windows = held.view(-1, cfg.seqlen)  # whole windows, every source in turn (an error when none fit)
    # the evaluation text when asked (the CLI); the held-out calibration windows otherwise (a pipeline's evaluate
    # stage scores the deployed model on the evaluation text itself)
    if evaluate is not None:
        ev, ev_seqlen = eval_tokens(tokenizer, evaluate.text, evaluate.max_tokens), evaluate.seqlen
    else:
        ev, ev_seqlen = held_windows.flatten(), cfg.seqlen
    pruned_ppl = perplexity(torch_logits_fn(model), ev, ev_seqlen, progress=False)
    key = _settings_key(cfg, src, calibration, Path(teacher_spec) if teacher_spec else None)
    ckpt_dir = out.parent / f".{out.name}.recover-{key}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if lean(cfg):
        del masks  # read again from the fp32 weights after training
    tty = sys.stderr.isatty()
    model, record = recover_model(
        model, windows, held_windows, cfg, teacher, ckpt_dir, tty, bf16_frozen=lean(cfg),
        log=None if tty else lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    del teacher  # not needed for the merge; the merge phase's memory is the fp32 model and two mask sets
    if lean(cfg):  # free the bf16 model before the fp32 one is read back
        trained = adapters_of(model)
        del model
        gc.collect()
        model, masks = fp32_again(trained, src, cfg)
    adapter_ppl = perplexity(torch_logits_fn(model), ev, ev_seqlen, progress=False)
    merged = merge(model, masks)
    after = masks_of(merged)
    zeros_after = int(sum(m.sum() for m in after.values()))
    identical = all(torch.equal(masks[k], after[k]) for k in masks)
    merged_ppl = perplexity(torch_logits_fn(merged), ev, ev_seqlen, progress=False)
    report = {
        "model": str(model_spec),
        "teacher": teacher_spec,
        "settings": cfg.to_json(),
        "compute_dtype_requested": requested,
        "frozen_weights": "bfloat16" if lean(cfg) else "float32",
        "calibration": calibration.to_json(),
        "perplexity_text": evaluate.text if evaluate is not None else "held-out calibration windows",
        **record,
        "zeros": {"pruned": zeros_before, "recovered": zeros_after, "identical_mask": identical},
        "perplexity": {
            "pruned": pruned_ppl.perplexity,
            "adapter": adapter_ppl.perplexity,
            "merged_remasked": merged_ppl.perplexity,
        },
        "window_nll": {"pruned": pruned_ppl.window_nll, "merged_remasked": merged_ppl.window_nll},
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_mb": memory.peak_rss_mb(),
        "machine": cpu_record(torch.get_num_threads()),  # bf16's speed differs between CPUs of the same name
    }
    if not identical:
        raise OwlError("internal: the recovered model's zeros differ from the pruned model's")
    with atomic_dir(out) as tmp:
        merged.config.use_cache = True
        save_model(merged, tokenizer, tmp)
        folder = src if src.is_dir() else src.parent
        if (folder / "sparsity.json").is_file():
            shutil.copy2(folder / "sparsity.json", tmp / "sparsity.json")
        write_json(tmp / "recover.json", report)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return report
