"""The load client of ``benchmarks/serve_load.py``: streaming OpenAI completions kept ``c`` in flight, per-request
latencies, and where an owl-deploy server's wall time went (from its /metrics before and after a level).

Any OpenAI-compatible server that streams ``text_completion`` chunks can be driven (owl-deploy's, llama.cpp's
``llama-server``); nothing here starts or stops a server.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from owl_deploy.bench.machine import CpuMonitor

ARRIVALS = {
    "burst": "every level's clients start together",
    "staggered": "clients start spread over one c=1 request's time (then each sends its next request as its last ends)",
}


def start_offsets(concurrency: int, request_seconds: float | None, arrivals: str) -> list[float]:
    """When each client sends its first request: all at once (``burst``), or spread over one request's time.

    With equal prompts and lengths, clients that start together finish together and arrive together again:
    every request then queues behind the others' prefills (the burst case). Spread starts, they stay spread,
    as independent users are; ``staggered`` spaces them by a c=1 request's time over the concurrency.
    """
    if arrivals == "burst" or concurrency == 1 or not request_seconds:
        return [0.0] * concurrency
    return [w * request_seconds / concurrency for w in range(concurrency)]


async def one(
    client, url: str, model: str, prompt: str, max_tokens: int, extra: dict | None = None, retries: int = 1
) -> dict:
    """A streaming completion: text, tokens, time to first token, the gaps between tokens, errors.

    ``tokens`` is the server's ``usage.completion_tokens`` (owl-deploy: the ``include_usage`` chunk; llama-server:
    its last chunk), else the chunks with text. ``extra`` is added to the request body. A request the server
    closed its connection on *before any response* is sent again on a fresh connection, up to ``retries`` times,
    as OpenAI's own client does (it retries connection errors twice): that is a pooled keep-alive connection the
    server had just closed (seen from llama-server, always at c=1; why it closes them is not pinned down), not a
    request the server failed. Retries are counted (``retries``) and the time to first token runs from the
    first attempt. A request answered and then cut is an error, never re-sent.
    """
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}  # fmt: skip
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        times, parts, usage, answered = [], [], None, False
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                answered = True
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}", "retries": attempt}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        usage = data["usage"]
                    for choice in data.get("choices") or []:
                        if choice.get("text"):
                            parts.append(choice["text"])
                            times.append(time.perf_counter())
        except Exception as exc:  # a dropped connection is an error of the server under load
            stale = isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)) and not answered
            if stale and attempt < retries:
                continue
            return {"error": f"{type(exc).__name__}: {exc}", "retries": attempt}
        break
    return {
        "text": "".join(parts),
        "tokens": (usage or {}).get("completion_tokens", len(parts)),
        "usage": usage is not None,
        "ttft": times[0] - t0 if times else None,
        "itl": list(np.diff(times)) if len(times) > 1 else [],
        "seconds": time.perf_counter() - t0,
        "retries": attempt,
    }


async def level(
    url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    extra: dict | None = None,
    offsets: list[float] | None = None,
    server_pid: int | None = None,
) -> dict:
    """``concurrency`` clients, each sending its share of ``prompts`` one after another (the first after its
    ``offsets`` delay); then it stops. Besides the latencies: the cores this client used (on the server's cores,
    as on a 2-core machine it must) and, given ``server_pid``, the cores of the server's main thread (its HTTP
    and event loop; the engine computes in other threads)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        results: dict[int, dict] = {}

        async def worker(w: int) -> None:
            if offsets:
                await asyncio.sleep(offsets[w])
            for i in range(w, len(prompts), concurrency):
                results[i] = await one(client, url, model, prompts[i], max_tokens, extra)

        monitor = CpuMonitor()
        a = monitor.sample()
        loop_a = main_thread_seconds(server_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
        use = CpuMonitor.usage(a, monitor.sample())
        loop_b = main_thread_seconds(server_pid)
    ok = [r for r in results.values() if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    return {
        "concurrency": concurrency,
        "start_offsets": [round(x, 3) for x in offsets or []],
        "requests": len(prompts),
        "errors": [r["error"] for r in results.values() if "error" in r],
        "retried": sum(r.get("retries", 0) > 0 for r in results.values()),
        "wall_seconds": round(wall, 3),
        "output_tokens": tokens,
        "tokens_from_usage": sum(bool(r["usage"]) for r in ok),
        "aggregate_tokens_per_s": tokens / wall if wall else None,
        "per_stream_tokens_per_s": float(np.median([r["tokens"] / r["seconds"] for r in ok])) if ok else None,
        "request_seconds_p50": float(np.median([r["seconds"] for r in ok])) if ok else None,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
        "other_cpu": round(use["other"], 3),
        "client_cpu": round(use["own"], 3),
        "server_loop_cpu": round((loop_b - loop_a) / wall, 3) if loop_a is not None and loop_b is not None else None,
        "texts": {i: r.get("text") for i, r in sorted(results.items())},
    }


def main_thread_seconds(pid: int | None) -> float | None:
    """CPU seconds of a process's main thread (its thread id is its pid), or None."""
    if pid is None:
        return None
    import psutil

    try:
        return next((t.user_time + t.system_time for t in psutil.Process(pid).threads() if t.id == pid), None)
    except psutil.Error:
        return None


def engine_share(before: dict[str, float], after: dict[str, float], wall: float, tokens: int) -> dict:
    """Where a level's wall time went in an owl-deploy server, from its /metrics before and after: the engine
    thread's decode steps (how many, how full, how long) and prefills, and the share of the wall they fill. What
    is left is the server's HTTP and event loop, the client, and the engine waiting for work. ``engine_tokens_per_s``
    is the level's ``tokens`` over the engine's seconds alone: what the server would serve if nothing but its engine
    took time, so its ratio between two levels is the engine's own ceiling for that load."""
    d = {k: after[k] - before[k] for k in after}
    steps, prefills = d["decode_steps"], d["prefills"]
    busy = d["decode_seconds"] + d["prefill_seconds"]
    return {
        "decode_steps": int(steps),
        "mean_batch": (d["generated_tokens"] - prefills) / steps if steps else None,
        "step_ms": 1e3 * d["decode_seconds"] / steps if steps else None,
        "decode_seconds": round(d["decode_seconds"], 3),
        "prefills": int(prefills),
        "prefill_ms": 1e3 * d["prefill_seconds"] / prefills if prefills else None,
        "prefill_tokens_per_s": d["prefill_tokens"] / d["prefill_seconds"] if d["prefill_seconds"] else None,
        "prefill_seconds": round(d["prefill_seconds"], 3),
        "busy_share": busy / wall if wall else None,
        "engine_tokens_per_s": tokens / busy if busy else None,
    }
