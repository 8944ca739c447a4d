"""The typed settings of every stage: one source of defaults and validation.

Each stage takes one (or a few) of these models. The CLI derives its options from their fields
(``cli.py``), a recipe's sections *are* these models (``recipe.py``), and the JSON reports dump them,
so a new option is written once, here. Validation errors come out as ``(location, reason)`` pairs
that the CLI prints as ``--option: reason`` and a recipe as ``file:line: section.key: reason``.

Names, once for all: ``seqlen`` is the length of a calibration or evaluation *window* of text;
``sequence_length`` is the static context of a *deployment* (its KV cache plus the new tokens);
``prefill_length`` is the tokens of one multi-token engine call; ``threads`` the cores an engine
or torch uses; OWL's ``m`` and ``lambda`` are ``--owl-m`` / ``--owl-lambda`` on the command line.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from owl_deploy.contract import LONG_PREFILL_LENGTH, PREFILL_RULE, PROJECTION_KINDS, valid_prefill_length
from owl_deploy.errors import OwlError

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "owl-inverse")
GRANULARITIES = ("block", "layer")
COMPUTE_DTYPES = ("float32", "bfloat16")
SOURCE_MIXES = ("length", "equal")  # how calibration windows are shared among the sources of a + mix
ENGINES = ("deepsparse", "onnxruntime")
ENGINE_ALIASES = {"ds": "deepsparse", "deepsparse": "deepsparse", "ort": "onnxruntime", "onnxruntime": "onnxruntime"}
#: "grouped": GQA without K/V copies; "repeat": K/V expanded to every head (DeepSparse's internal cache rejects it)
ATTENTION_KINDS = ("grouped", "repeat")
DEFAULT_CALIB = "news+austen+jargon"
DEFAULT_EVAL = "wiki"
NM_PATTERN = r"^\s*(\d+)\s*:\s*(\d+)\s*$"


class Config(BaseModel):
    """Strict (``"0.7"`` is not a number, ``5.0`` not an integer), frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """The settings as recorded in reports and recipes (recipe key names)."""
        return self.model_dump(mode="json", by_alias=True)


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): prune N of every M consecutive weights; requires 1 <= N < M."""
    match = re.match(NM_PATTERN, str(text))
    if not match:
        raise OwlError(f"N:M sparsity must look like '2:4', got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise OwlError(f"N:M sparsity needs 1 <= N < M, got {text!r}")
    return n, m


class CalibrationConfig(Config):
    """The calibration windows (Wanda/SparseGPT statistics, OWL outlier ratios, int8 ranges), never the
    evaluation text."""

    text: str = Field(DEFAULT_CALIB, min_length=1, description="Calibration text spec (assets or files joined by +).")
    nsamples: int = Field(128, ge=1, description="Calibration windows.")
    seqlen: int = Field(512, ge=2, description="Calibration window length in tokens.")
    seed: int = Field(0, ge=0, description="Seed of the calibration sampler.")


class OwlConfig(Config):
    """OWL's outlier threshold M, its range lambda, and the windows of its dense ratio pass."""

    m: float = Field(5.0, gt=0, allow_inf_nan=False, description="Outlier threshold M (x the block's mean score).")
    lambda_: float = Field(
        0.08, ge=0, lt=0.5, allow_inf_nan=False, alias="lambda", description="OWL range lambda, in [0, 0.5)."
    )
    nsamples: int | None = Field(
        8,
        ge=1,
        description="Calibration windows of the dense OWL-ratio pass; null/'all' = every window (the reference).",
    )
    tune: bool = Field(
        True, description="In a pipeline: choose M and lambda on held-out calibration text first (the tune stage)."
    )


class TuneConfig(Config):
    """The grid ``owl-deploy tune`` (and the pipeline's tune stage) scores, and its held-out text."""

    m: list[float] = Field([3.0, 5.0, 8.0], min_length=1, description="Outlier thresholds M to try.")
    lambda_: list[float] = Field(
        [0.04, 0.08, 0.15, 0.25], min_length=1, alias="lambda", description="OWL ranges lambda to try."
    )
    heldout_tokens: int = Field(
        8192, ge=2, description="Held-out tokens each candidate is scored on: windows of every source in turn."
    )
    seqlen: int = Field(512, ge=2, description="Window length of that scoring.")
    nsamples: int | None = Field(16, ge=1, description="Calibration windows of the dense statistics; null = all.")
    screen_windows: int = Field(
        4, ge=2, description="Held-out windows every candidate is scored on first (successive halving)."
    )
    finalists: int = Field(
        2, ge=1, description="Best candidates of that screen scored on all held-out windows, beside uniform."
    )

    @field_validator("m")
    @classmethod
    def _ms(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(m) and m > 0 for m in value):
            raise ValueError(f"every M must be > 0 (got {value})")
        return value

    @field_validator("lambda_")
    @classmethod
    def _lambdas(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(x) and 0 <= x < 0.5 for x in value):
            raise ValueError(f"every lambda must be in [0, 0.5) (got {value})")
        return value


