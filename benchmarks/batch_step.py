#!/usr/bin/env python
"""Does a batched decode step cost the KV cache it reads? One deployment's ``Decoder`` steps timed at several
cache lengths (``--slots``), cache fills (``--prompt``: tokens already cached per row) and batch sizes, engine alone,
in process (no HTTP).

    .venv/bin/python benchmarks/batch_step.py out/deploy/sparse-int8 --slots 256 --prompt 32,160 --name NAME

A static-length graph holds ``slots`` positions per row; DeepSparse's internal caches are read as far as they are
filled. So both matter: halving the slots, or serving rows that hold fewer tokens, shortens a step by the caches'
share of it, and a smaller cache (fp16, int8) would shorten it the same way. (A server's rows hold the prompt plus
what they generated: 128-192 tokens in serve_load.py's load, not the 32 of this script's first recording.) Every
row holds its ``--prompt`` random tokens (one DeepSparse prefill per row) before the timed steps; rounds alternate
the configurations (the order reversed every round) so a slow minute of the VM hits all. Writes
benchmarks/results/batch-step-<name>.{json,md}: per configuration and batch the median step (ms) with its p10–p90;
the JSON's ``steps`` are keyed ``"SLOTS"`` for one fill, ``"SLOTS/FILL"`` for several. ``--prefill-every 0,4`` adds
configurations with an untimed prefill of a new prompt every 4 steps (``"/p4"``; ``"/p0"`` none), as a server admits
requests between its steps: whether admitting makes the steps themselves slower. A fill ``LO:HI`` spreads the rows'
fills evenly from LO to HI tokens (row i of b holds LO + i (HI - LO) / (b - 1)), as a server's rows hold requests
admitted at different times: ``--prompt 160,128:192`` compares equal rows with rows of the same mean fill, mixed.
``--busy-ms 0,4`` adds configurations where another process computes for 4 ms of CPU right after every timed step,
beside the next one (``"/b4"``), as a server's HTTP path and its client do on the same cores after each step's tokens:
what that costs an engine whose workers synchronise at every layer.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

from owl_deploy.bench.machine import engine_env, loadavg, run_context  # noqa: E402
from owl_deploy.cli_options import arg_list, positive_int  # noqa: E402
from owl_deploy.errors import OwlError  # noqa: E402
from owl_deploy.io import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _fills(text: str) -> list[int | str]:
    """``"32,128:192"`` -> [32, "128:192"]: tokens cached per row, or a LO:HI spread over the rows; an argparse
    error otherwise."""
    out: list[int | str] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(":")
        if len(parts) > 2 or not all(x.strip().isdigit() and int(x) >= 1 for x in parts):
            raise argparse.ArgumentTypeError(f"a fill is N or LO:HI tokens (each at least 1), got {item!r}")
        if len(parts) == 2 and int(parts[0]) > int(parts[1]):
            raise argparse.ArgumentTypeError(f"a spread of fills runs LO:HI with LO <= HI, got {item!r}")
        out.append(item if len(parts) == 2 else int(item))
    if not out:
        raise argparse.ArgumentTypeError(f"expected fills such as 32 or 128:192, got {text!r}")
    return out


def row_fills(fill: int | str, rows: int) -> list[int]:
    """The tokens each of ``rows`` rows holds for a ``--prompt`` item: all equal, or LO:HI spread evenly."""
    lo, _, hi = str(fill).partition(":")
    a, b = int(lo), int(hi or lo)
    return [a + round(i * (b - a) / (rows - 1)) if rows > 1 else round((a + b) / 2) for i in range(rows)]


def _spin(conn) -> None:
    """The busy process: for every number received, compute for that many ms of its own CPU time; None ends it."""
    while (ms := conn.recv()) is not None:
        end = time.process_time() + ms / 1e3
        while time.process_time() < end:
            pass


def measure(
    folder: str,
    slots: list[int],
    batches: list[int],
    fills: list[int | str],
    steps: int,
    rounds: int,
    prefill_every: list[int] | None = None,
    busy_ms: list[float] | None = None,
) -> dict:
    """{key: {batch: [step seconds ...]}}: every round runs ``steps`` timed steps (after 3 untimed) per slot count x
    fill x prefill spacing x batch, fresh rows each round; the configurations alternate order round by round. A
    prefill spacing N > 0 runs one untimed prefill (of a new prompt, in the prefill engine, as a server admits a
    request) before every N-th timed step: what admitting costs the steps. A busy time B > 0 has another process
    compute for B ms after every timed step, beside the next. The key is "SLOTS", then "/FILL" when several fills
    are measured, "/pN" when several spacings are and "/bB" when several busy times are."""
    from owl_deploy import runtime
    from owl_deploy.contract import LONG_PREFILL_LENGTH

    everys, busys = prefill_every or [0], busy_ms or [0]
    most = max(max(row_fills(f, 2)) for f in fills)
    if most + 3 + steps >= min(slots):
        raise OwlError(f"--prompt {most} + {steps} steps do not fit in {min(slots)} slots")
    configs = [(s, f, n, m) for s in slots for f in fills for n in everys for m in busys]
    key = {c: str(c[0]) + (f"/{c[1]}" if len(fills) > 1 else "") + (f"/p{c[2]}" if len(everys) > 1 else "")
           + (f"/b{c[3]:g}" if len(busys) > 1 else "") for c in configs}  # fmt: skip
    engines, prefills = {}, {}
    for s in slots:
        engines[s] = runtime.compile_decoder(folder, "deepsparse", batches, sequence_length=s, kv_cache="internal")
        prefills[s] = runtime.compile(  # chunked as the server's prefill is (runtime.internal_prefill_length)
            folder, "deepsparse", sequence_length=s, prefill_length=LONG_PREFILL_LENGTH, kv_cache="internal",
            last_logits=True,
        )  # fmt: skip
    rng = np.random.default_rng(0)
    vocab = min(engines[slots[0]].deployment.spec.vocab_size, 1000)  # any valid ids: the cost does not depend on them
    times: dict[str, dict[int, list[float]]] = {key[c]: {b: [] for b in batches} for c in configs}

    def prefill_new(prefill, n: int) -> None:
        """A fresh prompt of ``n`` random tokens through ``prefill`` (its cache then holds them)."""
        prefill.reset()
        prefill.forward([int(x) for x in rng.integers(0, vocab, n)])

    busy, child = mp.Pipe() if max(busys) > 0 else (None, None)
    spinner = mp.get_context("spawn").Process(target=_spin, args=(child,), daemon=True) if child else None
    if spinner:
        spinner.start()
    for r in range(rounds):
        for s, f, every, ms in configs if r % 2 == 0 else configs[::-1]:
            decoder, prefill = engines[s], prefills[s]
            for b in batches:
                states = []
                for n in row_fills(f, b):
                    prefill_new(prefill, n)
                    states.append(prefill.state())
                tokens = [1] * b
                for _ in range(3):
                    decoder.step(tokens, states)
                for i in range(steps):
                    if every and i % every == every - 1:
                        prefill_new(prefill, max(row_fills(f, b)))
                    t0 = time.perf_counter()
                    decoder.step(tokens, states)
                    times[key[s, f, every, ms]][b].append(time.perf_counter() - t0)
                    if ms:
                        busy.send(ms)
        print(f"round {r + 1}/{rounds} done", flush=True)
    if spinner:
        busy.send(None)
        spinner.join()
    return times


def summarise(times: dict[str, dict[int, list[float]]]) -> dict:
    out: dict = {}
    for s, per_batch in times.items():
        out[s] = {}
        for b, xs in per_batch.items():
            ms = np.asarray(xs) * 1e3
            out[s][str(b)] = {
                "median_ms": round(float(np.median(ms)), 2),
                "p10_ms": round(float(np.percentile(ms, 10)), 2),
                "p90_ms": round(float(np.percentile(ms, 90)), 2),
                "steps": len(xs),
            }
    return out


def _cell(x: dict) -> str:
    return f"{x['median_ms']:.2f} ({x['p10_ms']:.2f}–{x['p90_ms']:.2f})"


def _between(settings: dict) -> str:
    every, busy = settings["prefill_every"], settings.get("busy_ms", [0])
    out = ""
    if len(every) == 1 and every[0]:
        out += f" (an untimed prefill of a new prompt every {every[0]} steps, as a server admits a request)"
    if len(busy) == 1 and busy[0]:
        out += f" (another process computes {busy[0]:g} ms after every step, beside the next)"
    return out


def _head(key: str) -> str:
    slots, *rest = key.split("/")
    words = [f"{slots} slots"]
    for part in rest:
        if part.startswith("p"):
            words.append(f"a prefill every {part[1:]} steps" if part != "p0" else "no prefills")
        elif part.startswith("b"):
            words.append(f"{part[1:]} ms busy beside each step" if part != "b0" else "nothing beside")
        elif ":" in part:
            words.append(f"{part.replace(':', '–')} cached (spread over the rows)")
        else:
            words.append(f"{part} cached")
    return ", ".join(words)


def markdown(res: dict) -> str:
    hw = res["hardware"]
    slots = list(res["steps"])
    batches = list(res["steps"][slots[0]])
    flags = [k for k, on in hw.get("flags", {}).items() if on]
    fills = " or ".join(f.replace(":", "–") for f in map(str, res["settings"]["prompt"]))
    head = f"# Batched decode step vs KV cache length: {res['name']}\n\n"
    head += (
        f"Generated by `benchmarks/batch_step.py` in {res['seconds'] / 60:.1f} min on {hw.get('cpu_model')} "
        f"({hw.get('physical_cores')} cores; flags {', '.join(flags)}); deployment `{res['folder']}`, "
        f"DeepSparse with internal KV caches, {fills} tokens in every row's cache, "
        f"{res['settings']['rounds']} rounds x {res['settings']['steps']} timed steps{_between(res['settings'])}; "
        f"load average before "
        f"{res['loadavg_before']}, after {res['loadavg_after']}.\n\n"
    )
    rows = ["| batch | " + " | ".join(f"{_head(s)}: ms (p10–p90)" for s in slots) + " |",
            "|---:|" + "---:|" * len(slots)]  # fmt: skip
    for b in batches:
        cells = [_cell(res["steps"][s][b]) for s in slots]
        rows.append(f"| {b} | " + " | ".join(cells) + " |")
    versions = ", ".join(f"{k} {v}" for k, v in res["versions"].items())
    return head + "\n".join(rows) + f"\n\n- versions: {versions}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a deployment folder (owl-deploy export)")
    p.add_argument("--slots", type=arg_list(), default=[128, 256], help="cache lengths (sequence lengths) to compare")
    p.add_argument("--batch-sizes", type=arg_list(), default=[1, 4, 16])
    p.add_argument("--prompt", type=_fills, default=[32], help="tokens in every row's cache before the timed steps, "
                   "or LO:HI spread over the rows (several: each is a configuration)")  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=40, help="timed steps per round, slot count and batch")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument(
        "--prefill-every",
        type=arg_list(least=0),
        default=[0],
        help="one untimed prefill before every N-th timed step (a server admitting a request; 0: never; several: "
        "each is a configuration)",
    )
    p.add_argument(
        "--busy-ms",
        type=arg_list(float, least=0),
        default=[0.0],
        help="another process computes this many ms after every timed step, beside the next (a server's HTTP path "
        "and client; 0: nothing; several: each is a configuration)",
    )
    p.add_argument("--name", required=True, help="results go to benchmarks/results/batch-step-NAME.{json,md}")
    a = p.parse_args(argv)
    if not (Path(a.folder) / "model.onnx").is_file():
        p.error(f"{a.folder} is not a deployment folder (no model.onnx)")
    start, load_before = time.perf_counter(), loadavg()
    try:
        times = measure(a.folder, a.slots, a.batch_sizes, a.prompt, a.steps, a.rounds, a.prefill_every, a.busy_ms)
    except OwlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = {
        "name": a.name,
        "folder": a.folder,
        "settings": {
            **{
                k: getattr(a, k)
                for k in ("slots", "batch_sizes", "prompt", "steps", "rounds", "prefill_every", "busy_ms")
            },
            "environment": engine_env(),
        },
        "steps": summarise(times),
        **run_context(start, load_before),
    }
    md = markdown(res)
    write_report(RESULTS / f"batch-step-{a.name}", res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
