"""Text → tokens: the evaluation stream and the seeded calibration sampler.

A text spec is an asset name (``wiki``), a path to a UTF-8 ``.txt`` (used as is) or ``.jsonl``
file (``{"text": ...}`` per line, documents joined with a blank line), or several of these joined
with ``+`` (``news+austen+jargon``, each tokenized on its own and sampled in proportion to its
length). Evaluation and calibration text are kept apart: evaluate on ``wiki``, calibrate on the
mix of the others, as the paper calibrates on C4 and evaluates on WikiText.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from owl_deploy.configs import DEFAULT_EVAL, SOURCE_MIXES
from owl_deploy.errors import OwlError


def load_text(spec: str) -> str:
    """The documents of one text spec, joined with a blank line ("\\n\\n")."""
    from owl_deploy.specs import resolve_text

    parts = [p.strip() for p in str(spec).split("+")]
    if len(parts) > 1:
        return "\n\n".join(load_text(p) for p in parts)
    path = resolve_text(parts[0])
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OwlError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise OwlError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from exc
            if not isinstance(doc, str):
                raise OwlError(f"{path}:{lineno}: 'text' must be a string")
            docs.append(doc)
        raw = "\n\n".join(docs)
    if not raw.strip():
        raise OwlError(f"text {path} is empty")
    return raw


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once, without special tokens (WikiText protocol), as a 1-D int64 tensor.

    Long texts are cached by content (see :func:`_cache_path`): the calibration sources take 4-5 s to
    tokenize on every prune, a tenth of a SmolLM2 prune in bf16, for the same tokens each time."""
    path = _cache_path(tokenizer, text)
    if path is not None and path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError):
            pass  # a damaged entry is re-made below
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.long)
    if path is not None:
        _store(path, tokens)
    return tokens


#: texts shorter than this are tokenized every time (milliseconds; not worth a file)
_CACHE_MIN_CHARS = 100_000


