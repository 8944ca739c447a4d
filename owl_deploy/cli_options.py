"""The click options of the ``owl-deploy`` commands, derived from the config models (``owl_deploy.configs``).

An option is written once: the name, type, default, choices and help of ``--sparsity`` come from
``PruneConfig.sparsity``; ``Options.build`` turns a command's keyword arguments back into the validated config.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from owl_deploy import configs
from owl_deploy.errors import OwlError


def number_list(text: str, cast: type = int, least: float | None = None) -> list:
    """``"1,4,16"`` -> [1, 4, 16] (``cast`` float: ``"0,2.5"`` -> [0.0, 2.5]); with ``least``, at least one value
    and none below it. An OwlError names what was expected."""
    kind = "integers" if cast is int else "numbers"
    try:
        values = [cast(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise OwlError(f"expected comma-separated {kind}, got {text!r}") from None
    if least is not None and (not values or min(values) < least):
        raise OwlError(f"expected {kind} ≥ {least:g}, got {text!r}")
    return values


def arg_list(cast: type = int, least: float | None = 1) -> Callable[[str], list]:
    """``number_list`` as an argparse ``type`` (the benchmark scripts' comma lists): argparse's one-line usage
    error instead of an OwlError."""

    def parse(text: str) -> list:
        try:
            return number_list(text, cast, least)
        except OwlError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (rounds, tokens, windows): an integer ≥ 1, or argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def _ints(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]."""
    return number_list(text)


def _int_or_all(text: str) -> int | None:
    """``--owl-nsamples``: a positive integer, or ``all`` (None)."""
    text = str(text).strip().lower()
    if text == "all":
        return None
    if text.isdigit():
        return int(text)
    raise OwlError(f"--owl-nsamples must be a positive integer or 'all', got {text!r}")


def _floats(text: str) -> list[float]:
    return number_list(text, float)


class Options:
    """The click options of one config model's fields, and the config built back from them.

    ``names`` overrides an option's spelling (``{"text": "--calib"}``; a bool may give ``--a/--b``),
    ``only``/``skip`` choose fields, ``defaults`` changes a default for this command, ``hidden`` hides
    options, ``aliases`` adds hidden old spellings (``{"prefill_length": "--prefill-chunk"}``) and
    ``parsers`` reads a field from a string (``--owl-nsamples all``).
    """

    def __init__(
        self,
        model: type[configs.Config],
        group: str,
        names: dict[str, str] | None = None,
        only: tuple[str, ...] | None = None,
        skip: tuple[str, ...] = (),
        defaults: dict[str, Any] | None = None,
        hidden: tuple[str, ...] = (),
        aliases: dict[str, str] | None = None,
        parsers: dict[str, Callable[[str], Any]] | None = None,
    ):
        self.model, self.group = model, group
        self.fields = {n: f for n, f in model.model_fields.items() if (only is None or n in only) and n not in skip}
        self.names = {n: (names or {}).get(n, "--" + (f.alias or n).replace("_", "-")) for n, f in self.fields.items()}
        self.defaults = {
            n: (defaults or {}).get(n, f.get_default(call_default_factory=True)) for n, f in self.fields.items()
        }
        self.hidden, self.aliases, self.parsers = hidden, aliases or {}, parsers or {}

    def _param(self, name: str, alias: bool = False) -> str:
        return f"{self.group}__{'alias__' if alias else ''}{name}"

    def __call__(self, fn: Callable) -> Callable:
        for name in reversed(list(self.fields)):
            spec, kw = self._option(name)
            fn = click.option(spec, self._param(name), **kw)(fn)
            if name in self.aliases:  # the old spelling: same type, hidden, unset unless given
                alias = {**kw, "hidden": True, "default": None, "show_default": False}
                fn = click.option(self.aliases[name], self._param(name, alias=True), **alias)(fn)
        return fn

    def _option(self, name: str) -> tuple[str, dict[str, Any]]:
        """The option's declaration (``--name`` or ``--on/--off``) and click keywords, from the field."""
        f, default = self.fields[name], self.defaults[name]
        kind = f.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
            kind = args[0]  # Optional[X]: X with a None default
        spec = self.names[name]
        kw: dict[str, Any] = {"help": f.description, "hidden": name in self.hidden, "show_default": default is not None}
        if name in self.parsers:
            text = ",".join(f"{x:g}" for x in default) if isinstance(default, list) else str(default)
            kw.update(type=str, default=None if default is None else text, show_default=default is not None)
        elif kind is bool:
            if "/" not in spec and not default:
                kw["is_flag"] = True
            elif "/" not in spec:
                spec = f"{spec}/--no-{spec[2:]}"
            kw["default"] = default
        elif typing.get_origin(kind) is typing.Literal:
            kw.update(type=click.Choice([str(a) for a in typing.get_args(kind)]), default=default)
        elif typing.get_origin(kind) is list:
            kw.update(multiple=True, default=tuple(default or ()), show_default=False)
        else:
            kw.update(type=kind if kind in (int, float, str) else str, default=default)
        return spec, kw

    def build(self, kwargs: dict[str, Any], **overrides: Any) -> Any:
        """Pop this model's options from a command's ``kwargs`` and build the (validated) config."""
        values: dict[str, Any] = {}
        for name in self.fields:
            value = kwargs.pop(self._param(name))
            alias = kwargs.pop(self._param(name, alias=True), None) if name in self.aliases else None
            if alias not in (None, ()):
                value = alias
            if name in self.parsers and value is not None:
                value = self.parsers[name](value)
            elif isinstance(value, tuple):
                value = list(value)
            values[name] = value
        values.update(overrides)
        names = {n: self.names[n].split("/")[0] for n in self.fields}
        return configs.build(self.model, values, names)


CALIBRATION = Options(configs.CalibrationConfig, "calibration", names={"text": "--calib"})
OWL = Options(
    configs.OwlConfig,
    "owl",
    names={"m": "--owl-m", "lambda_": "--owl-lambda", "nsamples": "--owl-nsamples"},
    skip=("tune",),  # a pipeline stage; `owl-deploy tune` is the command
    parsers={"nsamples": _int_or_all},
)
PRUNE = Options(configs.PruneConfig, "prune")
EVAL = Options(configs.EvalConfig, "evaluate")
EXPORT = Options(configs.ExportConfig, "export", skip=("require_ok",), hidden=("external_data_threshold",))
QUANTIZE = Options(
    configs.QuantizeConfig,
    "quantize",
    names={
        "scheme": "--quantize",
        "lm_head": "--int8-lm-head/--fp32-lm-head",
        "nsamples": "--calib-nsamples",
        "seqlen": "--calib-seqlen",
    },
)
EXPORT_CALIBRATION = Options(configs.CalibrationConfig, "calibration", names={"text": "--calib"}, only=("text",))
GENERATE = Options(configs.GenerateConfig, "generate")
SERVE = Options(configs.ServeConfig, "serve", parsers={"batch_sizes": _ints})
BENCH = Options(
    configs.BenchConfig,
    "bench",
    hidden=("seed", "gap_seconds", "measure_bandwidth"),
    aliases={"prefill_length": "--prefill-chunk"},
    parsers={"batch_sizes": _ints, "prompt_lengths": _ints},
)
RECOVER = Options(configs.RecoverConfig, "recover", skip=("enabled",))
RECOVER_EVAL = Options(
    configs.EvalConfig,
    "evaluate",
    names={"text": "--eval-text", "seqlen": "--eval-seqlen", "max_tokens": "--eval-tokens"},
)
TUNE_PRUNE = Options(configs.PruneConfig, "prune", only=("method", "sparsity", "nm"))
TUNE = Options(
    configs.TuneConfig,
    "tune",
    names={"m": "--grid-m", "lambda_": "--grid-lambda", "seqlen": "--heldout-seqlen", "nsamples": "--tune-nsamples"},
    parsers={"m": _floats, "lambda_": _floats},
)
