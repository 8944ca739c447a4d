"""Independent study jobs as Ray tasks (issue 18): an embedded local Ray by default, a cluster by address.

A study (the quality table, a tuning grid) is many configurations scored on one model. Each Ray actor builds
the study once (model, calibration windows, scoring tokens: e.g. :class:`owl_deploy.study.StudySpec`) and then
runs jobs: a job is a module-level function that takes the study first (Ray ships it by reference), and its
arguments. This module knows nothing of studies beyond ``spec.build(built)``.
The driver hands a job to every idle actor, saves each result the moment it arrives (``on_result``: the
caller's checkpoint, so a killed study resumes where it stopped), and reports a failing job — or an actor
that died — without losing the others. Actors run with the serial run's torch thread count, so every float
reduction happens in the same order and the results are identical to a serial run (tested on a two-node
loopback cluster), and with the environment the caller gives (``env``: e.g. the compute dtype the driver
resolved, so a node of another CPU kind does not choose its own). Benchmarks that time engines never come
here: they must run alone on one node.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from owl_deploy.errors import OwlError, one_line


@dataclass(frozen=True)
class Job:
    """``op(spec.build(...), *args)``; ``key`` names its result."""

    key: str
    spec: Any  # hashable, with ``build(built: dict) -> study`` (owl_deploy.study.StudySpec)
    op: Callable[..., Any]
    args: tuple = ()


class _Worker:
    """One actor: the studies it was asked for (built once each), and the jobs run on them."""

    def __init__(self, threads: int, env: dict[str, str]):
        import torch

        os.environ.update(env)  # the driver's decisions (e.g. the compute dtype), before any job runs
        torch.set_num_threads(threads)
        self.studies: dict[Any, Any] = {}

    def run(self, job: Job) -> Any:
        if job.spec not in self.studies:
            self.studies[job.spec] = job.spec.build(self.studies)
        return job.op(self.studies[job.spec], *job.args)

    def pid(self) -> int:
        return os.getpid()


def _connect(address: str | None) -> bool:
    """``ray.init`` (a local embedded Ray when ``address`` is None); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no network beyond the package registries: no usage reports
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": a new embedded Ray even when a cluster started by `ray start` runs on this machine (ray.init()
            # with no address would join that one, and refuse num_cpus)
            ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError for a bad address
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise OwlError(f"cannot start or reach {where}: {one_line(exc)}") from exc
    return True


class Pool:
    """Ray actors of ``threads`` CPUs each, kept across several waves of jobs (``run``), so a study a wave's
    jobs share is built once per actor, not once per wave; ``with Pool(...) as pool`` connects (an embedded
    local Ray when ``address`` is None) and kills the actors (and a Ray it started) at the end."""

    def __init__(
        self, address: str | None = None, threads: int = 1, actors: int | None = None, env: dict[str, str] | None = None
    ):
        self.address, self.threads, self.actors, self.env = address, threads, actors, dict(env or {})
        self._pool: list[Any] = []
        self._started = False

    def __enter__(self) -> Pool:
        self._started = _connect(self.address)
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        try:
            for actor in self._pool:
                ray.kill(actor)  # their studies (model copies) are freed now, not when the cluster stops
            self._pool.clear()
        finally:
            if self._started:
                ray.shutdown()

    def run(self, jobs: Iterable[Job], on_result: Callable[[Job, Any, str | None], None]) -> dict[str, int]:
        """Run ``jobs`` on the pool's actors (as many as the cluster's CPUs hold, or ``actors``, and no more
        than the jobs). ``on_result(job, result, error)`` is called in the driver as each job ends (``error`` is
        a one-line reason when it failed, ``result`` then None). Returns counts: jobs done, failed, actors used."""
        import ray

        jobs = list(jobs)
        if not jobs:
            return {"done": 0, "failed": 0, "actors": 0}
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = max(1, min(self.actors or cpus // max(self.threads, 1), len(jobs)))
        worker_cls = ray.remote(num_cpus=self.threads, max_restarts=0, max_task_retries=0)(_Worker)
        while len(self._pool) < n:
            self._pool.append(worker_cls.remote(self.threads, self.env))
        workers = self._pool[:n]
        pending = list(reversed(jobs))
        running: dict[Any, tuple[Any, Job]] = {}
        counts = {"done": 0, "failed": 0, "actors": n}

        def feed(actor) -> None:
            if pending:
                job = pending.pop()
                running[actor.run.remote(job)] = (actor, job)

        for actor in workers:
            feed(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ready[0])
            try:
                result, error = ray.get(ready[0]), None
            except ray.exceptions.RayActorError as exc:  # the actor died (e.g. out of memory): do not reuse it
                result, error = None, f"worker died: {one_line(exc)}"
                self._pool.remove(actor)
                workers.remove(actor)
                actor = None
            except Exception as exc:  # the job raised: its error, the actor stays
                cause = getattr(exc, "cause", None) or exc
                result, error = None, one_line(cause)
            counts["failed" if error else "done"] += 1
            on_result(job, result, error)
            if actor is not None:
                feed(actor)
            elif not workers:  # every actor of this wave died: the rest cannot run
                for job in reversed(pending):
                    counts["failed"] += 1
                    on_result(job, None, "no Ray worker left (every worker died)")
                pending.clear()
        return counts


def run_jobs(
    jobs: Iterable[Job],
    on_result: Callable[[Job, Any, str | None], None],
    address: str | None = None,
    threads: int = 1,
    actors: int | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, int]:
    """One wave of ``jobs`` on a fresh :class:`Pool` (see :meth:`Pool.run`)."""
    jobs = list(jobs)
    if not jobs:
        return {"done": 0, "failed": 0, "actors": 0}
    with Pool(address, threads, actors, env) as pool:
        return pool.run(jobs, on_result)


def stop_nodes(temp_dir: str | os.PathLike) -> int:
    """Stop the Ray nodes started with ``ray start --temp-dir=TEMP_DIR`` and only those: the processes whose
    command line names the temp dir (GCS, raylets, agents) and their descendants (workers rename themselves
    "ray::..."). ``ray stop --force`` kills every Ray on the machine: it once took down a study running on
    another cluster beside the tests. Returns how many processes were stopped."""
    import psutil

    own = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    procs = {p.pid: p for p in own}
    for p in own:
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in p.children(recursive=True)})
    procs.pop(os.getpid(), None)
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(procs.values()), timeout=60)
    return len(procs)
