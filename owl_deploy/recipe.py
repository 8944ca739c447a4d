"""Pipeline recipes: one YAML file names everything ``owl-deploy run`` does, validated with line numbers.

A recipe is a mapping of sections (every key except ``model`` and the prune target has a default)::

    name: smollm2-owl-wanda-70          # optional; default: the file name without .yaml
    model: smollm2-135m                 # asset name, Hugging Face folder or .gguf file
    calibration: {text: news+austen+jargon, nsamples: 128, seqlen: 512, seed: 0}
    prune: {method: wanda, allocation: owl, granularity: block, sparsity: 0.7, nm: null, batch_size: 8}
    owl: {m: 5, lambda: 0.08, nsamples: null}
    evaluate: {text: wiki, seqlen: 512, max_tokens: 16384}
    export: {sequence_length: 512, attention: grouped, require_ok: true}
    quantize: {scheme: null, smooth_alpha: 0.7, lm_head: true, keep_fp32: [], nsamples: 16, seqlen: 512}
    compile: {engine: deepsparse, prompt: "...", max_new_tokens: 16}
    bench: {engines: all, rounds: 5, warmup_rounds: 1, steps: 32, context: 128, prefill_chunk: 16,
            threads: null, strict: false}

Validation is strict: an unknown key, a value of the wrong type (``"0.7"`` is not a number, ``5.0`` is
not an integer) or an out-of-range value is an error naming the file, line and dotted key, e.g.
``recipe.yaml:7: prune.sparsity: must be < 1 (got 1.5)``. Every schema error of a file is reported at
once; the cross-key checks (sparsity vs N:M, bench context vs export length, files that must exist)
follow once the schema holds.

YAML 1.1 quirks are switched off: ``2:4`` stays the string ``"2:4"`` (not the base-60 integer 124) and
``1e-3`` is a number (not a string); duplicate keys are an error instead of "last one wins".

Relative paths (``model``, a ``.txt``/``.jsonl`` text) are resolved against the recipe's own folder, so a
recipe means the same thing from any working directory.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from owl_deploy.errors import OwlError

DEFAULT_CALIB = "news+austen+jargon"  # = owl_deploy.data.DEFAULT_CALIB (checked by a test; data imports torch)
DEFAULT_EVAL = "wiki"  # = owl_deploy.data.DEFAULT_EVAL
NM_PATTERN = r"^\s*(\d+)\s*:\s*(\d+)\s*$"


class RecipeError(OwlError):
    """A recipe that does not parse or validate; the message has one ``file:line: key: reason`` per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------- schema
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)


class Calibration(_Section):
    """The calibration windows (Wanda/SparseGPT statistics and the OWL outlier ratios)."""

    text: str = Field(DEFAULT_CALIB, min_length=1)
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = Field(0, ge=0)


class Prune(_Section):
    """The pruning method and target: ``sparsity`` in (0, 1), or an ``nm`` pattern such as ``"2:4"``."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    allocation: Literal["uniform", "owl", "owl-inverse"] = "owl"
    granularity: Literal["block", "layer"] = "block"
    sparsity: float | None = Field(None, gt=0, lt=1)
    nm: str | None = Field(None, pattern=NM_PATTERN)
    batch_size: int = Field(8, ge=1)


class Owl(_Section):
    """OWL's outlier threshold M (x mean score), range lambda, and the windows of its dense pass."""

    m: float = Field(5.0, gt=0)
    lambda_: float = Field(0.08, ge=0, lt=0.5, alias="lambda")
    nsamples: int | None = Field(None, ge=1)


class Evaluate(_Section):
    """Perplexity of the dense and the pruned model (non-overlapping windows, remainder dropped)."""

    text: str = Field(DEFAULT_EVAL, min_length=1)
    seqlen: int = Field(512, ge=2)
    max_tokens: int | None = Field(None, ge=1)


class Export(_Section):
    """The ONNX export (KV-cache decoder graph) of the dense and of the pruned model."""

    sequence_length: int = Field(512, ge=2)
    attention: Literal["grouped", "repeat"] = "grouped"
    require_ok: bool = True  # fail the stage when export.json's verification fails (zeros lost, logits off)


class Quantize(_Section):
    """int8 for the pruned export (``owl-deploy export --quantize int8``); the dense reference stays fp32.

    Activation scales come from ``nsamples`` windows of ``calibration.text`` (seed ``calibration.seed``).
    """

    scheme: Literal["int8"] | None = None  # null: fp32 export
    smooth_alpha: float | None = Field(0.7, ge=0, le=1)  # SmoothQuant strength; null: no smoothing
    lm_head: bool = True
    keep_fp32: list[str] = []  # kinds (down_proj, lm_head, ...) or globs of module names
    nsamples: int = Field(16, ge=1)
    seqlen: int = Field(512, ge=2)