class PruneConfig(Config):
    """The pruning method and its target: ``sparsity`` in (0, 1), or an N:M pattern such as ``"2:4"``."""

    method: Literal[METHODS] = Field("wanda", description="Pruning method.")  # type: ignore[valid-type]
    allocation: Literal[ALLOCATIONS] = Field("owl", description="Sparsity per block.")  # type: ignore[valid-type]
    granularity: Literal[GRANULARITIES] = Field(  # type: ignore[valid-type]
        "block", description="OWL per block (the method) or per linear layer (the ablation)."
    )
    sparsity: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False, description="Target global sparsity.")
    nm: str | None = Field(None, pattern=NM_PATTERN, description="N:M pattern, e.g. 2:4 (OWL varies N per block).")
    batch_size: int = Field(8, ge=1, description="Calibration windows per block forward.")
    compute_dtype: Literal["auto", *COMPUTE_DTYPES] = Field(  # type: ignore[valid-type]
        "auto",
        description="Dtype of the calibration forwards (bfloat16: CPU autocast; auto: bfloat16 on AMX, and on "
        "AVX512-BF16 on AMD CPUs; float32 elsewhere); statistics stay float64.",
    )

    @model_validator(mode="after")
    def _target(self) -> PruneConfig:
        if self.nm is not None:
            n, m = parse_nm(self.nm)  # the pattern already matched; this checks 1 <= N < M
            if self.sparsity is not None and abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity:g} contradicts nm {self.nm} (= {n / m:g}); give only one")
        elif self.sparsity is None:
            raise ValueError('give a sparsity in (0, 1) or an N:M pattern such as "2:4"')
        return self

    @field_validator("nm")
    @classmethod
    def _nm_order(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            n, m = parse_nm(value)
        except OwlError as exc:
            raise ValueError(str(exc)) from None
        return f"{n}:{m}"

    @property
    def target_sparsity(self) -> float:
        if self.sparsity is not None:
            return self.sparsity
        n, m = self.nm_pair  # type: ignore[misc]
        return n / m

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        return parse_nm(self.nm) if self.nm is not None else None


ADAPTER_METHODS = ("lora", "masked-lora")  # the recover methods that train low-rank adapters


class RecoverConfig(Config):
    """A short fine-tune that wins back quality and keeps every zero (``owl-deploy recover``, the recover stage).

    ``lora``: low-rank adapters on the block linears, merged into the weights at the end and the pruning mask
    re-applied; ``masked-lora``: the same adapters with their update masked while training (owl_deploy.masked_lora);
    ``masked``: the block linears themselves, their pruned entries' gradients zeroed.
    """

    enabled: bool = Field(False, description="In a pipeline: run the recover stage between prune and export.")
    method: Literal[*ADAPTER_METHODS, "masked"] = Field(  # type: ignore[valid-type]
        "lora",
        description="LoRA adapters; LoRA whose update is masked to the kept weights while it trains (the "
        "trained model is the deployed one); or masked full fine-tuning.",
    )
    # 64, not 16: resolved better on both models measured at 50% (docs/results.md, "A larger adapter"), 9-14% slower
    rank: int = Field(64, ge=1, description="LoRA rank.")
    alpha: float = Field(128.0, gt=0, description="LoRA scaling alpha (alpha/rank scales the adapters' update).")
    steps: int = Field(200, ge=1, description="Optimizer steps at most (early stopping may end sooner).")
    batch_size: int = Field(4, ge=1, description="Calibration windows per step.")
    seqlen: int = Field(256, ge=8, description="Window length of the training and held-out text.")
    mix: Literal[SOURCE_MIXES] = Field(  # type: ignore[valid-type]
        "length",
        description="Training windows per source of the --calib mix: in proportion to its length, or equal "
        "(Austen gives two thirds of the default mix's; equal was no better on wiki for Qwen at 50%, docs/results.md).",
    )
    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (cosine decay after 5% warm-up).")
    distill: float = Field(0.0, ge=0, le=1, description="Weight of the KL to the dense teacher's logits (--teacher).")
    temperature: float = Field(1.0, gt=0, description="Temperature of the distillation.")
    eval_every: int = Field(25, ge=1, description="Steps between held-out evaluations (and checkpoints).")
    patience: int = Field(4, ge=1, description="Held-out evaluations without improvement before stopping.")
    heldout_tokens: int = Field(
        4096, ge=16, description="Held-out calibration tokens for early stopping: whole windows, every source in turn."
    )
    compute_dtype: Literal["auto", *COMPUTE_DTYPES] = Field(  # type: ignore[valid-type]
        "auto",
        description="bfloat16: CPU autocast of the forward and backward passes; auto: bfloat16 on AMX, and "
        "on AVX512-BF16 on AMD CPUs; float32 elsewhere.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")
    norms: bool = Field(
        True,
        description="Also train every 1-D parameter beside the adapters: the norms' scales and the linears' biases "
        "(none of them is pruned; a few thousand numbers per block). Better on both models measured, at no extra "
        "time (docs/results.md, 'Training the norms and biases too').",
    )
    seed: int = Field(0, ge=0, description="Seed of the data order, the adapters' init and dropout.")


class EvalConfig(Config):
    """Perplexity on non-overlapping windows of the evaluation text (remainder dropped)."""

    text: str = Field(DEFAULT_EVAL, min_length=1, description="Evaluation text spec.")
    seqlen: int = Field(512, ge=2, description="Window length in tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Evaluate only the first N tokens.")


def _check_prefill(value: int) -> int:
    if not valid_prefill_length(value):
        raise ValueError(f"must be {PREFILL_RULE} (got {value})")
    return value


class ExportConfig(Config):
    """The ONNX export (a KV-cache decode graph in DeepSparse's contract) and its verification."""

    sequence_length: int = Field(512, ge=2, description="Static context length of the deployment.")
    attention: Literal[ATTENTION_KINDS] = Field(  # type: ignore[valid-type]
        "grouped", description="grouped: GQA without K/V copies; repeat: K/V per head (no DeepSparse internal cache)."
    )
    prefill_length: int = Field(16, ge=1, description="Tokens per multi-token call when verifying.")
    greedy_tokens: int = Field(32, ge=0, description="Greedy tokens compared across torch and the engines.")
    threads: int | None = Field(1, ge=1, description="Engine and torch threads while verifying.")
    external_data_threshold: int = Field(
        1_800_000_000, ge=0, description="Weight bytes above which ONNX external data is used."
    )
    require_ok: bool = Field(True, description="Fail when the verification fails (zeros lost, logits off).")

    @field_validator("prefill_length")
    @classmethod
    def _prefill(cls, value: int) -> int:
        return _check_prefill(value)


class QuantizeConfig(Config):
    """int8 in DeepSparse's sparse-int8 MatMulInteger pattern; activation ranges from calibration text."""

    scheme: Literal["int8"] | None = Field(None, description="int8: quantize the projections (default: fp32).")
    smooth_alpha: float | None = Field(0.7, ge=0, le=1, description="SmoothQuant strength in [0, 1]; null: none.")
    lm_head: bool = Field(True, description="Quantize lm_head too.")
    keep_fp32: list[str] = Field(
        default_factory=list, description="Kinds (q_proj ... down_proj, lm_head) or globs of module names kept fp32."
    )
    keep_fp32_worst: int = Field(
        0,
        ge=0,
        description="Also keep fp32 the N int8 projections int8 hurts most (relative output error on the first "
        "calibration windows, after SmoothQuant): quality back for a few fp32 weights.",
    )
    nsamples: int = Field(16, ge=1, description="Calibration windows for the activation ranges.")
    seqlen: int = Field(512, ge=2, description="Length of those windows.")

    @field_validator("keep_fp32")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        unknown = sorted(
            {k for k in value if k not in (*PROJECTION_KINDS, "lm_head") and "." not in k and "*" not in k}
        )
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} is not a projection; use {', '.join(PROJECTION_KINDS)}, lm_head "
                "or a glob of module names such as 'model.layers.11.mlp.down_proj'"
            )
        return value


