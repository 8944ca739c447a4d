"""``owl-deploy serve ODIR``: a deployment folder behind an OpenAI-compatible HTTP API, batching requests.

The server listens at once and compiles in the background (``/health`` says 503 ``loading`` until the
engines are ready): a batch-1 session for prefill, and the single-token graph at every batch size of
``ServeConfig.compiled_batch_sizes`` for decode (scheduler.py); each sequence's KV cache lives inside
DeepSparse (fp32 and int8 graphs) or in numpy arrays (ONNX Runtime) — see ``serving_plan``. SIGTERM (or Ctrl-C)
stops accepting requests, lets the ones in flight finish for up to ``drain_seconds`` and exits 0.

Nothing here imports torch: a serving install needs numpy, the engines, tokenizers/transformers and the
web stack only (``pip install 'owl-deploy[serve]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from pathlib import Path

from owl_deploy.configs import ServeConfig
from owl_deploy.errors import OwlError, one_line

log = logging.getLogger("owl_deploy.serve")


def is_int8(folder: Path) -> bool:
    """A deployment whose projections are in the int8 MatMulInteger pattern."""
    import onnx

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return any(n.op_type == "MatMulInteger" for n in proto.graph.node)


def serving_plan(folder: Path, cfg: ServeConfig) -> tuple[str, str]:
    """(KV cache kind, prefill engine) for ``cfg`` on ``folder``.

    DeepSparse decodes fastest with its internal cache (one engine-side cache per row, nothing copied per
    step), which only a DeepSparse prefill can fill: the default for fp32 and int8 graphs alike. On int8 graphs
    DeepSparse rounds differently from ONNX Runtime — at equal quality (SmolLM2 dense int8, 16,384 wiki tokens:
    perplexity 25.04 in DeepSparse, 25.08 in ONNX Runtime) — so its greedy answers part from ONNX Runtime's after
    some tokens under *any* plan: over 32 wiki prompts x 64 tokens (AMX Xeon, serve_load.py --reference) 2 of 32
    dense int8 answers kept ONNX Runtime's with a DeepSparse prefill, and 11 of 32 even with ONNX Runtime's prefill
    continued by DeepSparse through external caches (``--kv-cache external``, the int8 default until 2026-12-05,
    which served 1.7x less at 16 streams on 70% int8). ONNX Runtime's exact tokens need ``--engine onnxruntime``.
    """
    int8 = is_int8(folder)
    kv_cache = cfg.kv_cache
    if kv_cache == "auto":
        kv_cache = "internal" if cfg.engine == "deepsparse" else "external"
    if kv_cache == "internal" and cfg.engine != "deepsparse":
        raise OwlError("an internal KV cache is a DeepSparse feature; use --kv-cache external with onnxruntime")
    prefill_engine = cfg.prefill_engine
    if prefill_engine == "auto":
        prefill_engine = "deepsparse" if kv_cache == "internal" else "onnxruntime" if int8 else cfg.engine
    if kv_cache == "internal" and prefill_engine != "deepsparse":
        raise OwlError("an internal KV cache is filled by a DeepSparse prefill; use --prefill-engine deepsparse "
                       "or --kv-cache external")  # fmt: skip
    return kv_cache, prefill_engine


def loop_sync(get_loop, hops: int = 3, timeout: float = 0.02):
    """A function that returns once ``get_loop()``'s event loop has run ``hops`` rounds of callbacks after the call
    (or after ``timeout`` s): by then the tokens just reported have gone through their streams' tasks to the sockets.
    The engine thread calls it after each step (``ServeConfig.step_sync``)."""

    def sync() -> None:
        loop = get_loop()
        if loop is None or loop.is_closed():
            return
        done = threading.Event()

        def hop(n: int) -> None:
            if n:
                loop.call_soon(hop, n - 1)
            else:
                done.set()

        loop.call_soon_threadsafe(hop, hops)
        done.wait(timeout)

    return sync


def build_scheduler(folder: Path, cfg: ServeConfig):
    """Compile the prefill session and the batched decoder; the scheduler that runs them (not started)."""
    from owl_deploy import runtime
    from owl_deploy.contract import LONG_PREFILL_LENGTH, prefill_length_within
    from owl_deploy.serve.scheduler import Scheduler

    kv_cache, prefill_engine = serving_plan(folder, cfg)
    decoder = runtime.compile_decoder(
        folder, cfg.engine, cfg.compiled_batch_sizes, cfg.sequence_length, cfg.threads, kv_cache=kv_cache
    )
    prefill_length = cfg.prefill_length
    if prefill_length is None:  # the long default, shortened to leave the cache a slot in a short context
        prefill_length = prefill_length_within(LONG_PREFILL_LENGTH, decoder.sequence_length - 1)
    prefill = runtime.compile(
        folder,
        prefill_engine,
        sequence_length=decoder.sequence_length,
        prefill_length=prefill_length,
        kv_cache=kv_cache,
        threads=cfg.threads,
        last_logits=True,  # a prompt needs its last token's logits only
    )
    return Scheduler(prefill, decoder, cfg.max_batch, cfg.max_queue, prefills_per_step=cfg.prefills_per_step)


def serve(folder: str | Path, cfg: ServeConfig, ready: threading.Event | None = None) -> None:
    """Run the server until SIGTERM/SIGINT; returns after draining (exit status 0)."""
    import uvicorn

    from owl_deploy import runtime
    from owl_deploy.serve.api import Server, create_app

    folder = Path(folder).expanduser()
    dep = runtime.open_deployment(folder)  # a bad folder fails here, before anything listens
    log.warning("serving %s on http://%s:%s (%s); /health is 200 when ready", folder, cfg.host, cfg.port, cfg.engine)
    tokenizer = dep.tokenizer()
    server = Server(cfg.model_name or folder.name)
    server.tokenizer = tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.loop = asyncio.get_running_loop()
        yield
        if server.scheduler is not None:  # uvicorn has drained the connections; let the engine thread end
            await asyncio.to_thread(server.scheduler.stop, cfg.drain_seconds)

    app = create_app(server, lifespan)

    def load() -> None:
        try:
            sched = build_scheduler(folder, cfg)
            sched.on_step = server.metrics.on_step
            sched.on_prefill = server.metrics.on_prefill
            if cfg.step_sync:
                sched.after_step = loop_sync(lambda: server.loop)
            sched.start()
            server.scheduler, server.ready = sched, True
            log.warning("ready: %s in %s (batch sizes %s)", folder, cfg.engine, sched.decoder.batch_sizes)
        except Exception as exc:  # reported by /health, and the server stops
            server.failed = one_line(exc)
            log.error("cannot compile %s: %s", folder, server.failed)
            uv.should_exit = True
        finally:
            if ready is not None:
                ready.set()

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: refuse new requests, drain the rest
            server.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn re-raises the signal after its graceful shutdown (the process then dies of it); a
            drained server has finished its work and exits 0 instead."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        timeout_graceful_shutdown=int(cfg.drain_seconds) or None,
        access_log=False,
    )
    uv = _Uvicorn(config)
    threading.Thread(target=load, name="owl-deploy-compile", daemon=True).start()
    uv.run()
    if server.failed:
        raise OwlError(f"the server stopped: cannot compile {folder}: {server.failed}")
