"""WikiText-style perplexity: non-overlapping windows, remainder dropped, ppl = exp(mean token NLL).

Each window of ``seqlen`` tokens predicts its own tokens 1..seqlen-1 (the first has no context),
so a window contributes ``seqlen - 1`` NLL terms. The per-window mean NLLs are kept so that two
models can be compared with their spread: at high sparsity, differences below ≈0.05 mean NLL are
not resolved on a short evaluation (owl-method.md, "Numerics").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from owl_deploy.configs import EvalConfig
from owl_deploy.errors import OwlError, one_line

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # [1, seqlen] ids -> [seqlen, vocab] logits


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float
    nll_std_err: float  # standard error of the mean over windows
    seqlen: int
    tokens: int  # tokens in the evaluated windows (windows * seqlen)
    windows: int
    window_nll: list[float]
    seconds: float

    def to_json(self, full: bool = False) -> dict:
        out = asdict(self)
        if not full:
            out.pop("window_nll")
        return out


def window_count(n_tokens: int, seqlen: int) -> int:
    """How many non-overlapping windows of ``seqlen`` tokens ``n_tokens`` hold (at least one, or an error)."""
    if seqlen < 2:
        raise OwlError(f"seqlen must be at least 2, got {seqlen}")
    n = n_tokens // seqlen
    if n == 0:
        raise OwlError(f"the text has {n_tokens} tokens, fewer than one window of seqlen={seqlen}")
    return n


def windows_of(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``[n, seqlen]`` non-overlapping windows; the remainder is dropped."""
    n = window_count(len(tokens), seqlen)
    return tokens[: n * seqlen].view(n, seqlen)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean NLL of ``ids[1:]`` given ``logits[:-1]`` (float64 log-softmax for a stable sum)."""
    logp = F.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(1, ids[1:, None]).mean())


def paired_nll(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-window NLL difference a - b on the same windows (a paired test: the
    windows' own difficulty cancels, which resolves differences far below either perplexity's spread)."""
    if len(a) != len(b):
        raise ValueError(f"paired windows differ in number: {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def resolved(delta: float, se: float, k: float = 2.0) -> int:
    """-1 when ``delta`` is below zero by more than ``k`` standard errors, +1 above, 0 when not resolved."""
    return -1 if delta < -k * se else 1 if delta > k * se else 0


def verdict(
    delta: float,
    se: float,
    lower: str = "better",
    higher: str = "worse",
    same: str = "same within noise",
) -> str:
    """The word for :func:`resolved`'s answer (lower NLL is better), so every report says it the same way."""
    return {-1: lower, 1: higher, 0: same}[resolved(delta, se)]


def paired_reference(path: str, text: str, seqlen: int) -> dict:
    """An earlier ``owl-deploy eval --json`` result to pair against, checked before anything is scored: it must
    hold per-window NLLs of the same text and window length (only then do its windows match this run's)."""
    import json

    try:
        with open(path) as fh:
            ref = json.load(fh)
    except (OSError, ValueError) as exc:
        raise OwlError(f"--against {path}: cannot read an eval JSON ({one_line(exc)})") from exc
    if not isinstance(ref, dict) or not isinstance(ref.get("window_nll"), list) or not ref["window_nll"]:
        raise OwlError(f"--against {path}: no window_nll in it (write it with `owl-deploy eval --json > FILE`)")
    if (ref.get("text"), ref.get("seqlen")) != (text, seqlen):
        raise OwlError(
            f"--against {path}: scored on text {ref.get('text')!r} in windows of {ref.get('seqlen')} tokens, "
            f"this run on {text!r} in windows of {seqlen}: the windows would not be the same"
        )
    return ref


def paired_report(result: Perplexity, ref: dict, path: str) -> dict:
    """This run's per-window NLL minus the reference's on the same windows, with its standard error."""
    if len(ref["window_nll"]) != result.windows:
        raise OwlError(
            f"--against {path}: {len(ref['window_nll'])} windows there, {result.windows} here "
            "(use the same --max-tokens)"
        )
    delta, se = paired_nll(result.window_nll, ref["window_nll"])
    return {"against": path, "against_model": ref.get("model"), "delta_nll": delta, "se": se,
            "resolved": resolved(delta, se)}  # fmt: skip


def perplexity(logits_fn: LogitsFn, tokens: torch.Tensor, seqlen: int, progress: bool | None = None) -> Perplexity:
    """Perplexity of any model exposed as ``logits_fn`` over ``tokens`` (torch, ORT or DeepSparse). ``progress``
    None: a bar on a terminal only (a log file would get one carriage-returned line per window)."""
    start = time.perf_counter()
    wins = windows_of(tokens, seqlen)
    nlls = []
    quiet = None if progress is None else not progress  # tqdm: None = disabled where stderr is not a terminal
    for ids in tqdm(wins, desc="perplexity", unit="win", disable=quiet, leave=False):
        nlls.append(window_nll(logits_fn(ids[None]), ids))
    t = torch.tensor(nlls, dtype=torch.float64)
    mean = float(t.mean())
    stderr = float(t.std(unbiased=True) / math.sqrt(len(t))) if len(t) > 1 else float("nan")
    return Perplexity(
        perplexity=math.exp(mean),
        mean_nll=mean,
        nll_std_err=stderr,
        seqlen=seqlen,
        tokens=int(wins.numel()),
        windows=len(wins),
        window_nll=nlls,
        seconds=time.perf_counter() - start,
    )


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap a causal LM: one window at a time, no cache, no grad."""

    @torch.inference_mode()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits[0]

    return fn


def check_seqlen(model: torch.nn.Module, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (never take seqlen from the config)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise OwlError(f"seqlen {seqlen} exceeds the model's max_position_embeddings ({limit})")


def deployment_chunk(prefill_length: int | None, seqlen: int) -> int:
    """Tokens per engine call when scoring a deployment: ``prefill_length`` (default LONG_PREFILL_LENGTH), at
    most the window rounded down to a multiple of 4."""
    from owl_deploy.contract import LONG_PREFILL_LENGTH, PREFILL_RULE, prefill_length_within, valid_prefill_length

    if prefill_length is not None and not valid_prefill_length(prefill_length):
        raise OwlError(f"prefill length must be {PREFILL_RULE}, got {prefill_length}")
    return prefill_length_within(prefill_length or LONG_PREFILL_LENGTH, seqlen)


def onnx_logits_fn(session) -> LogitsFn:
    """Wrap a compiled deployment (runtime.Session): each window from an empty cache, fed in prefill chunks."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        session.reset()
        return torch.from_numpy(session.forward(ids[0].tolist()))

    return fn


def is_deployment(model_spec: str) -> bool:
    """A deployment folder (``owl-deploy export``): a folder with export.json or model.onnx."""
    from pathlib import Path

    from owl_deploy.contract import EXPORT_JSON, MODEL_ONNX

    path = Path(str(model_spec)).expanduser()
    return path.is_dir() and ((path / MODEL_ONNX).is_file() or (path / EXPORT_JSON).is_file())


def evaluate_model(
    model_spec: str,
    cfg: EvalConfig | None = None,
    engine: str = "onnxruntime",
    threads: int | None = None,
    prefill_length: int | None = None,
) -> Perplexity:
    """``owl-deploy eval``: a torch model (asset name, HF folder or .gguf) or a deployment folder
    (``owl-deploy export``), scored by ``engine`` on the exported graph itself (int8 included), fed
    ``prefill_length`` tokens per call (default 128; 1 scores with the single-token decode kernels, which
    for int8 in DeepSparse are not the multi-token ones)."""
    from owl_deploy.data import eval_tokens
    from owl_deploy.specs import load_causal_lm, load_tokenizer

    cfg = cfg or EvalConfig()
    if is_deployment(model_spec):
        from owl_deploy import runtime

        dep = runtime.open_deployment(model_spec)
        if cfg.seqlen > dep.max_sequence_length:
            raise OwlError(
                f"seqlen {cfg.seqlen} exceeds what {model_spec} can be declared to ({dep.max_sequence_length})"
            )
        tokens = eval_tokens(dep.tokenizer(), cfg.text, cfg.max_tokens)
        windows_of(tokens, cfg.seqlen)  # a text shorter than one window fails before the compile
        chunk = deployment_chunk(prefill_length, cfg.seqlen)
        # DeepSparse's internal cache holds one token fewer than its sequence length: one more slot for it
        # (or, at the positions' limit, the external cache, which holds them all)
        slots, kv = cfg.seqlen, None
        if engine == "deepsparse":
            slots, kv = (slots + 1, None) if slots < dep.max_sequence_length else (slots, "external")
        session = runtime.compile(
            dep, engine, sequence_length=slots, prefill_length=chunk, kv_cache=kv, threads=threads
        )
        return perplexity(onnx_logits_fn(session), tokens, cfg.seqlen)
    tokens = eval_tokens(load_tokenizer(model_spec), cfg.text, cfg.max_tokens)  # bad text fails before the load
    model = load_causal_lm(model_spec)
    check_seqlen(model, cfg.seqlen)
    return perplexity(torch_logits_fn(model), tokens, cfg.seqlen)
