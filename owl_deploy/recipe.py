"""Pipeline recipes: one YAML file names everything ``owl-deploy run`` does, validated with line numbers.

A recipe is a mapping of sections; each section *is* one stage's config (``owl_deploy.configs``), with
the same keys, defaults and bounds as the command line's options. Only ``model`` and the prune target
are required::

    name: smollm2-owl-wanda-70          # optional; default: the file name without .yaml
    model: smollm2-135m                 # asset name, Hugging Face folder or .gguf file
    calibration: {text: news+austen+jargon, nsamples: 128, seqlen: 512, seed: 0}     # CalibrationConfig
    prune: {method: wanda, allocation: owl, sparsity: 0.7, ...}                      # PruneConfig
    owl: {m: 5, lambda: 0.08, nsamples: 8, tune: true}                               # OwlConfig
    tune: {m: [3, 5, 8], lambda: [0.04, 0.08, 0.15, 0.25], heldout_tokens: 8192}     # TuneConfig
    recover: {enabled: false, method: lora, rank: 64, steps: 200, ...}              # RecoverConfig
    evaluate: {text: wiki, seqlen: 512, max_tokens: 16384}                           # EvalConfig
    export: {sequence_length: 512, attention: grouped, require_ok: true, ...}        # ExportConfig
    quantize: {scheme: null, smooth_alpha: 0.7, lm_head: true, keep_fp32: [], ...}  # QuantizeConfig
    compile: {engine: deepsparse, prompt: "...", max_new_tokens: 16}                 # GenerateConfig
    bench: {engines: all, rounds: 5, steps: 32, context: 128, prefill_length: 16, ...}  # BenchConfig

Validation is strict: an unknown key, a value of the wrong type (``"0.7"`` is not a number, ``5.0`` is
not an integer) or an out-of-range value is an error naming the file, line and dotted key, e.g.
``recipe.yaml:7: prune.sparsity: must be < 1 (got 1.5)``. Every schema error of a file is reported at
once; the checks across sections (bench context vs export length, files that must exist) follow once
the schema holds.

YAML 1.1 quirks are switched off: ``2:4`` stays the string ``"2:4"`` (not the base-60 integer 124) and
``1e-3`` is a number (not a string); duplicate keys are an error instead of "last one wins".

Relative paths (``model``, a ``.txt``/``.jsonl`` text) are resolved against the recipe's own folder, so a
recipe means the same thing from any working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from owl_deploy.configs import (
    BenchConfig,
    CalibrationConfig,
    Config,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    OwlConfig,
    PruneConfig,
    QuantizeConfig,
    RecoverConfig,
    TuneConfig,
    field_names,
    reason,
)
from owl_deploy.errors import OwlError


class RecipeError(OwlError):
    """A recipe that does not parse or validate; the message has one ``file:line: key: reason`` per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------- schema: the stage configs, composed
class Recipe(Config):
    """A whole pipeline: what to prune, how, and how to evaluate, export, compile and benchmark it."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(min_length=1)
    calibration: CalibrationConfig = CalibrationConfig()
    prune: PruneConfig
    owl: OwlConfig = OwlConfig()
    tune: TuneConfig = TuneConfig()
    recover: RecoverConfig = RecoverConfig()
    evaluate: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    compile: GenerateConfig = GenerateConfig()
    bench: BenchConfig = BenchConfig()

    # ------------------------------------------------------------ derived values
    @property
    def target_sparsity(self) -> float:
        """The prune target: ``sparsity``, or N/M of the ``nm`` pattern."""
        return self.prune.target_sparsity

    def value(self, dotted: str) -> Any:
        """The JSON value at a dotted path (``"prune.sparsity"``, ``"owl"``), by the recipe's own key names."""
        node: Any = self.to_json()
        for part in dotted.split("."):
            node = node[part]
        return node


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
def _allowed_keys(path: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in path:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return field_names(model)


# ---------------------------------------------------------------- semantic checks (after the schema)
def _semantic_problems(recipe: Recipe, base: Path) -> list[tuple[tuple, str]]:
    """Rules across sections and things that need the outside world (asset names, files). Path + reason.

    Everything about one section alone is validated by its config (owl_deploy.configs).
    """
    from owl_deploy import assets

    out: list[tuple[tuple, str]] = []
    if recipe.export.attention == "repeat" and recipe.compile.engine == "deepsparse":
        out.append(
            (
                ("export", "attention"),
                "repeat attention cannot run with DeepSparse's internal KV cache (compile.engine: deepsparse); "
                "use grouped",
            )
        )
    b = recipe.bench
    if b.context + b.steps >= recipe.export.sequence_length:  # DeepSparse's internal cache holds one fewer
        out.append(
            (
                ("bench", "context"),
                f"context {b.context} + steps {b.steps} = {b.context + b.steps} decode positions exceed "
                f"export.sequence_length ({recipe.export.sequence_length}) less one",
            )
        )
    if recipe.quantize.scheme is None and recipe.quantize.keep_fp32:
        out.append((("quantize", "keep_fp32"), "has no effect without quantize.scheme: int8"))
    if recipe.quantize.scheme is None and recipe.quantize.keep_fp32_worst:
        out.append((("quantize", "keep_fp32_worst"), "has no effect without quantize.scheme: int8"))
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
            found.append((line, f"{where}:{line}: {_dotted(loc)}: {reason(err, _allowed_keys(loc[:-1]))}"))
    if recipe is not None:
        for loc, why in _semantic_problems(recipe, base):
            line = _line_of(lines, loc)
            found.append((line, f"{where}:{line}: {_dotted(loc)}: {why}"))
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