class Compile(_Section):
    """Compile the pruned export in the deployment engine and generate a few tokens with it (a smoke test)."""

    engine: Literal["deepsparse", "onnxruntime"] = "deepsparse"
    prompt: str = Field("The capital of France is", min_length=1)
    max_new_tokens: int = Field(16, ge=1)


class Bench(_Section):
    """Decode benchmark settings, as ``owl-deploy bench`` (ONNX Runtime on the dense model is the reference)."""

    engines: str = Field("all", min_length=1)
    rounds: int = Field(5, ge=1)
    warmup_rounds: int = Field(1, ge=0)
    steps: int = Field(32, ge=1)
    context: int = Field(128, ge=1)
    prefill_chunk: int = Field(16, ge=0)
    threads: int | None = Field(None, ge=1)
    strict: bool = False


class Recipe(_Section):
    """A whole pipeline: what to prune, how, and how to evaluate, export, compile and benchmark it."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(min_length=1)
    calibration: Calibration = Calibration()
    prune: Prune
    owl: Owl = Owl()
    evaluate: Evaluate = Evaluate()
    export: Export = Export()
    quantize: Quantize = Quantize()
    compile: Compile = Compile()
    bench: Bench = Bench()

    # ------------------------------------------------------------ derived values
    @property
    def target_sparsity(self) -> float:
        """The prune target: ``sparsity``, or N/M of the ``nm`` pattern."""
        if self.prune.sparsity is not None:
            return self.prune.sparsity
        n, m = parse_nm(self.prune.nm)
        return n / m

    def value(self, dotted: str) -> Any:
        """The JSON value at a dotted path (``"prune.sparsity"``, ``"owl"``), by the recipe's own key names."""
        node: Any = self.model_dump(mode="json", by_alias=True)
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse_nm(text: str | None) -> tuple[int, int]:
    match = re.match(NM_PATTERN, text or "")
    if not match:
        raise OwlError(f"N:M pattern must look like 2:4, got {text!r}")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------- YAML without the 1.1 surprises
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style numbers: no base-60 (``2:4``), exponents without a dot are floats."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 0) if text.startswith("0x") else int(text)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _line_index(root: yaml.Node, where: str) -> tuple[dict[tuple, int], list[tuple[int, str]]]:
    """Line (1-based) of every key path in the composed document, and the duplicate-key problems."""
    lines: dict[tuple, int] = {(): root.start_mark.line + 1}
    problems: list[tuple[int, str]] = []

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    problems.append(
                        (line, f"{where}:{line}: {_dotted((*path, key))}: duplicate key (first on line {seen[key]})")
                    )
                    continue
                seen[key] = line
                lines[(*path, key)] = line
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    walk(root, ())
    return lines, problems


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(recipe)"


def _line_of(lines: dict[tuple, int], path: tuple) -> int:
    while path not in lines:
        path = path[:-1]
    return lines[path]


# ---------------------------------------------------------------- error messages
def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "model_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
}


def _allowed_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in path:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return [f.alias or n for n, f in model.model_fields.items()]


def _message(err: dict) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key ({hint}allowed: {', '.join(allowed)})"
    if kind == "missing":
        return "required key is missing"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {bound:g} (got {_got(value)})"
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]} (got {_got(value)})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '?')} (got {_got(value)})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        if loc[-1] == "nm":
            return f'must be an N:M pattern such as "2:4" (got {_got(value)})'
        if loc[-1] == "name":
            return f"must be letters, digits, '.', '_' or '-' (got {_got(value)})"
    return f"{err['msg'].rstrip('.').lower()} (got {_got(value)})"


