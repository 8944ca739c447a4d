"""The OpenAI-compatible HTTP API over the scheduler: completions, chat completions, models, health, metrics.

FastAPI does the HTTP, sse-starlette the server-sent events of ``stream: true``, prometheus_client the
metrics. Every bad request is HTTP 400 with an OpenAI-style ``{"error": {...}}`` body (FastAPI's own 422
included); a full queue is 429 with ``Retry-After``; ``/health`` is 503 while the engines compile and while
the server drains. A client that disconnects cancels its request, which frees its batch row at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from owl_deploy.configs import reason
from owl_deploy.errors import OwlError
from owl_deploy.serve.scheduler import QueueFull, Request, Sampling, Scheduler


# ---------------------------------------------------------------- request schemas (OpenAI's, the subset served)
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with the usage, as OpenAI's API sends it


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # greedy by default (OpenAI's default is 1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics of one server (its own registry: several servers can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "owl_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("owl_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("owl_generated_tokens", "Tokens generated", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
        self.ttft = Histogram("owl_time_to_first_token_seconds", "Arrival to first token", buckets=buckets, registry=r)
        self.itl = Histogram("owl_inter_token_latency_seconds", "Between two tokens of a stream", buckets=buckets,
                             registry=r)  # fmt: skip
        self.queue_depth = Gauge("owl_queue_depth", "Requests waiting for a batch row", registry=r)
        self.active = Gauge("owl_active_sequences", "Sequences decoding", registry=r)
        self.step_seconds = Histogram("owl_decode_step_seconds", "One batched decode step", buckets=buckets, registry=r)
        # with the steps' sum, how much of a load test's wall time the engine thread computed (serve_load.py)
        self.prefill_seconds = Histogram("owl_prefill_seconds", "One prompt's prefill", buckets=buckets, registry=r)
        self.prefill_tokens = Counter("owl_prefill_tokens", "Prompt tokens the engine prefilled", registry=r)

    def on_step(self, active: int, waiting: int, seconds: float) -> None:
        self.active.set(active)
        self.queue_depth.set(waiting)
        self.step_seconds.observe(seconds)

    def on_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_seconds.observe(seconds)
        self.prefill_tokens.inc(tokens)


def engine_counters(exposition: str) -> dict[str, float]:
    """The engine thread's totals in a /metrics text: decode steps and prefills, their seconds, the tokens prefilled
    and generated.
    Two scrapes around a load test give how busy the engine was (the rest of the wall time is HTTP, the event
    loop and the client)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {"owl_decode_step_seconds_count": "decode_steps", "owl_decode_step_seconds_sum": "decode_seconds",
             "owl_prefill_seconds_count": "prefills", "owl_prefill_seconds_sum": "prefill_seconds",
             "owl_prefill_tokens_total": "prefill_tokens",
             "owl_generated_tokens_total": "generated_tokens"}  # fmt: skip
    out = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in names:
                out[names[sample.name]] = sample.value
    return out


# ---------------------------------------------------------------- text out of tokens
class TextStream:
    """Incremental detokenization with stop strings: text is released only when it cannot be the start of a
    stop string and does not end inside a multi-byte character."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.tokens: list[int] = []
        self.shown = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                return self._release(text[:at])
        if text.endswith("\ufffd"):
            return ""
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._release(text[: max(self.shown, len(text) - hold)])

    def flush(self) -> str:
        text = self.decode(self.tokens)
        return "" if self.stopped else self._release(text)

    def _release(self, upto: str) -> str:
        out = upto[self.shown :]
        self.shown = max(self.shown, len(upto))
        return out


# ---------------------------------------------------------------- the app
class Server:
    """What the routes need: the tokenizer, the scheduler (once compiled), the model's name, the metrics."""

    def __init__(self, model_name: str, max_tokens_default: int = 16):
        self.model_name = model_name
        self.tokenizer = None
        self.scheduler: Scheduler | None = None
        self.ready = False
        self.draining = False
        self.failed: str | None = None
        self.loop = None  # the event loop serving the routes, once it runs (serve's --step-sync waits on it)
        self.metrics = Metrics()
        self.max_tokens_default = max_tokens_default
        self.started = int(time.time())


