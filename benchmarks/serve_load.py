#!/usr/bin/env python
"""What a deployment serves under load: each server alone on loopback, driven at concurrency 1, 4 and 16.

    .venv/bin/python benchmarks/serve_load.py \\
        --server sparse-int8=deepsparse:out/int8/sparse-int8 \\
        --server dense-int8=onnxruntime:out/int8/dense-int8 \\
        --server dense-fp32=onnxruntime:out/int8/dense-fp32

Every server is an ``owl-deploy serve`` subprocess (one at a time: a server beside another ruins both). A bounded,
self-stopping client keeps ``c`` streaming requests in flight (each client sends its share of a fixed list of
prompts cut from the evaluation text, then stops; ``--arrivals staggered``, the default, spreads the clients' first
requests over one c=1 request's time, ``burst`` starts them together), and measures per request the time to the
first token and between tokens, and per level the aggregate output tokens/s. Greedy answers at every concurrency are
compared with the concurrency-1 answers for the same prompts: a batched server must answer exactly what it answers
alone. ``--rounds N`` runs the levels N times in turn within each server and adds, per server, the median
aggregate tok/s per level and the largest concurrency over c=1 round by round: on a machine whose speed drifts
in phases (``benchmarks/cpu_phases.py``) one level is a draw, the median over rounds is not; and it says whether the
CPU itself ran at two speeds across the levels (``bench.machine.speed_phases``, the bench's check). Each concurrency
runs once untimed first (4-token answers), so no batch size's first use falls in a timed level. Writes
benchmarks/results/serve-load-<name>.{json,md}.

llama.cpp's own server is a peer: ``--server LABEL=llama-server:PATH.gguf`` starts the C++ ``llama-server``
(continuous batching, ``--llama-slots`` parallel slots, default the largest concurrency) built by
``benchmarks/build_llama_server.sh`` from the llama.cpp of the installed llama-cpp-python (the GGUF, e.g.
``out/peers/smollm2-135m/llama.cpp-q8_0/model.gguf``, is prepared by ``benchmarks/peers.py``):

    .venv/bin/python benchmarks/serve_load.py \\
        --server dense-int8=onnxruntime:out/int8/dense-int8 \\
        --server llama.cpp-q8_0=llama-server:out/peers/smollm2-135m/llama.cpp-q8_0/model.gguf

It runs as ``llama-server -m GGUF --host 127.0.0.1 --port P -t THREADS -c SLOTS*CTX -np SLOTS --cont-batching
--no-cache-prompt --cache-ram 0 -a LABEL [--llama-arg flags]``, CTX = prompt + max tokens + a margin, rounded up to
256 as llama.cpp does (``--sequence-length``), so every slot holds a whole request; the owl-deploy servers get the
same context per sequence (``serve --sequence-length CTX``). Its requests add ``"temperature": 0`` (greedy:
llama.cpp's default is 0.8) and ``"cache_prompt": false``; with ``--no-cache-prompt --cache-ram 0`` neither a slot's
KV cache nor the RAM prompt cache is reused across requests, so every request pays its whole prefill (as in
``owl-deploy serve``) and TTFT stays comparable. The same client drives both servers: llama-server streams one
OpenAI ``text_completion`` chunk per token and puts the ``usage`` (completion tokens) in its last chunk. The
tokenizer that cuts the prompts is ``--tokenizer``, else the first ``owl-deploy`` folder, else the ``source``
recorded in the ``peer.json`` beside the GGUF.  Extra flags (``--llama-arg=--no-repack``: repacking crashed
llama-server 0c1e57098 at start on an AMX Xeon) and any ``LLAMA_ARG_*`` variables in the environment (llama-server
reads them as flags) are written into the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from owl_deploy.bench.load import ARRIVALS, engine_share, level, start_offsets  # noqa: E402
from owl_deploy.bench.machine import NoisePolicy, engine_env, loadavg, run_context, speed_phases  # noqa: E402
from owl_deploy.cli_options import arg_list, positive_int  # noqa: E402
from owl_deploy.io import write_report  # noqa: E402
from owl_deploy.serve.api import engine_counters  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LLAMA_SERVER = "llama-server"  # the ENGINE of --server LABEL=llama-server:PATH.gguf
#: what a llama-server request adds to the body (owl-deploy's API forbids unknown fields): greedy, no prompt cache
LLAMA_SERVER_BODY = {"temperature": 0.0, "cache_prompt": False}
CTX_MARGIN = 16  # tokens per slot beyond prompt + max tokens: a BOS, and llama.cpp's own tokenization of the prompt
CTX_PAD = 256  # llama.cpp rounds a slot's context up to a multiple of this


def slot_context(prompt_tokens: int, max_tokens: int) -> int:
    """The context every server gets per sequence: prompt + max tokens + margin, rounded up as llama.cpp does.

    owl-deploy's graphs attend over their whole static length and llama-server over its padded slot, so both
    serve at this length (the deployment's exported 512 would make every owl-deploy step read twice the cache).
    """
    need = prompt_tokens + max_tokens + CTX_MARGIN
    return -(-need // CTX_PAD) * CTX_PAD


def tokenizer_folder(given: str | None, servers: list[tuple[str, str, Path]]) -> Path:
    """``--tokenizer``, else the first owl-deploy folder, else the ``source`` in the peer.json beside a GGUF."""
    if given:
        return Path(given)
    for _, engine, target in servers:
        if engine != LLAMA_SERVER:
            return target
    for _, _, target in servers:
        peer = target.parent / "peer.json"
        source = json.loads(peer.read_text()).get("source") if peer.is_file() else None
        if source and Path(source).is_dir():
            return Path(source)
    raise SystemExit("serve-load: no tokenizer for the prompts: pass --tokenizer HF_FOLDER")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts_from(folder: Path, text: str, count: int, tokens: int) -> list[str]:
    """``count`` prompts of ``tokens`` tokens each, consecutive slices of the evaluation text."""
    from transformers import AutoTokenizer

    from owl_deploy.data import load_text

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(load_text(text)[: 40 * tokens * count], add_special_tokens=False)["input_ids"]
    if len(ids) < count * tokens:
        raise SystemExit(f"{text} is too short for {count} prompts of {tokens} tokens")
    return [tok.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def llama_server_binary(path: str | None) -> Path:
    """``--llama-server-bin``, else what benchmarks/build_llama_server.sh installs for this llama-cpp-python."""
    if path:
        binary = Path(path)
    else:
        from importlib.metadata import PackageNotFoundError, version

        from owl_deploy.assets import home

        try:
            release = version("llama_cpp_python")
        except PackageNotFoundError:
            raise SystemExit("llama-cpp-python is not installed: pass --llama-server-bin PATH") from None
        binary = home() / "tools" / f"llama-server-{release}" / "llama-server"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise SystemExit(f"no llama-server at {binary}: run benchmarks/build_llama_server.sh (or --llama-server-bin)")
    return binary


def llama_server_version(binary: Path) -> dict:
    """``llama-server --version``: 'version: X (build N, commit C)' (older: 'version: N (C)'), and its compiler."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    text = (out.stdout + out.stderr).strip()
    m = re.search(r"version:\s*(\S+)\s*\(build\s*(\d+),\s*commit\s*(\w+)\)", text)
    if m:
        return {"version": m[1], "build": int(m[2]), "commit": m[3], "text": text}
    m = re.search(r"version:\s*(\d+)\s*\((\w+)\)", text)
    return {"version": None, "build": int(m[1]) if m else None, "commit": m[2] if m else None, "text": text}


def llama_env() -> dict[str, str]:
    """The LLAMA_ARG_* variables llama-server reads as flags (e.g. LLAMA_ARG_REPACK=0 = --no-repack): recorded,
    since they change what runs without showing on its command line."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("LLAMA_ARG_")}


def _command(label: str, engine: str, target: Path, args, prompts: list[str], port: int) -> tuple[list[str], dict]:
    """The server's command line, and what the results record about it (llama-server: binary, version, flags)."""
    if engine != LLAMA_SERVER:
        cmd = [sys.executable, "-m", "owl_deploy", "serve", str(target), "--engine", engine, "--port", str(port)]
        cmd += ["--max-batch", str(max(args.concurrency)), "--max-queue", str(4 * len(prompts))]
        cmd += ["--model-name", label, "--sequence-length", str(args.sequence_length)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        flags = [f for lab, f in args.serve_arg if lab == label]
        # env: e.g. NM_FAST_VNNI_EMULATION, which changes DeepSparse's int8 on AVX2
        return cmd + flags, {"env": engine_env(), "serve_args": flags}
    binary = llama_server_binary(args.llama_server_bin)
    slots = args.llama_slots or max(args.concurrency)
    per_slot = args.sequence_length  # llama.cpp pads it to a multiple of CTX_PAD
    threads = args.threads or physical_cores()
    flags = ["-m", str(target), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
             "-c", str(slots * per_slot), "-np", str(slots), "--cont-batching", "--no-cache-prompt",
             "--cache-ram", "0", "-a", label, *args.llama_arg]  # fmt: skip
    info = {
        "binary": str(binary),
        "llama_cpp": llama_server_version(binary),
        "flags": flags,
        "slots": slots,
        "threads": threads,
        "ctx_per_slot_requested": per_slot,
        "request_body_extra": LLAMA_SERVER_BODY,
        "env": llama_env(),
    }
    return [str(binary), *flags], info


def run_server(label: str, engine: str, folder: Path, args, prompts: list[str]) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, info = _command(label, engine, folder, args, prompts, port)
    llama = engine == LLAMA_SERVER
    extra = LLAMA_SERVER_BODY if llama else None
    print(f"[serve-load] {label}: {' '.join(cmd if llama else cmd[3:])}", file=sys.stderr, flush=True)
    # llama-server logs every request: to a file, so that a full pipe nobody reads cannot stall it
    log = tempfile.TemporaryFile("w+") if llama else None  # noqa: SIM115 (closed in the finally below)
    streams = {"stdout": log, "stderr": subprocess.STDOUT} if llama else {"stderr": subprocess.PIPE}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, **streams)

    def output() -> str:
        if log is None:
            return proc.stderr.read()
        log.seek(0)
        return log.read()[-4000:]

    try:
        import httpx

        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{label}: the server exited {proc.returncode}: {output()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        health = httpx.get(f"{url}/health").json()
        if llama:
            props = httpx.get(f"{url}/props").json()
            info["props"] = {k: props.get(k) for k in ("total_slots", "model_path", "model_ftype", "build_info")}
            info["props"]["n_ctx_per_slot"] = props.get("default_generation_settings", {}).get("n_ctx")
        for c in dict.fromkeys(args.concurrency):  # warm-up, not recorded: each concurrency's batch sizes once
            asyncio.run(level(url, label, prompts[: max(2, c)], c, 4, extra))
        pid = None if llama else proc.pid
        levels = []
        single = None  # a c=1 request's seconds: the spacing of staggered starts
        scrape = (lambda: engine_counters(httpx.get(f"{url}/metrics").text)) if not llama else None
        for rnd, c in ((r, c) for r in range(args.rounds) for c in args.concurrency):
            offsets = start_offsets(c, single, args.arrivals)
            counters = scrape() if scrape else None
            levels.append(asyncio.run(level(url, label, prompts, c, args.max_tokens, extra, offsets, pid)))
            lv = levels[-1]
            lv["round"] = rnd
            if scrape:
                lv["engine"] = engine_share(counters, scrape(), lv["wall_seconds"], lv["output_tokens"])
            if c == 1 and single is None:
                single = lv["request_seconds_p50"]
            name = f"c={c}" + (f" (round {rnd + 1})" if args.rounds > 1 else "")
            print(f"[serve-load] {label} {name}: {_num(lv['aggregate_tokens_per_s'], '.1f')} tok/s aggregate, "
                  f"TTFT p50 {_num(lv['ttft_p50'], '.3f')} s p99 {_num(lv['ttft_p99'], '.3f')} s, ITL p50 "
                  f"{_num(lv['itl_p50'], '.1f', 1e3)} ms, {len(lv['errors'])} errors ({lv['retried']} retried), "
                  f"{lv['output_tokens']} tokens{_engine_line(lv.get('engine'))}", file=sys.stderr,
                  flush=True)  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if log is not None:
            log.close()
    base = levels[0]["texts"]
    for lv in levels:
        lv["wrong_answers"] = differing(lv["texts"], base)
    return {"label": label, "engine": engine, "folder": str(folder), "ready_seconds": round(ready, 1),
            "health": health, **({"llama_server": info} if llama else info), "levels": levels,
            "rounds": rounds_summary(levels), "exit_status": code}  # fmt: skip


def differing(texts: dict, base: dict) -> list:
    """The requests answered (not failed) with another text than in ``base``."""
    return [i for i, t in texts.items() if t is not None and t != base.get(i)]


def compare_to_reference(runs: list[dict], reference: str) -> None:
    """Record, per level of every server of the reference's deployment folder, the requests whose answer differs
    from the reference server's c=1 answer (the same deployment in another engine or serving plan must answer
    alike: greedy, same prompts)."""
    ref = next(r for r in runs if r["label"] == reference)
    base = ref["levels"][0]["texts"]
    for run in runs:
        if run["folder"] != ref["folder"]:
            continue
        for lv in run["levels"]:
            lv["differs_from_reference"] = differing(lv["texts"], base)
        run["reference"] = reference


def tokens_per_s_by_concurrency(levels: list[dict]) -> dict[int, list[float]]:
    """Each concurrency's aggregate tok/s over its levels, in their order (failed levels, None, left out)."""
    by_c: dict[int, list[float]] = {}
    for lv in levels:
        if lv["aggregate_tokens_per_s"] is not None:
            by_c.setdefault(lv["concurrency"], []).append(lv["aggregate_tokens_per_s"])
    return by_c


def rounds_summary(levels: list[dict]) -> dict | None:
    """With several rounds (levels interleaved within one server): per concurrency the median aggregate tok/s and its
    range, and per round the largest concurrency's tok/s over c=1's of the same round, with their median. None for
    one round. On a machine whose speed drifts in phases, the median over rounds is the figure to compare."""
    rounds = sorted({lv.get("round", 0) for lv in levels})
    if len(rounds) < 2:
        return None
    by_c = tokens_per_s_by_concurrency(levels)
    spread = {c: {"median": round(statistics.median(v), 1), "min": min(v), "max": max(v)} for c, v in by_c.items()}
    out = {"rounds": len(rounds), "tokens_per_s": spread}
    top = max(by_c, default=None)  # None: every level failed, which the record must still hold
    ratios = []
    for r in rounds:
        tps = {lv["concurrency"]: lv["aggregate_tokens_per_s"] for lv in levels if lv.get("round", 0) == r}
        if top is not None and top > 1 and tps.get(1) and tps.get(top):
            ratios.append(round(tps[top] / tps[1], 2))
    out["ratio"] = {"concurrency": top, "per_round": ratios,
                    "median": round(statistics.median(ratios), 2) if ratios else None}  # fmt: skip
    return out


def level_points(runs: list[dict]) -> list[dict]:
    """Every timed level as ``bench.machine.speed_phases`` takes a session-round: the session is one server's
    concurrency, ``relative`` its median aggregate tok/s over rounds divided by this level's (a slower level > 1).
    Concurrencies that ran once (or failed) are left out: there is no usual speed to compare with."""
    points = []
    for run in runs:
        by_c = tokens_per_s_by_concurrency(run["levels"])
        for lv in run["levels"]:
            tps, seen = lv["aggregate_tokens_per_s"], [t for t in by_c.get(lv["concurrency"], []) if t]
            if tps and len(seen) >= 2:
                points.append({"session": f"{run['label']} c={lv['concurrency']}",
                               "relative": round(statistics.median(seen) / tps, 4),
                               "seconds": lv["wall_seconds"]})  # fmt: skip
    return points


def _speed_line(speed: dict | None) -> list[str]:
    """The CPU's own speed across the levels (``--rounds`` ≥ 2; one round has nothing to compare)."""
    if not speed:
        return []
    if speed["two_speeds"]:
        where = ", ".join(speed["slow_sessions"])
        return ["", f"CPU speed: **two speeds** — {speed['slow_rounds']} of {speed['judged_rounds']} levels "
                f"{speed['slow_over_fast']}x slower than their concurrency's usual, in {where} (the host's phases: "
                "each median above mixes both speeds; `benchmarks/cpu_phases.py` times them)."]  # fmt: skip
    return ["", f"CPU speed: steady over {speed['judged_rounds']} levels (no group of them "
            f"{NoisePolicy().phase_ratio}x slower than their concurrency's usual)."]  # fmt: skip


def _engine_line(e: dict | None) -> str:
    if not e:
        return ""
    return (f"; engine busy {_num(e['busy_share'], '.0%')} of the wall: {e['decode_steps']} steps of "
            f"{_num(e['mean_batch'], '.1f')} rows, {_num(e['step_ms'], '.1f')} ms each, {e['prefills']} prefills of "
            f"{_num(e['prefill_ms'], '.1f')} ms ({_num(e.get('prefill_tokens_per_s'), '.0f')} prompt "
            "tok/s)")  # fmt: skip


def _level_name(lv: dict) -> str:
    """A level's concurrency, with its round when a run has several (``16 (r2)``)."""
    return f"{lv['concurrency']} (r{lv['round'] + 1})" if lv.get("round") else str(lv["concurrency"])


def _num(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return "—" if x is None else format(x * scale, fmt)


def markdown(res: dict) -> str:
    flags = ", ".join(k for k, v in res["hardware"]["flags"].items() if v)
    lines = [
        f"# Serving under load: {res['name']}",
        "",
        f"Generated by `benchmarks/serve_load.py` in {res['seconds'] / 60:.1f} min on {res['hardware']['cpu_model']} "
        f"({res['hardware']['physical_cores']} cores; flags {flags}). "
        f"{res['requests']} streaming requests per level, prompts of {res['prompt_tokens']} tokens from "
        f"`{res['text']}`, {res['max_tokens']} greedy tokens each, a context of {res['sequence_length']} tokens "
        f"per sequence in every server; {ARRIVALS[res['arrivals']]}; every server alone; load average before "
        f"{res['loadavg_before']}, after {res['loadavg_after']}.",
        "",
        "| server | c | aggregate tok/s | per stream tok/s | TTFT p50 / p99 s | ITL p50 / p99 ms | errors (retried) "
        "| answers ≠ c=1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = any(s.get("reference") for s in res["servers"])
    if ref:
        lines[-2] += " answers ≠ the reference's c=1 (reference) |"
        lines[-1] += "---:|"
    for s in res["servers"]:
        for lv in s["levels"]:
            diff = lv.get("differs_from_reference")
            tail = "" if not ref else f" {len(diff)} ({s['reference']}) |" if diff is not None else " — |"
            lines.append(
                f"| {s['label']} ({s['engine']}) | {_level_name(lv)} | "
                f"{_num(lv['aggregate_tokens_per_s'], '.1f')} | {_num(lv['per_stream_tokens_per_s'], '.1f')} | "
                f"{_num(lv['ttft_p50'], '.3f')} / {_num(lv['ttft_p99'], '.3f')} | "
                f"{_num(lv['itl_p50'], '.1f', 1e3)} / {_num(lv['itl_p99'], '.1f', 1e3)} | "
                f"{len(lv['errors'])} ({lv['retried']}) | {len(lv['wrong_answers'])} |{tail}"
            )
    summed = [s for s in res["servers"] if s.get("rounds")]
    if summed:
        lines += ["", "Levels interleaved within each server (`--rounds`): the median over rounds, and the largest "
                  "concurrency over c=1 round by round (the machine's speed drifts between levels; the median is the "
                  "figure to compare):", "",
                  "| server | rounds | aggregate tok/s per c: median (min–max) | largest c / c=1, per round | median |",
                  "|---|---:|---|---|---:|"]  # fmt: skip
        for s in summed:
            sm = s["rounds"]
            per_c = "; ".join(f"c={c}: {v['median']:.1f} ({v['min']:.1f}–{v['max']:.1f})"
                              for c, v in sm["tokens_per_s"].items())  # fmt: skip
            rat = sm["ratio"]
            lines.append(f"| {s['label']} ({s['engine']}) | {sm['rounds']} | {per_c} | "
                         f"{', '.join(f'{x:.2f}×' for x in rat['per_round']) or '—'} | "
                         f"{_num(rat['median'], '.2f')}{'×' if rat['median'] is not None else ''} |")  # fmt: skip
        lines += _speed_line(res.get("cpu_speed"))
    owl = [s for s in res["servers"] if "llama_server" not in s]
    if owl:

        def plan(s: dict) -> str:
            h = s["health"]
            env = "".join(f", {k}={v}" for k, v in (s.get("env") or {}).items() if k != "NM_DISABLE_ANALYTICS")
            env += "".join(f", `{f}`" for f in s.get("serve_args") or [])
            return (f"{s['label']} {h['batch_sizes']} (ready in {s['ready_seconds']} s, "
                    f"{h.get('kv_cache', 'external')} KV caches, prefill in {h['prefill_engine']}{env})")  # fmt: skip

        lines += ["", "Batch sizes compiled per server: " + "; ".join(plan(s) for s in owl), ""]
        timed = [(s, lv) for s in owl for lv in s["levels"] if lv.get("engine")]
        if timed:
            lines += ["Where each owl-deploy server's wall time went (its /metrics before and after the level; the "
                      "rest of the wall is HTTP, the event loop, the client on the same cores, and idle), and the "
                      "cores the server's main thread (HTTP, event loop) and the load client used beside the engine:",
                      "",
                      "| server | c | decode steps | rows per step | ms per step | prefills | ms per prefill "
                      "| engine busy | tok/s of the engine's time alone | server main thread, cores | client, cores |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for s, lv in timed:
                e = lv["engine"]
                cores = f"{_num(lv.get('server_loop_cpu'), '.2f')} | {_num(lv.get('client_cpu'), '.2f')}"
                lines.append(
                    f"| {s['label']} | {_level_name(lv)} | {e['decode_steps']} | "
                    f"{_num(e['mean_batch'], '.1f')} | {_num(e['step_ms'], '.1f')} | {e['prefills']} | "
                    f"{_num(e['prefill_ms'], '.1f')} | {_num(e['busy_share'], '.0%')} | "
                    f"{_num(e.get('engine_tokens_per_s'), '.1f')} | {cores} |"
                )
            lines.append("")
    for s in res["servers"]:
        if "llama_server" in s:
            ls = s["llama_server"]
            env = " ".join(f"{k}={v}" for k, v in (ls.get("env") or {}).items())
            lines += ["", f"{s['label']}: llama.cpp's `llama-server` {ls['llama_cpp']['version']} (commit "
                      f"{ls['llama_cpp']['commit']}), {ls['slots']} slots of {ls['props']['n_ctx_per_slot']} tokens, "
                      f"ready in {s['ready_seconds']} s: `{env + ' ' if env else ''}llama-server "
                      f"{' '.join(ls['flags'])}`; requests add `{json.dumps(ls['request_body_extra'])}`.",
                      ""]  # fmt: skip
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--server",
        action="append",
        required=True,
        metavar="LABEL=ENGINE:ODIR",
        help="ENGINE deepsparse/onnxruntime (owl-deploy serve), or llama-server:PATH.gguf",
    )
    p.add_argument("--concurrency", default="1,4,16", type=arg_list())
    p.add_argument("--requests", type=positive_int, default=32, help="requests per concurrency level")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="run the levels this many times in turn within each server, and report medians and the per-round ratio "
        "(for a machine whose speed drifts in phases) [1]",
    )
    p.add_argument("--prompt-tokens", type=positive_int, default=128)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--text", default="wiki")
    p.add_argument(
        "--arrivals",
        choices=sorted(ARRIVALS),
        default="staggered",
        help="clients start together (burst) or spread over one c=1 request's time [staggered]",
    )
    p.add_argument(
        "--sequence-length",
        type=positive_int,
        default=None,
        help="context per sequence of every server [prompt + max tokens + 16, rounded up to 256]",
    )
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--name", default="smollm2-135m")
    p.add_argument("--tokenizer", default=None, help="HF folder whose tokenizer cuts the prompts [see above]")
    p.add_argument("--llama-slots", type=positive_int, default=None, help="llama-server -np [the largest concurrency]")
    p.add_argument("--llama-server-bin", default=None, help="[what benchmarks/build_llama_server.sh installs]")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="LABEL=FLAG",
        type=lambda s: tuple(s.split("=", 1)),
        help="one more owl-deploy serve flag for the server LABEL, recorded (write LABEL=--kv-cache=external)",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="LABEL",
        help="count, for every server of the same deployment folder, the answers unlike this server's c=1 ones",
    )
    p.add_argument(
        "--llama-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more llama-server flag, recorded with the results (write --llama-arg=--no-repack)",
    )
    a = p.parse_args(argv)
    need = a.prompt_tokens + a.max_tokens + CTX_MARGIN
    a.sequence_length = a.sequence_length or slot_context(a.prompt_tokens, a.max_tokens)
    if a.sequence_length < need:
        p.error(f"--sequence-length {a.sequence_length} cannot hold a prompt, its max tokens and the margin ({need})")
    if a.arrivals == "staggered" and a.concurrency[0] != 1:
        p.error("--arrivals staggered spaces clients by a c=1 request's time: --concurrency must start with 1")
    servers = []
    for item in a.server:
        label, _, rest = item.partition("=")
        engine, _, folder = rest.partition(":")
        if engine == LLAMA_SERVER and not Path(folder).is_file():
            p.error(f"--server {item}: no GGUF file at {folder}")
        servers.append((label, engine, Path(folder).resolve() if engine == LLAMA_SERVER else Path(folder)))
    t0 = time.perf_counter()
    before = loadavg()
    labels = {label for label, _, _ in servers}
    for label, _ in a.serve_arg:
        if label not in labels:
            p.error(f"--serve-arg {label}=...: no --server {label}")
    folders = [folder for label, _, folder in servers if label in a.reference]
    for ref in a.reference:
        if ref not in labels:
            p.error(f"--reference {ref}: no --server {ref}")
    if len(set(folders)) < len(folders):
        p.error("--reference: one reference per deployment folder")
    prompts = prompts_from(tokenizer_folder(a.tokenizer, servers), a.text, a.requests, a.prompt_tokens)
    runs = [run_server(label, engine, folder, a, prompts) for label, engine, folder in servers]
    for ref in a.reference:
        compare_to_reference(runs, ref)
    speed = speed_phases(level_points(runs), NoisePolicy()) if a.rounds > 1 else None
    res = {
        "name": a.name,
        "servers": runs,
        "requests": a.requests,
        "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens,
        "sequence_length": a.sequence_length,
        "arrivals": a.arrivals,
        "text": a.text,
        "cpu_speed": speed,
        **run_context(t0, before),
        "argv": sys.argv[1:],
    }
    md = markdown(res)
    write_report(RESULTS / f"serve-load-{a.name}", res, md)
    print(md)


if __name__ == "__main__":
    main()