class GenerateConfig(Config):
    """Greedy generation from a deployment folder (the pipeline's compile smoke test)."""

    engine: Literal[ENGINES] = Field("deepsparse", description="Engine that runs the deployment.")  # type: ignore[valid-type]
    prompt: str = Field("The capital of France is", min_length=1, description="Text to continue.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most.")
    sequence_length: int | None = Field(None, ge=2, description="Override the exported sequence length.")
    threads: int | None = Field(None, ge=1, description="Engine threads (default: all cores).")


class ServeConfig(Config):
    """``owl-deploy serve``: an OpenAI-compatible server over one deployment folder, batching requests."""

    engine: Literal[ENGINES] = Field("deepsparse", description="Engine of the batched decode steps.")  # type: ignore[valid-type]
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    max_batch: int = Field(16, ge=1, le=256, description="Sequences decoded together at most.")
    batch_sizes: list[int] | None = Field(
        None, description="Batch sizes compiled for decode (default: powers of two up to max_batch)."
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting for a row at most; more get HTTP 429.")
    threads: int | None = Field(None, ge=1, description="Engine threads (default: all cores).")
    prefill_engine: Literal["auto", "deepsparse", "onnxruntime"] = Field(
        "auto",
        description="Engine that prefills prompts; auto: DeepSparse when it keeps the caches (internal), else "
        "ONNX Runtime for int8 deployments, else the decode engine.",
    )
    kv_cache: Literal["auto", "internal", "external"] = Field(
        "auto",
        description="Where decode keeps each sequence's KV cache: internal (DeepSparse's engine-side buffers, "
        "prompts prefilled in DeepSparse; nothing copied per step) or external (numpy arrays fed in and out); "
        "auto: internal for DeepSparse (fp32 and int8), external for onnxruntime. DeepSparse's int8 answers part "
        "from ONNX Runtime's after some tokens whatever the plan (equal quality, other rounding): "
        "--engine onnxruntime for its exact tokens.",
    )
    prefill_length: int | None = Field(
        None,
        ge=1,
        description="Prompt tokens per prefill call (1 or a multiple of 4; default: 128, or what fits the context).",
    )
    sequence_length: int | None = Field(None, ge=2, description="Override the exported context length.")
    model_name: str | None = Field(None, description="Model id in the API (default: the folder's name).")
    drain_seconds: float = Field(60.0, ge=0, description="On SIGTERM, time given to in-flight requests.")
    prefills_per_step: int | None = Field(
        None,
        ge=1,
        description="Prompts prefilled at most between two decode steps (default: as many as rows are free). "
        "Every prefill stalls the running streams; a bound shortens those stalls and delays the last requests "
        "of a wave (Zen 4, 16 streams, bound 1: inter-token p99 0.3 -> 0.1-0.17 s, median first token halved, "
        "first-token p99 longer, about 5% more engine time; docs/results.md, 'Serving').",
    )
    step_sync: bool = Field(
        False,
        description="After every decode step the engine waits (20 ms at most) until the event loop has passed "
        "the step's tokens to their streams, so the HTTP work runs between steps instead of beside the next one "
        "(on a 2-core Zen 4, as medians over interleaved rounds: no difference past the noise; docs/results.md, "
        "'Serving').",
    )

    @field_validator("prefill_length")
    @classmethod
    def _prefill(cls, value: int | None) -> int | None:
        return None if value is None else _check_prefill(value)

    @model_validator(mode="after")
    def _batches(self) -> ServeConfig:
        if self.batch_sizes is not None:
            if not self.batch_sizes or min(self.batch_sizes) < 1:
                raise ValueError(f"batch_sizes must be positive integers (got {self.batch_sizes})")
            if max(self.batch_sizes) < self.max_batch:
                raise ValueError(f"the largest batch size {max(self.batch_sizes)} is below max_batch {self.max_batch}")
        return self

    @property
    def compiled_batch_sizes(self) -> list[int]:
        if self.batch_sizes is not None:
            return sorted(set(self.batch_sizes) | {1})
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return [*sizes, self.max_batch]


def engine_items(spec: str) -> list[tuple[str, str]]:
    """``"ds/sparse,ort"`` -> [("deepsparse", "sparse"), ("onnxruntime", "")]; ``all`` -> [("all", "")]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            out.append(("all", ""))
            continue
        eng, _, model = item.replace(":", "/").partition("/")
        engine = ENGINE_ALIASES.get(eng.lower())
        if engine is None:
            raise OwlError(f"unknown engine {eng!r}; use ds|deepsparse or ort|onnxruntime")
        out.append((engine, model))
    return out or [("all", "")]


class BenchConfig(Config):
    """The decode benchmark (``owl-deploy bench``); ONNX Runtime on the dense model is the reference."""

    engines: str = Field("all", min_length=1, description="Comma list of ENGINE[/MODEL] (ds|ort, sparse|dense|LABEL).")
    rounds: int = Field(5, ge=1, description="Timed rounds.")
    warmup_rounds: int = Field(1, ge=0, description="Untimed rounds first.")
    steps: int = Field(32, ge=1, description="Decode steps per round.")
    context: int = Field(128, ge=1, description="Tokens in the cache before the timed decode steps.")
    prefill_length: int = Field(
        LONG_PREFILL_LENGTH,
        ge=0,
        validation_alias=AliasChoices("prefill_length", "prefill_chunk"),
        description="Tokens per multi-token prefill call (1 or a multiple of 4; 0 = 1).",
    )
    batch_sizes: list[int] = Field(
        [1],
        description="Decode batch sizes (sequences per step) for the deployments; 1 is always run. "
        "Above 1: per-stream and aggregate tok/s of the serving decode path.",
    )
    prompt_lengths: list[int] = Field(
        [], description="Prompt lengths for prefill tok/s and time to first token (default: --context)."
    )
    threads: int | None = Field(None, ge=1, description="Cores per engine (default: every physical core).")
    kv_cache: Literal["internal", "external"] | None = Field(
        None, description="DeepSparse KV cache (default: internal)."
    )
    strict: bool = Field(False, description="Refuse (exit 4, nothing written) when the machine is noisy.")
    seed: int = Field(0, ge=0, description="Seed of the random prompt.")
    gap_seconds: float = Field(0.05, ge=0, description="Untimed pause between sessions.")
    measure_bandwidth: bool = Field(True, description="Measure memory read bandwidth (for the ceilings).")

    @field_validator("prefill_length")
    @classmethod
    def _prefill(cls, value: int) -> int:
        return _check_prefill(value or 1)  # 0: no multi-token prefill = one token per call

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, value: list[int]) -> list[int]:
        if any(b < 1 or b > 256 for b in value):
            raise ValueError(f"batch sizes must be 1 to 256 (got {value})")
        return sorted(set(value) | {1})

    @field_validator("prompt_lengths")
    @classmethod
    def _prompt_lengths(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value):
            raise ValueError(f"prompt lengths must be positive (got {value})")
        return sorted(set(value))

    def prefill_lengths(self) -> list[int]:
        """The prompt lengths whose prefill and time to first token are measured."""
        return self.prompt_lengths or [self.context]

    @field_validator("engines")
    @classmethod
    def _engines(cls, value: str) -> str:
        try:
            engine_items(value)
        except OwlError as exc:
            raise ValueError(str(exc)) from None
        return value


# ---------------------------------------------------------------- building configs, and what went wrong
def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "model_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
    "finite_number": "a finite number",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def reason(err: dict, allowed: list[str] | None = None) -> str:
    """A pydantic error as a short reason (``must be < 1 (got 1.5)``)."""
    import difflib

    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        allowed = allowed or []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key ({hint}allowed: {', '.join(allowed)})"
    if kind == "missing":
        return "required key is missing"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {bound:g} (got {_got(value)})"
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]} (got {_got(value)})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '?')} (got {_got(value)})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        if loc and loc[-1] == "nm":
            return f'must be an N:M pattern such as "2:4" (got {_got(value)})'
        if loc and loc[-1] == "name":
            return f"must be letters, digits, '.', '_' or '-' (got {_got(value)})"
    if kind == "value_error":
        return str(ctx.get("error") or err["msg"]).removeprefix("Value error, ")
    return f"{err['msg'].rstrip('.').lower()} (got {_got(value)})"


def field_names(model: type[BaseModel]) -> list[str]:
    """The keys a section accepts, by their recipe spelling."""
    return [f.alias or n for n, f in model.model_fields.items()]


def build(model: type[Config], values: dict[str, Any], option_names: dict[str, str] | None = None) -> Any:
    """``model(**values)``, with every validation problem in one OwlError line.

    ``option_names`` maps a field to how the user spelled it (``--owl-m``), for the message.
    """
    try:
        return model(**values)
    except ValidationError as exc:
        names = option_names or {}
        by_alias = {f.alias: n for n, f in model.model_fields.items() if f.alias}
        parts = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            if not loc:
                parts.append(reason(err))
                continue
            field = by_alias.get(str(loc[0]), str(loc[0]))
            known = model.model_fields.get(field)
            where = names.get(field) or (known.alias if known is not None else None) or field
            parts.append(f"{where}: {reason(err, field_names(model))}")
        raise OwlError("; ".join(parts)) from None


def replace(cfg: Config, **changes: Any) -> Any:
    """A validated copy of ``cfg`` with ``changes`` (pydantic's model_copy would not validate)."""
    return build(type(cfg), {**cfg.model_dump(), **changes})