def _cache_path(tokenizer, text: str) -> Path | None:
    """``$OWL_DEPLOY_HOME/tokens/<sha256>.npy``, keyed by the text, the whole serialized tokenizer (vocabulary,
    merges, normalizer, pre-tokenizer) and the tokenizers version; None for short texts, slow tokenizers or
    ``OWL_DEPLOY_TOKEN_CACHE=0``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if len(text) < _CACHE_MIN_CHARS or backend is None or os.environ.get("OWL_DEPLOY_TOKEN_CACHE") == "0":
        return None
    import tokenizers

    from owl_deploy.assets import home

    key = hashlib.sha256()
    for part in (f"v1 tokenizers {tokenizers.__version__}", backend.to_str(), text):
        key.update(part.encode("utf-8", "surrogatepass"))
        key.update(b"\0")
    return home() / "tokens" / f"{key.hexdigest()}.npy"


def _store(path: Path, tokens: torch.Tensor) -> None:
    """Write atomically (a reader never sees half a file); a read-only or full disk only costs the cache."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tok-", suffix=".npy", delete=False) as f:
            tmp = f.name
            np.save(f, tokens.numpy().astype(np.int32), allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def eval_tokens(tokenizer, spec: str = DEFAULT_EVAL, max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation stream: the text's documents joined with "\\n\\n", tokenized once, optionally cut.

    With ``max_tokens`` only a prefix of the text is tokenized, doubled until it yields a margin of
    tokens past the cut (a token can only change near the end of the prefix), so the first
    ``max_tokens`` are those of the whole text while a huge text costs what its prefix costs.
    """
    text = load_text(spec)
    if max_tokens is None:
        return tokenize(tokenizer, text)
    if max_tokens <= 0:
        raise OwlError(f"max tokens must be positive, got {max_tokens}")
    chars = 8 * max_tokens + 4096
    while True:
        tokens = tokenize(tokenizer, text[:chars])
        if chars >= len(text) or len(tokens) >= max_tokens + _PREFIX_MARGIN:
            return tokens[:max_tokens]
        chars *= 2


#: tokens past the cut that a prefix must yield before its first ``max_tokens`` are trusted
_PREFIX_MARGIN = 64


#: The last tenth of every calibration source is held out: ``owl-deploy tune`` scores (M, λ) on it,
#: so tuning never sees the evaluation text and never scores on the windows it calibrated with.
HOLDOUT_FRACTION = 0.1


def calibration_streams(tokenizer, spec: str, split: str = "calib") -> list[torch.Tensor]:
    """One token stream per source of ``spec``: its first 90% (``calib``) or last 10% (``heldout``)."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split must be 'calib' or 'heldout', got {split!r}")
    streams = []
    for part in str(spec).split("+"):
        ids = tokenize(tokenizer, load_text(part))
        cut = len(ids) - int(len(ids) * HOLDOUT_FRACTION)
        streams.append(ids[:cut] if split == "calib" else ids[cut:])
    return streams


def heldout_tokens(tokenizer, spec: str, max_tokens: int | None, seqlen: int) -> torch.Tensor:
    """Held-out windows of ``seqlen`` tokens from the tail of every calibration source, for tuning and early
    stopping (never the evaluation text), joined: ``max_tokens // seqlen`` windows (all when ``None``).

    Windows are taken from the sources in turn (the first window of each source, then the second of each, ...),
    so any number of them — and any prefix a caller screens on — holds every source alike, and no window
    straddles two sources. (Cutting the first N tokens of the joined tails let 8,192 tokens see the first
    source and part of the second only.) A source whose tail is spent drops out of the turn.
    """
    if seqlen < 2:
        raise OwlError(f"held-out windows need seqlen >= 2, got {seqlen}")
    tails = [s[: len(s) // seqlen * seqlen].view(-1, seqlen) for s in calibration_streams(tokenizer, spec, "heldout")]
    turns = [tail[i] for i in range(max(len(t) for t in tails)) for tail in tails if i < len(tail)]
    want = len(turns) if max_tokens is None else min(max_tokens // seqlen, len(turns))
    if want == 0:
        have = sum(len(t) for t in tails) * seqlen
        raise OwlError(
            f"the held-out text of {spec!r} gives no window of {seqlen} tokens within {max_tokens} tokens "
            f"({have} held-out tokens in whole windows)"
        )
    return torch.cat(turns[:want])


def calibration_windows(
    tokenizer, spec: str, nsamples: int, seqlen: int, seed: int, mix: str = "length"
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets, ``[nsamples, seqlen]``.

    Each part of a ``+`` mix is tokenized on its own (no window straddles two sources), only its
    first 90% is used (the rest is held out for tuning), and windows are drawn from a part with
    probability proportional to its usable length (``mix="length"``) or the same for every part long
    enough to hold a window (``mix="equal"``). The same text, seed and tokenizer always give
    the same windows. The request must fit in the text (``nsamples * seqlen`` tokens at most), so
    a short text is an error, not silent repetition.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise OwlError(f"calibration needs nsamples > 0 and seqlen > 0, got {nsamples} and {seqlen}")
    streams = calibration_streams(tokenizer, spec, "calib")
    total = sum(len(s) for s in streams)
    if nsamples * seqlen > total:
        raise OwlError(
            f"calibration of {nsamples}x{seqlen} = {nsamples * seqlen} tokens is larger than the text "
            f"{spec!r} ({total} tokens); lower --nsamples or --seqlen"
        )
    usable = torch.tensor([max(len(s) - seqlen + 1, 0) for s in streams], dtype=torch.float64)
    if usable.sum() == 0:
        raise OwlError(f"every document of {spec!r} is shorter than seqlen={seqlen}")
    if mix not in SOURCE_MIXES:
        raise OwlError(f"calibration mix must be {' or '.join(map(repr, SOURCE_MIXES))}, got {mix!r}")
    weights = usable if mix == "length" else (usable > 0).double()
    gen = torch.Generator().manual_seed(seed)
    which = torch.multinomial(weights / weights.sum(), nsamples, replacement=True, generator=gen)
    windows = []
    for part in which.tolist():
        start = int(torch.randint(0, int(usable[part]), (1,), generator=gen))
        windows.append(streams[part][start : start + seqlen])
    return torch.stack(windows)