def create_app(server: Server, lifespan=None) -> FastAPI:
    app = FastAPI(title="owl_deploy", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"type": "value_error", "msg": "invalid request", "loc": ()}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            model = ChatBody if request.url.path.endswith("/chat/completions") else CompletionBody
            message = f"{'.'.join(loc) or 'body'}: {reason(first, list(model.model_fields))}"
        server.metrics.requests.labels(request.url.path, "400").inc()
        return _error(400, message, "invalid_request_error", ".".join(loc) or None)

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError):
        server.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return _error(exc.status, exc.message, exc.kind, exc.param, headers)

    @app.get("/health")
    async def health():
        if server.failed:
            return JSONResponse({"status": "failed", "error": server.failed}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", **server.scheduler.info()}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": server.model_name, "object": "model", "created": server.started, "owned_by": "owl_deploy"}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        _check_ready(server, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request is served (got a list of several)", param="prompt")
        ids = _encode(server, prompts[0])
        return await _respond(server, http, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        _check_ready(server, body.model)
        try:
            ids = server.tokenizer.apply_chat_template(
                [m.model_dump() for m in body.messages], add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # a tokenizer without a chat template, a template that rejects the roles
            raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return await _respond(server, http, body, list(ids), chat=True)

    return app


def _check_ready(server: Server, model: str) -> None:
    if not server.ready or server.draining:
        raise ApiError(503, "the model is " + ("shutting down" if server.draining else "loading"), "server_error")
    if model != server.model_name:
        raise ApiError(400, f"unknown model {model!r}; this server serves {server.model_name!r}", param="model")


def _encode(server: Server, text: str) -> list[int]:
    return list(server.tokenizer(text)["input_ids"])


async def _respond(server: Server, http: HttpRequest, body: _Body, ids: list[int], chat: bool):
    _check_ready(server, body.model)
    sched = server.scheduler
    if not ids:
        raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt")
    if len(ids) >= sched.sequence_length:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; this deployment's context is {sched.sequence_length}",
            param="prompt",
        )
    if len(ids) + body.max_tokens > sched.sequence_length:
        raise ApiError(
            400,
            f"max_tokens {body.max_tokens} past the context: the prompt has {len(ids)} of "
            f"{sched.sequence_length} tokens, so at most {sched.sequence_length - len(ids)} can be generated",
            param="max_tokens",
        )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    tok = server.tokenizer
    eos = tok.eos_token_id
    stop_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    req = Request(
        ids,
        body.max_tokens,
        Sampling(body.temperature, body.top_p, body.seed),
        stop_ids,
        put=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
    )
    try:
        sched.submit(req)
    except QueueFull as exc:
        raise ApiError(429, f"too many requests: {exc}", "rate_limit_error") from exc
    except OwlError as exc:
        raise ApiError(400, str(exc), param="max_tokens") from exc
    endpoint = http.url.path
    server.metrics.prompt_tokens.inc(len(ids))
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    text = TextStream(lambda t: tok.decode(t, skip_special_tokens=True), stops)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    meta = {"id": rid, "created": int(time.time()), "model": server.model_name}

    async def pieces() -> AsyncIterator[tuple[str, str | None]]:
        """(text, finish_reason) as the engine produces tokens; cancels the request when abandoned."""
        last = None
        try:
            while True:
                kind, value = await events.get()
                now = time.perf_counter()
                if kind == "token":
                    server.metrics.generated_tokens.inc()
                    if last is None:
                        server.metrics.ttft.observe(now - req.arrived)
                    else:
                        server.metrics.itl.observe(now - last)
                    last = now
                    if value in stop_ids:
                        continue
                    delta = text.push(value)
                    if text.stopped:
                        req.cancel()
                        yield delta, "stop"
                        return
                    if delta:
                        yield delta, None
                elif kind == "done":
                    yield text.flush(), "stop" if value == "stop" else "length"
                    return
                else:
                    raise ApiError(500, f"generation failed: {value}", "server_error")
        finally:
            req.cancel()  # finished, failed or the client went away: the row is freed at the next step

    usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": req.generated,  # noqa: E731
                     "total_tokens": len(ids) + req.generated}  # fmt: skip
    if not body.stream:
        parts, finishes = [], []
        async for delta, end in pieces():
            parts.append(delta)
            finishes.append(end)
        finish = finishes[-1] if finishes else "length"
        server.metrics.requests.labels(endpoint, "200").inc()
        content = "".join(parts)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        )
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage()}  # fmt: skip

    from sse_starlette.sse import EventSourceResponse

    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return json.dumps({**meta, "object": obj, "choices": [choice]})

    async def stream():
        if chat:
            yield {"data": chunk(None, None, first=True)}
        async for delta, finish in pieces():
            if delta or finish:
                yield {"data": chunk(delta, finish)}
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {"data": json.dumps({**meta, "object": obj, "choices": [], "usage": usage()})}
        yield {"data": "[DONE]"}
        server.metrics.requests.labels(endpoint, "200").inc()

    return EventSourceResponse(stream(), ping=15)
