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
requests between its steps: whether admitting makes the steps themselves slower.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

from owl_deploy.bench.machine import engine_env, hardware_info, versions_info  # noqa: E402
from owl_deploy.errors import OwlError  # noqa: E402
from owl_deploy.io import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _ints(text: str, least: int = 1) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16], each at least ``least``; an argparse error otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"expected integers ≥ {least}, got {text!r}")
    return values


def measure(
    folder: str,
    slots: list[int],
    batches: list[int],
    fills: list[int],
    steps: int,
    rounds: int,
    prefill_every: list[int] | None = None,
) -> dict:
    """{key: {batch: [step seconds ...]}}: every round runs ``steps`` timed steps (after 3 untimed) per slot count x
    fill x prefill spacing x batch, fresh rows each round; the configurations alternate order round by round. A
    prefill spacing N > 0 runs one untimed prefill (of a new prompt, in the prefill engine, as a server admits a
    request) before every N-th timed step: what admitting costs the steps. The key is "SLOTS", then "/FILL" when
    several fills are measured and "/pN" when several spacings are."""
    from owl_deploy import runtime

    everys = prefill_every or [0]
    if max(fills) + 3 + steps >= min(slots):
        raise OwlError(f"--prompt {max(fills)} + {steps} steps do not fit in {min(slots)} slots")
    configs = [(s, f, n) for s in slots for f in fills for n in everys]
    key = {c: str(c[0]) + (f"/{c[1]}" if len(fills) > 1 else "") + (f"/p{c[2]}" if len(everys) > 1 else "")
           for c in configs}  # fmt: skip
    engines, prefills = {}, {}
    for s in slots:
        engines[s] = runtime.compile_decoder(folder, "deepsparse", batches, sequence_length=s, kv_cache="internal")
        for f in fills:
            prefills[s, f] = runtime.compile(
                folder, "deepsparse", sequence_length=s, prefill_length=f, kv_cache="internal", last_logits=True
            )
    rng = np.random.default_rng(0)
    vocab = min(engines[slots[0]].deployment.spec.vocab_size, 1000)  # any valid ids: the cost does not depend on them
    times: dict[str, dict[int, list[float]]] = {key[c]: {b: [] for b in batches} for c in configs}

    def prefill_new(prefill, n: int) -> None:
        """A fresh prompt of ``n`` random tokens through ``prefill`` (its cache then holds them)."""
        prefill.reset()
        prefill.forward([int(x) for x in rng.integers(0, vocab, n)])

    for r in range(rounds):
        for s, f, every in configs if r % 2 == 0 else configs[::-1]:
            decoder, prefill = engines[s], prefills[s, f]
            for b in batches:
                states = []
                for _ in range(b):
                    prefill_new(prefill, f)
                    states.append(prefill.state())
                tokens = [1] * b
                for _ in range(3):
                    decoder.step(tokens, states)
                for i in range(steps):
                    if every and i % every == every - 1:
                        prefill_new(prefill, f)
                    t0 = time.perf_counter()
                    decoder.step(tokens, states)
                    times[key[s, f, every]][b].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds} done", flush=True)
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
    every = settings["prefill_every"]
    if len(every) > 1 or not every[0]:
        return ""
    return f" (an untimed prefill of a new prompt every {every[0]} steps, as a server admits a request)"


def _head(key: str) -> str:
    slots, *rest = key.split("/")
    words = [f"{slots} slots"]
    for part in rest:
        if part.startswith("p"):
            words.append(f"a prefill every {part[1:]} steps" if part != "p0" else "no prefills")
        else:
            words.append(f"{part} cached")
    return ", ".join(words)


def markdown(res: dict) -> str:
    hw = res["hardware"]
    slots = list(res["steps"])
    batches = list(res["steps"][slots[0]])
    flags = [k for k, on in hw.get("flags", {}).items() if on]
    fills = " or ".join(map(str, res["settings"]["prompt"]))
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
    p.add_argument("--slots", type=_ints, default=[128, 256], help="cache lengths (sequence lengths) to compare")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16])
    p.add_argument("--prompt", type=_ints, default=[32], help="tokens in every row's cache before the timed steps "
                   "(several: each is a configuration)")  # fmt: skip
    p.add_argument("--steps", type=int, default=40, help="timed steps per round, slot count and batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--prefill-every",
        type=lambda t: _ints(t, least=0),
        default=[0],
        help="one untimed prefill before every N-th timed step (a server admitting a request; 0: never; several: "
        "each is a configuration)",
    )
    p.add_argument("--name", required=True, help="results go to benchmarks/results/batch-step-NAME.{json,md}")
    a = p.parse_args(argv)
    if not (Path(a.folder) / "model.onnx").is_file():
        p.error(f"{a.folder} is not a deployment folder (no model.onnx)")
    start, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    try:
        times = measure(a.folder, a.slots, a.batch_sizes, a.prompt, a.steps, a.rounds, a.prefill_every)
    except OwlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = {
        "name": a.name,
        "folder": a.folder,
        "settings": {
            **{k: getattr(a, k) for k in ("slots", "batch_sizes", "prompt", "steps", "rounds", "prefill_every")},
            "environment": engine_env(),
        },
        "steps": summarise(times),
        "seconds": round(time.perf_counter() - start, 1),
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "hardware": hardware_info(measure_bandwidth=False),
        "versions": versions_info(),
    }
    md = markdown(res)
    write_report(RESULTS / f"batch-step-{a.name}", res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
