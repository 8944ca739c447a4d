"""The server: batched decoding equals batch-1 decoding, the OpenAI API over real HTTP on loopback, bad input
and faults (malformed bodies, a full queue, a client that leaves, SIGTERM), and the real SmolLM2 (slow).

Fast tests run a tiny random LLaMA deployment (byte-level tokenizer, a small chat template) in a real
``owl-deploy serve`` subprocess on a free port.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from tiny_models import save_tiny

from owl_deploy import runtime
from owl_deploy.errors import OwlError
from owl_deploy.serve.api import engine_counters
from owl_deploy.serve.scheduler import Request, Sampling, Scheduler, sample

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def odir(tmp_path_factory) -> Path:
    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    root = tmp_path_factory.mktemp("serve")
    model = save_tiny("llama", root / "model")
    out = root / "tiny-odir"
    export_model(
        model, out, ExportConfig(sequence_length=SEQ, prefill_length=4, greedy_tokens=4), engines=("onnxruntime",)
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


def _greedy(odir: Path, engine: str, prompt: list[int], n: int) -> list[int]:
    session = runtime.compile(odir, engine, prefill_length=4)
    return list(session.generate(prompt, n))


# ---------------------------------------------------------------- batched decoding and the scheduler (no HTTP)
@pytest.mark.parametrize(
    ("engine", "kv_cache"), [("onnxruntime", "external"), ("deepsparse", "external"), ("deepsparse", "internal")]
)
def test_batched_decode_equals_batch_1_decode(odir, engine, kv_cache):
    """Four sequences of different lengths decoded together (batch 4, then 3 rows padded to 4) produce the
    greedy tokens each produces alone — with caches fed from numpy or kept inside DeepSparse, one per row."""
    prompts = [[5, 9, 17], [40, 41, 42, 43, 44, 45, 46], [100], [7, 8]]
    decoder = runtime.compile_decoder(odir, engine, [1, 4], kv_cache=kv_cache)
    assert decoder.kv_cache == kv_cache
    states, last = [], []
    for p in prompts:
        session = runtime.compile(odir, engine, prefill_length=4, kv_cache=kv_cache)
        last.append(int(np.argmax(session.forward(p)[-1])))
        states.append(session.state())
    got = [[t] for t in last]
    for step in range(6):
        k = 4 if step < 3 else 3  # the last steps run 3 rows on the batch-4 graph
        rows = decoder.step(last[:k], states[:k])
        last[:k] = [int(np.argmax(r)) for r in rows]
        for g, t in zip(got[:k], last[:k], strict=True):
            g.append(t)
    for p, g in zip(prompts, got, strict=True):
        assert g == _greedy(odir, engine, p, len(g)), (engine, p)


def test_internal_cache_decodes_to_the_end_of_the_context_as_onnxruntime(odir):
    """A sequence handed from a DeepSparse prefill (internal cache) to the batched decoder runs until its
    cache is full with ONNX Runtime's greedy tokens; one more step is refused; the two kinds of cache do not
    mix in one step."""
    prompt = [3, 14, 15, 92, 65, 35]
    session = runtime.compile(odir, "deepsparse", prefill_length=4, kv_cache="internal")
    token = int(np.argmax(session.forward(prompt)[-1]))
    state = session.state()
    assert state.internal is not None and state.num_cached == len(prompt) and session.num_cached == 0
    decoder = runtime.compile_decoder(odir, "deepsparse", [2], kv_cache="internal")
    assert decoder.capacity == SEQ - 1  # DeepSparse's internal cache holds one fewer (runtime.Session.capacity)
    got = [token]
    while state.num_cached < decoder.capacity:
        token = int(np.argmax(decoder.step([token], [state])[0]))
        got.append(token)
    assert got == _greedy(odir, "onnxruntime", prompt, decoder.capacity - len(prompt) + 1)
    with pytest.raises(OwlError, match="full"):
        decoder.step([token], [state])
    with pytest.raises(OwlError, match="internal KV caches"):
        decoder.step([1], [runtime.KVState(None, 0)])
    with pytest.raises(OwlError, match="DeepSparse feature"):
        runtime.compile_decoder(odir, "onnxruntime", [1], kv_cache="internal")


def test_serving_plan_keeps_caches_in_deepsparse_for_fp32_and_int8(odir, monkeypatch):
    """DeepSparse: internal caches and a DeepSparse prefill, fp32 and int8 alike (no DeepSparse plan keeps ONNX
    Runtime's int8 tokens, see serving_plan); external caches on int8 keep the ONNX Runtime prefill; ONNX
    Runtime: external; contradictions are one-line errors."""
    import owl_deploy.serve as serve_mod
    from owl_deploy.configs import ServeConfig

    plan = serve_mod.serving_plan
    assert plan(odir, ServeConfig()) == ("internal", "deepsparse")
    assert plan(odir, ServeConfig(engine="onnxruntime")) == ("external", "onnxruntime")
    assert plan(odir, ServeConfig(kv_cache="external")) == ("external", "deepsparse")
    with pytest.raises(OwlError, match="filled by a DeepSparse prefill"):
        plan(odir, ServeConfig(prefill_engine="onnxruntime", kv_cache="internal"))
    with pytest.raises(OwlError, match="DeepSparse feature"):
        plan(odir, ServeConfig(engine="onnxruntime", kv_cache="internal"))
    monkeypatch.setattr(serve_mod, "is_int8", lambda folder: True)
    assert plan(odir, ServeConfig()) == ("internal", "deepsparse")
    assert plan(odir, ServeConfig(kv_cache="external")) == ("external", "onnxruntime")
    assert plan(odir, ServeConfig(engine="onnxruntime")) == ("external", "onnxruntime")


def test_sampling_greedy_seeded_and_nucleus():
    logits = np.array([0.0, 3.0, 2.9, -5.0])
    assert sample(logits, Sampling(), np.random.default_rng(0)) == 1
    draws = [sample(logits, Sampling(temperature=1.0, seed=3), np.random.default_rng(3)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same draw
    nucleus = {sample(logits, Sampling(temperature=1.0, top_p=0.5), np.random.default_rng(i)) for i in range(50)}
    assert nucleus == {1}  # top_p 0.5: only the most likely token is in the nucleus
    wide = {sample(logits, Sampling(temperature=1.0), np.random.default_rng(i)) for i in range(200)}
    assert {1, 2} <= wide  # without a nucleus both likely tokens are drawn


def _drain(req: Request) -> tuple[list[int], list[float]]:
    tokens, times = [], []
    while True:
        kind, value = req.events.get(timeout=60)
        if kind != "token":
            assert (kind, value) == ("done", "length"), (kind, value)
            return tokens, times
        tokens.append(value)
        times.append(time.perf_counter())


@pytest.mark.parametrize(("engine", "kv_cache"), [("onnxruntime", "external"), ("deepsparse", "internal")])
def test_scheduler_admits_a_new_request_while_another_decodes(odir, engine, kv_cache):
    """A request arriving while another is decoding gets its first token long before the other's last
    (it waits for a step, not for the other answer); 5 requests through 2 rows all equal their batch-1
    greedy tokens in ONNX Runtime."""
    prefill = runtime.compile(odir, engine, prefill_length=4, kv_cache=kv_cache)
    decoder = runtime.compile_decoder(odir, engine, [1, 2], kv_cache=kv_cache)
    sched = Scheduler(prefill, decoder, max_batch=2, max_queue=8)
    sched.start()
    try:
        first = Request([5, 9, 17], 40)
        sched.submit(first)
        assert first.events.get(timeout=60)[0] == "token"  # the first is decoding now
        second = Request([40, 41, 42], 5)
        sched.submit(second)
        second_tokens, second_times = _drain(second)
        first_tokens, first_times = _drain(first)
        assert second_times[0] < first_times[-1] and len(first_tokens) == 39
        assert second_tokens == _greedy(odir, "onnxruntime", [40, 41, 42], 5)
        prompts = [[100, 101], [7, 8, 9, 10, 11], [3], [60, 61, 62, 63], [9, 9]]
        reqs = [Request(p, 12) for p in prompts]
        for r in reqs:
            sched.submit(r)
        for p, r in zip(prompts, reqs, strict=True):
            assert _drain(r)[0] == _greedy(odir, "onnxruntime", p, 12)
    finally:
        sched.stop(10)


@pytest.mark.parametrize(("bound", "order"), [(None, "PPPPS"), (1, "PSPSPSPS")])
def test_scheduler_bounds_the_prefills_between_two_steps(odir, bound, order):
    """Four requests waiting at once: by default all four prompts are prefilled before the first step (the running
    streams stall for all of them); ``prefills_per_step=1`` puts a decode step after each prefill. The answers are
    the batch-1 greedy tokens either way."""
    prefill = runtime.compile(odir, "onnxruntime", prefill_length=4)
    decoder = runtime.compile_decoder(odir, "onnxruntime", [1, 2, 4])
    log: list[str] = []
    sched = Scheduler(prefill, decoder, max_batch=4, max_queue=8, prefills_per_step=bound)
    sched.on_prefill = lambda tokens, seconds: log.append("P")
    sched.on_step = lambda active, waiting, seconds: log.append("S")
    prompts = [[100, 101], [7, 8, 9, 10, 11], [3], [60, 61, 62, 63]]
    reqs = [Request(p, 6) for p in prompts]
    for r in reqs:
        sched.submit(r)  # all waiting before the engine thread starts
    sched.start()
    try:
        for p, r in zip(prompts, reqs, strict=True):
            assert _drain(r)[0] == _greedy(odir, "onnxruntime", p, 6)
    finally:
        sched.stop(10)
    assert "".join(log).startswith(order)
    assert sched.info()["prefills_per_step"] == (bound or 4)
    with pytest.raises(OwlError, match="at least 1"):
        Scheduler(prefill, decoder, max_batch=4, max_queue=8, prefills_per_step=0)


# ---------------------------------------------------------------- a real server on loopback
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(odir: Path, *args: str):
    port = _free_port()
    cmd = [sys.executable, "-m", "owl_deploy", "serve", str(odir), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # compiling: generous on a busy 2-core machine
        loading_seen = False
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited {proc.returncode}: {proc.stderr.read()}")
            try:
                r = httpx.get(f"{base}/health", timeout=2)
                if r.status_code == 200:
                    break
                loading_seen |= r.json()["status"] == "loading"
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(odir):
    with running(odir, "--engine", "onnxruntime", "--max-batch", "4", "--max-queue", "8") as (base, _):
        yield base


def _completion(base: str, prompt: str, model: str = "tiny-odir", **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, **kw}, timeout=60)


def _stream(base: str, path: str, body: dict) -> list[dict | str]:
    events = []
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_health_and_a_greedy_completion(server, odir):
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["id"] == "tiny-odir"
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["batch_sizes"] == [1, 2, 4] and health["max_batch"] == 4
    r = _completion(server, "The capital of France is", max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(odir)
    ids = tok("The capital of France is")["input_ids"]
    want = _greedy(odir, "onnxruntime", ids, 12)
    stop = want.index(tok.eos_token_id) + 1 if tok.eos_token_id in want else len(want)
    assert body["choices"][0]["text"] == tok.decode(want[:stop], skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": stop, "total_tokens": len(ids) + stop}
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")


def test_streaming_equals_the_whole_answer(server):
    whole = _completion(server, "Once upon a time", max_tokens=16).json()["choices"][0]["text"]
    events = _stream(server, "/v1/completions", {"model": "tiny-odir", "prompt": "Once upon a time", "max_tokens": 16})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop") and len(chunks) > 2


def test_chat_completions_use_the_chat_template(server):
    body = {"model": "tiny-odir", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and r.json()["usage"]["prompt_tokens"] == len(b"user: hi\nassistant:")
    events = _stream(server, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == msg["content"]


def test_seeded_sampling_is_reproducible(server):
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = (_completion(server, "Hello", **kw).json()["choices"][0]["text"] for _ in range(2))
    assert a == b
    assert _completion(server, "Hello", max_tokens=12, temperature=1.0, seed=8).status_code == 200


BAD = [
    (b"{not json", "not valid JSON"),
    (
        json.dumps({"model": "tiny-odir", "prompt": "x", "frobnicate": 1}).encode(),
        "frobnicate: unknown key (allowed: model, max_tokens",
    ),
    (json.dumps({"model": "tiny-odir", "prompt": "x" * (SEQ + 10)}).encode(), "the prompt has"),
    (json.dumps({"model": "tiny-odir", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens: must be >= 1"),
    (json.dumps({"model": "tiny-odir", "prompt": "hello", "max_tokens": SEQ}).encode(), "past the context"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), "unknown model 'gpt-4'"),
    (json.dumps({"model": "tiny-odir", "prompt": ["a", "b"]}).encode(), "one prompt per request"),
    (json.dumps({"model": "tiny-odir", "prompt": "x", "n": 2}).encode(), "n: must be"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_requests_are_400_openai_errors_and_the_server_keeps_serving(server, body, message):
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert _completion(server, "still here", max_tokens=2).status_code == 200


def test_metrics_count_requests_and_time_tokens(server):
    before = engine_counters(httpx.get(f"{server}/metrics").text)
    usage = _completion(server, "metrics", max_tokens=4).json()["usage"]
    text = httpx.get(f"{server}/metrics").text
    assert 'owl_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "owl_time_to_first_token_seconds_bucket" in text and "owl_inter_token_latency_seconds_count" in text
    assert "owl_generated_tokens_total" in text and "owl_queue_depth" in text
    # the engine's own time: one prefill, and the 3 decode steps after its first token (serve_load.py's busy share)
    counts = engine_counters(text)
    assert counts["prefills"] >= 1 and counts["decode_steps"] >= 3 and counts["prefill_seconds"] > 0, counts
    assert counts["prefill_tokens"] - before["prefill_tokens"] == usage["prompt_tokens"] > 0  # the prompt, prefilled


def test_step_sync_returns_once_the_event_loop_has_run_what_the_step_reported():
    import asyncio

    from owl_deploy.serve import loop_sync

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    seen: list[int] = []
    tasks: list[asyncio.Task] = []

    async def setup() -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()

        async def consume() -> None:  # as a stream's task takes its tokens
            while True:
                seen.append(await q.get())

        tasks.append(loop.create_task(consume()))
        return q

    q = asyncio.run_coroutine_threadsafe(setup(), loop).result()
    for i in range(5):  # what the engine thread reports after a step
        loop.call_soon_threadsafe(q.put_nowait, i)
    loop_sync(lambda: loop)()
    assert seen == [0, 1, 2, 3, 4]
    loop.call_soon_threadsafe(time.sleep, 0.5)  # a loop busy elsewhere: the engine waits 20 ms at most
    t0 = time.perf_counter()
    loop_sync(lambda: loop, timeout=0.02)()
    assert time.perf_counter() - t0 < 0.3

    async def finish() -> None:
        tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(finish(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
    loop_sync(lambda: loop)()  # a closed loop, or none yet: nothing to wait for
    loop_sync(lambda: None)()


def test_a_server_with_step_sync_answers_as_without(server, odir):
    want = _completion(server, "The capital of", max_tokens=6, temperature=0).json()["choices"][0]["text"]
    with running(odir, "--engine", "onnxruntime", "--max-batch", "4", "--step-sync") as (base, _):
        assert _completion(base, "The capital of", max_tokens=6, temperature=0).json()["choices"][0]["text"] == want
        events = _stream(base, "/v1/completions", {"model": "tiny-odir", "prompt": "The capital of", "max_tokens": 6,
                                                       "temperature": 0})  # fmt: skip
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want


def test_a_full_queue_answers_429_with_retry_after(slow_odir):
    # the slow model: each request must outlast the arrival of the six (the tiny one answers in milliseconds)
    args = ("--engine", "onnxruntime", "--max-batch", "1", "--batch-sizes", "1", "--max-queue", "1")
    with running(slow_odir, *args) as (base, _):
        results = []

        def call():
            results.append(_completion(base, "busy " * 3, model="slow-odir", max_tokens=40))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 429 in codes and 200 in codes, codes
        refused = next(r for r in results if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        assert _completion(base, "after", model="slow-odir", max_tokens=2).status_code == 200


@pytest.fixture(scope="module")
def slow_odir(tmp_path_factory) -> Path:
    """A wider tiny model (~50M weights, context 256): slow enough that a stream lasts seconds."""
    from owl_deploy.configs import ExportConfig
    from owl_deploy.export import export_model

    root = tmp_path_factory.mktemp("serve_slow")
    model = save_tiny("llama", root / "model", hidden=768, layers=8)
    out = root / "slow-odir"
    export_model(model, out, ExportConfig(sequence_length=256, greedy_tokens=0), engines=("onnxruntime",))
    return out


def test_a_client_that_leaves_frees_its_row_at_once(slow_odir):
    """One row: a stream abandoned after its first chunk must not hold the row for its remaining tokens."""
    with running(slow_odir, "--engine", "onnxruntime", "--max-batch", "1", "--batch-sizes", "1") as (base, _):
        body = {"model": "slow-odir", "prompt": "leaving", "max_tokens": 240, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        r = httpx.post(
            f"{base}/v1/completions", json={"model": "slow-odir", "prompt": "next", "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        generated = float(
            next(m for m in metrics.splitlines() if m.startswith("owl_generated_tokens_total")).split()[-1]
        )
        assert generated < 120  # the abandoned request stopped far short of its 240 tokens


def test_sigterm_drains_in_flight_requests_and_exits_0(odir):
    with running(odir, "--engine", "onnxruntime", "--max-batch", "2") as (base, proc):
        result = {}

        def call():
            result["r"] = _completion(base, "drain me", max_tokens=40)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0, proc.stderr.read()
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] > 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)


def test_a_bad_folder_is_one_line_and_no_server(tmp_path):
    res = subprocess.run([sys.executable, "-m", "owl_deploy", "serve", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "has no model.onnx" in res.stderr


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_served_batched_equals_batch_1(smollm2_export):
    """The real SmolLM2-135M in DeepSparse (internal caches, batched): four concurrent greedy requests, each
    equal to its batch-1 greedy continuation in ONNX Runtime; a chat completion through the model's own
    template. (The session's one SmolLM2 export, shared with test_export.py.)"""
    odir, _ = smollm2_export
    serve_args = ("--max-batch", "4", "--batch-sizes", "1,4", "--model-name", "smol", "--sequence-length", "128")
    with running(odir, "--engine", "deepsparse", *serve_args) as (base, _):
        prompts = ["The capital of France is", "Water boils at", "The largest planet is", "def add(a, b):"]
        results: dict[str, str] = {}

        def call(p):
            r = httpx.post(f"{base}/v1/completions", json={"model": "smol", "prompt": p, "max_tokens": 16}, timeout=300)
            results[p] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(odir)
        assert httpx.get(f"{base}/health").json()["kv_cache"] == "internal"  # fp32 in DeepSparse
        reference = runtime.compile(odir, "onnxruntime", sequence_length=128, prefill_length=4)  # the served context
        for p in prompts:
            want = list(reference.generate(tok(p)["input_ids"], 16))
            if tok.eos_token_id in want:
                want = want[: want.index(tok.eos_token_id) + 1]
            assert results[p] == tok.decode(want, skip_special_tokens=True), p
        chat = {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        r = httpx.post(f"{base}/v1/chat/completions", json={**chat, "max_tokens": 20}, timeout=300)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- the load client (owl_deploy.bench.load)
def test_load_client_staggers_starts_and_every_answer_matches_c1(server):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import asyncio

    import serve_load

    from owl_deploy.bench import load

    assert serve_load.slot_context(128, 64) == 256 and serve_load.slot_context(128, 113) == 512
    assert load.start_offsets(4, 2.0, "burst") == [0.0] * 4
    assert load.start_offsets(4, 2.0, "staggered") == [0.0, 0.5, 1.0, 1.5]
    assert load.start_offsets(1, 2.0, "staggered") == [0.0]
    prompts = [f"Prompt number {i} says" for i in range(6)]
    one = asyncio.run(load.level(server, "tiny-odir", prompts, 1, 8))
    offsets = load.start_offsets(3, one["request_seconds_p50"], "staggered")
    before = engine_counters(httpx.get(f"{server}/metrics").text)
    three = asyncio.run(load.level(server, "tiny-odir", prompts, 3, 8, offsets=offsets))
    after = engine_counters(httpx.get(f"{server}/metrics").text)
    share = load.engine_share(before, after, three["wall_seconds"], three["output_tokens"])
    # six prompts: six prefills (each gives a first token), then 7 tokens each from steps of 1 to 3 rows
    assert share["prefills"] == 6 and 6 * 7 / 3 <= share["decode_steps"] <= 6 * 7, share
    assert share["mean_batch"] == pytest.approx(6 * 7 / share["decode_steps"]) and 0 < share["busy_share"] < 1
    assert share["engine_tokens_per_s"] > three["aggregate_tokens_per_s"]  # the engine is part of the wall
    assert share["prefill_tokens_per_s"] > 0 and "prompt tok/s)" in serve_load._engine_line(share)
    assert three["client_cpu"] > 0 and three["server_loop_cpu"] is None  # no server pid given
    assert not one["errors"] and not three["errors"] and three["start_offsets"] == [round(x, 3) for x in offsets]
    assert three["texts"] == one["texts"] and all(t is not None for t in one["texts"].values())
    assert three["wall_seconds"] >= offsets[-1]  # the last client really waited for its start


def test_load_llama_server_command_carries_extra_flags_and_records_llama_env(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import serve_load

    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho 'version: 7 (abc123)'\n")
    binary.chmod(0o755)
    monkeypatch.setenv("LLAMA_ARG_REPACK", "0")
    monkeypatch.setenv("NOT_LLAMA", "1")
    args = argparse.Namespace(llama_server_bin=str(binary), llama_slots=None, concurrency=[1, 4], sequence_length=256,
                              threads=2, llama_arg=["--no-repack", "--flash-attn=off"],
                              serve_arg=[("s", "--kv-cache=external")])  # fmt: skip
    cmd, info = serve_load._command("q8", serve_load.LLAMA_SERVER, tmp_path / "m.gguf", args, ["p"], 8080)
    assert cmd[0] == str(binary) and cmd[-2:] == ["--no-repack", "--flash-attn=off"] and "-np" in cmd
    assert info["env"] == {"LLAMA_ARG_REPACK": "0"} and info["flags"][-2:] == ["--no-repack", "--flash-attn=off"]

    # an owl-deploy server records the engine variables instead (DeepSparse's emulated int8 mode on AVX2)
    monkeypatch.setenv("NM_FAST_VNNI_EMULATION", "1")
    cmd, info = serve_load._command("s", "deepsparse", tmp_path / "odir", args, ["p"], 8080)
    assert cmd[1:4] == ["-m", "owl_deploy", "serve"] and info["env"]["NM_FAST_VNNI_EMULATION"] == "1"
    assert "LLAMA_ARG_REPACK" not in info["env"] and "NOT_LLAMA" not in info["env"]
    assert cmd[-1] == "--kv-cache=external" and info["serve_args"] == ["--kv-cache=external"]  # only for its label
    assert serve_load._command("t", "deepsparse", tmp_path / "odir", args, ["p"], 8080)[1]["serve_args"] == []


def test_load_reference_counts_answers_that_differ_only_within_one_deployment():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load

    def run(label, folder, *levels):
        return {"label": label, "folder": folder, "levels": [{"texts": dict(enumerate(t))} for t in levels]}

    runs = [run("ort", "a", ["x", "y"], ["x", "y"]), run("ds", "a", ["x", "z"], ["x", None]), run("o", "b", ["q", "r"])]
    serve_load.compare_to_reference(runs, "ort")
    assert [lv["differs_from_reference"] for lv in runs[1]["levels"]] == [[1], []]  # a failed request is not counted
    assert runs[0]["levels"][0]["differs_from_reference"] == [] and "differs_from_reference" not in runs[2]["levels"][0]


def test_load_rounds_give_medians_and_the_ratio_round_by_round():
    """``--rounds``: the levels run in turn several times within a server; per concurrency the median and range, and
    the largest concurrency over c=1 of the same round (a machine drifting in phases moves both levels of a round)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load

    def lv(c, r, tps):
        return {"concurrency": c, "round": r, "aggregate_tokens_per_s": tps}

    levels = [lv(1, 0, 100.0), lv(16, 0, 350.0), lv(1, 1, 80.0), lv(16, 1, 300.0), lv(1, 2, 110.0), lv(16, 2, 330.0)]
    sm = serve_load.rounds_summary(levels)
    assert sm["rounds"] == 3 and sm["tokens_per_s"][16] == {"median": 330.0, "min": 300.0, "max": 350.0}
    assert sm["ratio"] == {"concurrency": 16, "per_round": [3.5, 3.75, 3.0], "median": 3.5}
    assert serve_load.rounds_summary(levels[:2]) is None  # one round: nothing to summarise
    failed = [lv(1, 0, None), lv(16, 0, 350.0), lv(1, 1, 90.0), lv(16, 1, 270.0)]
    assert serve_load.rounds_summary(failed)["ratio"]["per_round"] == [3.0]  # a round without its c=1 figure: left out
    # every level failed (a server that answered nothing): the record still gets written
    dead = serve_load.rounds_summary([lv(1, 0, None), lv(16, 0, None), lv(1, 1, None), lv(16, 1, None)])
    assert dead == {"rounds": 2, "tokens_per_s": {}, "ratio": {"concurrency": None, "per_round": [], "median": None}}
    assert serve_load._level_name(lv(16, 1, 0)) == "16 (r2)" and serve_load._level_name(lv(16, 0, 0)) == "16"


def test_load_rounds_see_the_cpus_speed_phases():
    """A VM phase slows every level it covers, whatever its server or concurrency: with ``--rounds`` the levels
    slower than their concurrency's usual, in two or more sessions (server × concurrency), are reported as two
    speeds; one slow level, one server's quirk, or a concurrency that ran once is not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load

    from owl_deploy.bench.machine import NoisePolicy, speed_phases

    def run(label, tps_by_round, once=None):
        levels = [{"concurrency": c, "round": r, "aggregate_tokens_per_s": t, "wall_seconds": 2.0}
                  for r, row in enumerate(tps_by_round) for c, t in zip((1, 16), row, strict=True)]  # fmt: skip
        if once:
            levels.append({"concurrency": 4, "round": 0, "aggregate_tokens_per_s": once, "wall_seconds": 2.0})
        return {"label": label, "levels": levels}

    steady = [run("ds", [(100, 330), (98, 335), (101, 328)], once=200), run("ort", [(50, 160), (51, 158), (49, 161)])]
    points = serve_load.level_points(steady)
    assert len(points) == 12 and {p["session"] for p in points} == {"ds c=1", "ds c=16", "ort c=1", "ort c=16"}
    assert not speed_phases(points, NoisePolicy())["two_speeds"]
    slow = [run("ds", [(100, 330), (75, 250), (101, 328)]), run("ort", [(50, 160), (51, 158), (38, 120)])]
    sp = speed_phases(serve_load.level_points(slow), NoisePolicy())
    assert (
        sp["two_speeds"]
        and sp["slow_rounds"] == 4
        and sp["slow_sessions"] == ["ds c=1", "ds c=16", "ort c=1", "ort c=16"]
    )
    md = "".join(serve_load._speed_line(sp))
    assert "**two speeds** — 4 of 12 levels 1.3" in md and "ds c=16" in md
    assert "steady over 12 levels" in "".join(serve_load._speed_line(speed_phases(points, NoisePolicy())))
    assert serve_load._speed_line(None) == []  # one round: nothing judged
    quirk = [run("ds", [(100, 330), (75, 328), (101, 331)]), run("ort", [(50, 160), (51, 158), (49, 161)])]
    assert not speed_phases(serve_load.level_points(quirk), NoisePolicy())["two_speeds"]  # one slow session only
    failed = [run("ds", [(None, 330), (98, None)])]
    assert serve_load.level_points(failed) == []  # each concurrency has one figure left: no usual speed


def _raw_server(behaviours: list[str]):
    """A loopback HTTP server on raw sockets whose n-th connection reads one request and then does
    ``behaviours[n]``: ``close`` (no response: a keep-alive connection the server had closed), ``ok`` (one
    streamed completion), ``cut`` (headers and half a body, then closed)."""

    body = (b'data: {"choices": [{"text": "Hi"}]}\n\n'
            b'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n')  # fmt: skip
    seen: list[str] = []

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        what = behaviours[min(len(seen), len(behaviours) - 1)]
        seen.append(what)
        if what != "close":
            size = len(body) * (2 if what == "cut" else 1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size + body)  # fmt: skip
            await writer.drain()
        writer.close()

    return handle, seen


@pytest.mark.parametrize(
    ("behaviours", "want_error", "want_retries", "want_seen"),
    [
        (["close", "ok"], None, 1, ["close", "ok"]),  # a stale connection: sent again, answered
        (["close", "close", "ok"], "RemoteProtocolError", 1, ["close", "close"]),  # one retry only
        (["cut", "ok"], "RemoteProtocolError", 0, ["cut"]),  # answered, then cut: an error, never re-sent
    ],
)
def test_load_client_resends_only_a_request_the_server_never_answered(behaviours, want_error, want_retries, want_seen):
    import asyncio

    from owl_deploy.bench import load

    async def run() -> dict:
        handle, seen = _raw_server(behaviours)
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient() as client:
            res = await load.one(client, url, "m", "prompt", 4)
        srv.close()
        await srv.wait_closed()
        return {**res, "seen": seen}

    res = asyncio.run(run())
    assert res["retries"] == want_retries and res["seen"] == want_seen
    if want_error is None:
        assert "error" not in res and res["text"] == "Hi" and res["tokens"] == 1 and res["ttft"] > 0
    else:
        assert res["error"].startswith(want_error)


# ---------------------------------------------------------------- benchmarks/batch_step.py
def test_batch_step_times_every_slot_count_and_batch_and_refuses_what_does_not_fit(odir, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import batch_step

    monkeypatch.setattr(batch_step, "RESULTS", tmp_path)
    assert batch_step.main([str(odir), "--slots", "32,64", "--batch-sizes", "1,2", "--prompt", "4", "--steps", "3",
                            "--rounds", "2", "--name", "tiny"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "batch-step-tiny.json").read_text())
    assert set(res["steps"]) == {"32", "64"} and all(set(v) == {"1", "2"} for v in res["steps"].values())
    cells = [c for v in res["steps"].values() for c in v.values()]
    assert all(c["steps"] == 6 and 0 < c["p10_ms"] <= c["median_ms"] <= c["p90_ms"] for c in cells)
    assert "| 2 |" in (tmp_path / "batch-step-tiny.md").read_text()
    # two fills: every slot count x fill is a configuration of its own
    assert batch_step.main([str(odir), "--slots", "32", "--batch-sizes", "2", "--prompt", "4,8", "--steps", "3",
                            "--rounds", "1", "--name", "fills"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "batch-step-fills.json").read_text())
    assert set(res["steps"]) == {"32/4", "32/8"} and res["settings"]["prompt"] == [4, 8]
    assert "32 slots, 8 cached" in (tmp_path / "batch-step-fills.md").read_text()
    # rows at mixed fills (a server's rows hold requests admitted at different times) beside equal ones
    assert batch_step.row_fills("4:10", 4) == [4, 6, 8, 10] and batch_step.row_fills(6, 3) == [6, 6, 6]
    assert batch_step.main([str(odir), "--slots", "32", "--batch-sizes", "1,4", "--prompt", "7,4:10", "--steps", "3",
                            "--rounds", "1", "--name", "spread"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "batch-step-spread.json").read_text())
    assert set(res["steps"]) == {"32/7", "32/4:10"} and res["settings"]["prompt"] == [7, "4:10"]
    assert "32 slots, 4–10 cached (spread over the rows)" in (tmp_path / "batch-step-spread.md").read_text()
    # another process busy beside every step (a server's HTTP path and client on the same cores)
    assert batch_step.main([str(odir), "--slots", "32", "--batch-sizes", "2", "--prompt", "4", "--steps", "3",
                            "--rounds", "2", "--busy-ms", "0,1.5", "--name", "busy"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "batch-step-busy.json").read_text())
    assert set(res["steps"]) == {"32/b0", "32/b1.5"} and res["settings"]["busy_ms"] == [0.0, 1.5]
    assert res["steps"]["32/b1.5"]["2"]["steps"] == 6
    assert "32 slots, 1.5 ms busy beside each step" in (tmp_path / "batch-step-busy.md").read_text()
    bad_args = [("--prompt", "0"), ("--prompt", "9:4"), ("--prompt", "4:"), ("--busy-ms", "-1"), ("--busy-ms", "x")]
    for flag, bad in bad_args:  # argparse's usage error, exit 2
        with pytest.raises(SystemExit) as exit_info:
            batch_step.main([str(odir), flag, bad, "--name", "bad"])
        assert exit_info.value.code == 2
    # a prefill between steps (a server admitting requests): recorded, and the steps are timed as before
    assert batch_step.main([str(odir), "--slots", "32", "--batch-sizes", "2", "--prompt", "4", "--steps", "4",
                            "--rounds", "1", "--prefill-every", "2", "--name", "admit"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "batch-step-admit.json").read_text())
    assert res["settings"]["prefill_every"] == [2] and res["steps"]["32"]["2"]["steps"] == 4
    assert "a new prompt every 2 steps" in (tmp_path / "batch-step-admit.md").read_text()
    assert batch_step.main([str(odir), "--slots", "32", "--batch-sizes", "2", "--prompt", "4", "--steps", "4",
                            "--rounds", "2", "--prefill-every", "0,2", "--name", "admit2"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "batch-step-admit2.json").read_text())
    assert set(res["steps"]) == {"32/p0", "32/p2"} and res["steps"]["32/p2"]["2"]["steps"] == 8
    md = (tmp_path / "batch-step-admit2.md").read_text()
    assert "32 slots, no prefills" in md and "32 slots, a prefill every 2 steps" in md
    # 4 prompt tokens + 3 warm-up + 30 steps do not fit in 32 slots: an error, nothing written
    assert batch_step.main([str(odir), "--slots", "32", "--prompt", "4", "--steps", "30", "--name", "big"]) == 2
    assert not list(tmp_path.glob("batch-step-big*"))


# ---------------------------------------------------------------- benchmarks/cpu_phases.py
def test_cpu_phases_times_both_compiles_over_time_and_splits_fast_from_slow(odir, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_phases

    monkeypatch.setattr(cpu_phases, "RESULTS", tmp_path)
    assert cpu_phases.main([str(odir), "--length", "8", "--slots", "32", "--minutes", "0.02", "--every", "0.1",
                            "--name", "tiny"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "cpu-phases-tiny.json").read_text())
    assert res["timeline"] and all(r["a_ms"] > 0 and r["b_ms"] > 0 and r["token_ms"] > 0 for r in res["timeline"])
    assert [r["second"] for r in res["timeline"]] == sorted(r["second"] for r in res["timeline"])
    assert "| second | compile A ms |" in (tmp_path / "cpu-phases-tiny.md").read_text()
    # the split cuts at the widest gap, and only at a gap past 20% of the fastest value
    sp = cpu_phases.split([28.0, 47.0, 27.5, 46.0, 28.5])
    assert (sp["fast"], sp["slow"], sp["fast_ms"], sp["slow_ms"], sp["slow_over_fast"]) == (3, 2, 28.0, 46.5, 1.66)
    assert sp["cut_ms"] == 37.25 and cpu_phases.split([28.0, 30.0, 31.0])["slow"] == 0
    # both compiles slow in the same samples: they agree; a compile slow on its own: they do not
    timeline = [{"a_ms": a, "b_ms": b, "token_ms": 6.5} for a, b in ((28, 28), (47, 46), (28, 47), (28, 29))]
    sm = cpu_phases.summarise(timeline)
    assert sm["compiles_agree"] == 0.75 and sm["prompt_graphs"]["slow"] == 3 and sm["token_ms"]["slow"] == 0
    with pytest.raises(SystemExit):  # a prompt graph's length is a multiple of 4
        cpu_phases.main([str(odir), "--length", "6", "--name", "bad"])