# ---------------------------------------------------------------- semantic checks (after the schema)
def _semantic_problems(recipe: Recipe, base: Path) -> list[tuple[tuple, str]]:
    """Cross-field rules and things that need the outside world (asset names, files). Path + reason."""
    from owl_deploy import assets

    out: list[tuple[tuple, str]] = []
    p = recipe.prune
    if p.nm is not None:
        n, m = parse_nm(p.nm)
        if not 1 <= n < m:
            out.append((("prune", "nm"), f"N:M needs 1 <= N < M (got {p.nm!r})"))
        elif p.sparsity is not None and abs(p.sparsity - n / m) > 1e-9:
            out.append(
                (("prune", "sparsity"), f"{p.sparsity:g} contradicts nm {p.nm} (= {n / m:g}); give only one of them")
            )
    elif p.sparsity is None:
        out.append((("prune",), 'give prune.sparsity (in (0, 1)) or prune.nm (an N:M pattern such as "2:4")'))
    if recipe.owl.nsamples is not None and recipe.owl.nsamples > recipe.calibration.nsamples:
        out.append(
            (
                ("owl", "nsamples"),
                f"must be <= calibration.nsamples ({recipe.calibration.nsamples}) (got {recipe.owl.nsamples})",
            )
        )
    if recipe.export.attention == "repeat" and recipe.compile.engine == "deepsparse":
        out.append(
            (
                ("export", "attention"),
                "repeat attention cannot run with DeepSparse's internal KV cache (compile.engine: deepsparse); "
                "use grouped",
            )
        )
    b = recipe.bench
    if b.context + b.steps > recipe.export.sequence_length:
        out.append(
            (
                ("bench", "context"),
                f"context {b.context} + steps {b.steps} = {b.context + b.steps} decode positions exceed "
                f"export.sequence_length ({recipe.export.sequence_length})",
            )
        )
    q = recipe.quantize
    if q.scheme == "int8":
        from owl_deploy.export.int8 import Int8Config

        try:
            Int8Config(keep_fp32=tuple(q.keep_fp32)).validate()
        except OwlError as exc:
            out.append((("quantize", "keep_fp32"), str(exc).replace("--keep-fp32 ", "")))
    elif q.keep_fp32:
        out.append((("quantize", "keep_fp32"), "has no effect without quantize.scheme: int8"))
    if b.prefill_chunk > 1 and b.prefill_chunk % 4:
        out.append(
            (
                ("bench", "prefill_chunk"),
                f"must be 0 or 1 (one token per call) or a multiple of 4 (got {b.prefill_chunk})",
            )
        )
    try:
        from owl_deploy.bench import parse_engines

        parse_engines(b.engines)
    except OwlError as exc:
        out.append((("bench", "engines"), str(exc).replace("--engines", "bench.engines")))
    except ImportError:  # pragma: no cover - bench is part of the package
        pass
    if recipe.model not in assets.MODELS and not _resolve_path(recipe.model, base).exists():
        out.append(
            (("model",), f"{recipe.model!r} is neither a model asset ({', '.join(sorted(assets.MODELS))}) nor a path")
        )
    for section in ("calibration", "evaluate"):
        spec = getattr(recipe, section).text
        for part in spec.split("+"):
            part = part.strip()
            if part not in assets.TEXTS and not _resolve_path(part, base).is_file():
                out.append(
                    (
                        (section, "text"),
                        f"{part!r} is neither a text asset ({', '.join(sorted(assets.TEXTS))}) nor a file",
                    )
                )
    return out


def _resolve_path(spec: str, base: Path) -> Path:
    path = Path(spec).expanduser()
    return path if path.is_absolute() else base / path


def _resolve_specs(recipe: Recipe, base: Path) -> Recipe:
    """Rewrite relative model / text paths as absolute ones (asset names are left alone)."""
    from owl_deploy import assets

    def text(spec: str) -> str:
        parts = [s.strip() for s in spec.split("+")]
        return "+".join(s if s in assets.TEXTS else str(_resolve_path(s, base).resolve()) for s in parts)

    model = recipe.model if recipe.model in assets.MODELS else str(_resolve_path(recipe.model, base).resolve())
    return recipe.model_copy(
        update={
            "model": model,
            "calibration": recipe.calibration.model_copy(update={"text": text(recipe.calibration.text)}),
            "evaluate": recipe.evaluate.model_copy(update={"text": text(recipe.evaluate.text)}),
        }
    )


# ---------------------------------------------------------------- entry points
def parse_recipe(text: str, where: str = "recipe.yaml", base: Path | None = None) -> Recipe:
    """Validate recipe ``text`` (``where`` names it in messages; ``base`` resolves relative paths)."""
    base = Path.cwd() if base is None else Path(base)
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        raise RecipeError([f"{where}:{line} invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{where}: invalid YAML: {exc}"]) from None
    if root is None or not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        raise RecipeError([f"{where}:{line}: a recipe must be a mapping of keys (model, prune, ...)"])
    lines, problems = _line_index(root, where)
    found: list[tuple[int, str]] = list(problems)
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        seen = set()
        for err in exc.errors():
            loc = tuple(err["loc"])
            if loc in seen:
                continue
            seen.add(loc)
            line = _line_of(lines, loc)
            found.append((line, f"{where}:{line}: {_dotted(loc)}: {_message(err)}"))
    if recipe is not None:
        for loc, reason in _semantic_problems(recipe, base):
            line = _line_of(lines, loc)
            found.append((line, f"{where}:{line}: {_dotted(loc)}: {reason}"))
    if found:
        raise RecipeError([msg for _, msg in sorted(found, key=lambda t: t[0])])
    assert recipe is not None
    return _resolve_specs(recipe, base)


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    """Read and validate a recipe file; returns the recipe and its name (``name:`` or the file's stem)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OwlError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OwlError(f"cannot read recipe {path}: {exc}") from None
    recipe = parse_recipe(text, str(path), path.resolve().parent)
    return recipe, recipe.name or path.name.removesuffix(".yaml").removesuffix(".yml")
