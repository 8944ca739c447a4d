"""Studies as Ray jobs (owl_deploy.cluster): the same results as a serial run, on an embedded local Ray and on a
real two-node cluster on loopback; a failing job is reported without losing the others; a re-run resumes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny

from owl_deploy.cluster import Job, stop_nodes
from owl_deploy.configs import OwlConfig, PruneConfig
from owl_deploy.study import Checkpoint, StudySpec, run_config, score_dense

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

RAY = Path(sys.executable).parent / "ray"


def _text(tmp: Path) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "sparse", "outlier", "weight", "layer", "block", "token"]
    gen = torch.Generator().manual_seed(0)
    path = tmp / "text.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=gen).tolist()) + "\n")
    return path


def _spec(tmp: Path) -> StudySpec:
    model = save_tiny("qwen2", tmp / "model", hidden=64, layers=3)
    text = str(_text(tmp))
    return StudySpec(str(model), text, 4, 32, 0, text, 1024, 64)


CONFIGS = [
    (PruneConfig(method="wanda", allocation="uniform", sparsity=0.6), OwlConfig()),
    (PruneConfig(method="wanda", allocation="owl", sparsity=0.6), OwlConfig()),
    (PruneConfig(method="sparsegpt", allocation="owl", sparsity=0.7), OwlConfig(m=3.0, lambda_=0.15)),
    (PruneConfig(method="magnitude", allocation="owl", sparsity=0.5), OwlConfig()),
]


def _strip(row: dict) -> dict:
    """A row without its timings (the only part that may differ between runs)."""
    out = {k: v for k, v in row.items() if k != "seconds"}
    if isinstance(out.get("tune"), dict):
        out["tune"] = {k: v for k, v in out["tune"].items() if k != "seconds"}
    return out


def _serial(spec: StudySpec, threads: int | None = None) -> dict[str, dict]:
    """The rows of a serial run in this process (with ``threads`` torch threads, as the workers will use)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        study = spec.build()
        out = {"dense": score_dense(study)}
        out.update({repr(c): _strip(run_config(study, *c)) for c in CONFIGS})
    finally:
        torch.set_num_threads(before)
    out["dense"].pop("seconds", None)
    return out


def _jobs(spec: StudySpec) -> list[Job]:
    return [Job("dense", spec, score_dense)] + [Job(repr(c), spec, run_config, c) for c in CONFIGS]


def _results(done: Checkpoint) -> dict[str, dict]:
    out = {k: _strip(v) for k, v in done.rows.items()}
    out["dense"].pop("seconds", None)
    return out


def test_local_ray_equals_serial_reports_a_failure_and_resumes(tmp_path):
    """Embedded local Ray: every row equal to the serial run's (window NLLs to the last bit); a job that raises
    is recorded with its one-line reason, the others saved; a re-run computes only what is missing."""
    spec = _spec(tmp_path)
    serial = _serial(spec)
    bad = (PruneConfig(method="wanda", allocation="uniform", nm="3:7"), OwlConfig())  # 64 inputs: not a multiple of 7
    done = Checkpoint(tmp_path / "partial.json", {"study": 1})
    threads = torch.get_num_threads()
    counts = done.fill([*_jobs(spec), Job(repr(bad), spec, run_config, bad)], None, threads)
    assert counts["done"] == len(CONFIGS) + 1 and counts["failed"] == 1
    assert list(done.failed) == [repr(bad)] and "divisible by 7" in done.failed[repr(bad)]
    assert _results(done) == serial
    saved = json.loads((tmp_path / "partial.json").read_text())["rows"]
    assert set(saved) == set(serial)  # every finished row on disk the moment it arrived
    again = Checkpoint(tmp_path / "partial.json", {"study": 1})
    assert again.fill(_jobs(spec), None, threads) == {"done": 0, "failed": 0, "actors": 0}


def test_workers_compute_in_the_dtype_the_driver_resolved(tmp_path, monkeypatch):
    """A study's rows are all pruned in one dtype: the driver resolves ``auto`` on its CPU and pins its workers to
    it (a node of another CPU kind would otherwise choose its own). Shown by making the driver's rule answer the
    opposite of what this CPU's rule gives the workers."""
    from owl_deploy import calibrate

    monkeypatch.delenv(calibrate.AUTO_DTYPE_ENV, raising=False)
    want = "float32" if calibrate.resolve_dtype("auto") == "bfloat16" else "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: want == "bfloat16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: want == "bfloat16", raising=False)
    assert calibrate.worker_env() == {calibrate.AUTO_DTYPE_ENV: want}
    cfg = (PruneConfig(method="wanda", allocation="uniform", sparsity=0.5), OwlConfig())
    done = Checkpoint(tmp_path / "partial.json", {"study": 2})
    counts = done.fill([Job(repr(cfg), _spec(tmp_path), run_config, cfg)], None, torch.get_num_threads())
    assert counts["done"] == 1, done.failed
    assert done.rows[repr(cfg)]["compute_dtype"] == want
    assert calibrate.AUTO_DTYPE_ENV not in os.environ  # the driver's own environment is left alone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}  # HOME and the token: the fixture's (see two_nodes)
    proc = subprocess.run([str(RAY), *args], capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed: {proc.stderr[-2000:]}")


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """A Ray head and a second node on 127.0.0.1, each with its own ports and 1 CPU, under a temp dir of their
    own; stopped afterwards (only they: ``ray stop --force`` would kill every Ray on the machine).

    The cluster uses token authentication, as a real one should, with one fresh token given to both nodes and
    this test's driver through the environment (and a fresh HOME). Ray caches the authentication mode and token
    in the process (a local ``ray.init()`` earlier in the run turns token mode on and writes ``~/.ray/auth_token``),
    so the cache is reset on entry and again once the environment is restored."""
    if not RAY.exists():
        pytest.skip("the ray CLI is not installed")
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
    from ray._private.authentication_test_utils import reset_auth_token_state

    home = tmp_path / "ray-home"
    home.mkdir()
    temp_dir = Path(tempfile.mkdtemp(prefix="owlray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
    try:
        with monkeypatch.context() as env:
            env.setenv("HOME", str(home))
            env.setenv("RAY_AUTH_MODE", "token")
            env.setenv("RAY_AUTH_TOKEN", generate_new_authentication_token())
            env.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
            reset_auth_token_state()
            try:
                head = [f"--port={port}", "--head", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
                for address in (head, [f"--address=127.0.0.1:{port}"]):
                    agent = [f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
                    _ray("start", *address, *common, *agent)
                yield f"127.0.0.1:{port}"
            finally:
                stop_nodes(temp_dir)
    finally:
        reset_auth_token_state()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_node_loopback_cluster_equals_serial(tmp_path, two_nodes):
    """A real two-node cluster (two raylets on loopback): two workers, one per node, and the same rows."""
    import ray

    spec = _spec(tmp_path)
    serial = _serial(spec, threads=1)
    done = Checkpoint(tmp_path / "partial.json", {"study": 2})
    ray.init(address=two_nodes, include_dashboard=False, log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and ray.cluster_resources()["CPU"] == 2
        counts = done.fill(_jobs(spec), two_nodes, threads=1)
    finally:
        ray.shutdown()
    assert counts == {"done": len(CONFIGS) + 1, "failed": 0, "actors": 2}
    assert _results(done) == serial


def test_a_local_ray_is_embedded_even_beside_a_running_cluster(tmp_path, two_nodes):
    """With a cluster started by `ray start` on this machine, ``ray.init()`` with no address joins it and refuses
    ``num_cpus`` (found running a study on a loopback cluster beside the tests); the default must stay an
    embedded local Ray of its own, with the serial rows."""
    spec = _spec(tmp_path)
    serial = _serial(spec)
    done = Checkpoint(tmp_path / "partial.json", {"study": 3})
    counts = done.fill(_jobs(spec), None, torch.get_num_threads())
    assert counts["done"] == len(CONFIGS) + 1 and counts["failed"] == 0
    assert _results(done) == serial


def test_quality_study_on_ray_gives_the_serial_table(tmp_path, monkeypatch):
    """benchmarks/quality.py end to end on a tiny model: the Ray run's JSON rows, comparisons and tuning equal
    the serial run's."""
    import quality

    spec = _spec(tmp_path)
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    argv = ["quality.py", "--model", spec.model, "--calib", spec.calib, "--eval-text", spec.calib, "--quick",
            "--seqlen", "64", "--calib-seqlen", "32", "--default-tune-tokens", "1024",
            "--default-tune-nsamples", "4"]  # fmt: skip
    results = {}
    for mode in ("--serial", None):
        stem = f"q-{'serial' if mode else 'ray'}"
        monkeypatch.setattr(sys, "argv", [*argv, "--out-stem", stem, *([mode] if mode else [])])
        quality.main()
        results[stem] = json.loads((tmp_path / "results" / f"{stem}.json").read_text())
    a, b = results["q-serial"], results["q-ray"]
    assert b["meta"]["ray"]["address"] == "local" and a["meta"]["ray"] is None
    assert [_strip(r) for r in a["rows"]] == [_strip(r) for r in b["rows"]] and len(a["rows"]) > 4
    assert a["comparisons"] == b["comparisons"] and a["dense"] | {"seconds": 0} == b["dense"] | {"seconds": 0}
    for t in (a, b):
        for r in t["pipeline_default"]["rows"]:
            r.pop("tune_seconds"), r.pop("tune_fraction_of_prune")
    assert a["pipeline_default"] == b["pipeline_default"]
    assert not list((tmp_path / "results").glob(".*partial*"))
    shutil.rmtree(tmp_path / "results")


def _tune_args(tmp: Path) -> list[str]:
    model = save_tiny("qwen2", tmp / "tune-model", hidden=64, layers=3)
    return ["tune", "--model", str(model), "--sparsity", "0.6", "--calib", str(_text(tmp)), "--nsamples", "4",
            "--seqlen", "32", "--heldout-seqlen", "32", "--screen-windows", "2", "--finalists", "2",
            "--grid-m", "3,5", "--grid-lambda", "0.08,0.15", "--json"]  # fmt: skip


def _tune(args: list[str], threads: int | None = None) -> dict:
    """`owl-deploy tune ... --json` in this process with ``threads`` torch threads; the result without timings."""
    from click.testing import CliRunner

    from owl_deploy.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        res = CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    out.pop("seconds")
    return out


def test_tune_on_local_ray_equals_the_serial_tune(tmp_path):
    """`owl-deploy tune --ray`: the dense pass and every candidate scored by Ray workers, the screen and the
    finalists as two waves on the same workers; the grid, NLLs and choice equal the serial run's to the last bit."""
    args = _tune_args(tmp_path)
    serial = _tune(args)
    assert serial["screen_windows"] == 2 and serial["windows"] > 2  # both waves ran
    assert any(not r["finalist"] for r in serial["grid"]) and sum(r["finalist"] for r in serial["grid"]) == 2
    assert _tune([*args, "--ray"]) == serial


def test_tune_on_two_node_loopback_cluster_equals_serial(tmp_path, two_nodes):
    """The same tune on a real two-node cluster (one 1-thread worker per node) equals a 1-thread serial run."""
    args = _tune_args(tmp_path)
    assert _tune([*args, "--ray-address", two_nodes, "--ray-workers", "2"], threads=1) == _tune(args, threads=1)


def _sweep_argv(tmp: Path, work: Path) -> list[str]:
    model = tmp / "sweep-model"
    if not model.exists():
        save_tiny("llama", model, hidden=64, layers=2)
    return ["--prepare-only", "--model", str(model), "--sparsities", "0,50,70", "--nsamples", "4", "--seqlen", "32",
            f"--prune-arg=--calib={_text(tmp)}", "--export-arg=--sequence-length=64", "--export-arg=--greedy-tokens=4",
            "--work", str(work)]  # fmt: skip


def _made(work: Path) -> dict[str, bytes]:
    """The bytes of every pruned weight file and exported graph under ``work``."""
    files = [*work.glob("prune-*/*.safetensors"), *work.glob("onnx-*/model.onnx"), *work.glob("onnx-*/model.data")]
    return {str(f.relative_to(work)): f.read_bytes() for f in sorted(files)}


def test_sweep_prepares_on_local_ray_the_serial_folders_reports_a_failure_and_resumes(tmp_path):
    """benchmarks/sweep.py --ray --prepare-only on a tiny model: one job per point (prune, then export); the
    folders are byte for byte the serial sweep's; a point that fails is reported (exit 1) without losing the
    others, and the re-run makes only what is missing."""
    import sweep

    assert sweep.main(_sweep_argv(tmp_path, tmp_path / "serial")) == 0
    serial = _made(tmp_path / "serial")
    assert {k.split("/")[0] for k in serial} == {"onnx-dense", "onnx-wanda-owl-s50", "onnx-wanda-owl-s70",
                                                 "prune-wanda-owl-s50", "prune-wanda-owl-s70"}  # fmt: skip
    assert all(serial.values())
    work = tmp_path / "ray"
    blocker = work / "prune-wanda-owl-s70"
    blocker.mkdir(parents=True)
    (blocker / "keep.txt").write_text("not a prune output\n")  # prune refuses to replace it: that point fails
    assert sweep.main([*_sweep_argv(tmp_path, work), "--ray"]) == 1
    assert {k.split("/")[0] for k in _made(work)} == {"onnx-dense", "onnx-wanda-owl-s50", "prune-wanda-owl-s50"}
    stats = {p.name: p.stat().st_mtime_ns for p in work.glob("*.stats.json")}
    shutil.rmtree(blocker)
    assert sweep.main([*_sweep_argv(tmp_path, work), "--ray"]) == 0
    assert _made(work) == serial
    again = {p.name: p.stat().st_mtime_ns for p in work.glob("*.stats.json")}
    assert {k: again[k] for k in stats} == stats and len(again) == len(stats) + 2  # only s70 was made


def test_sweep_on_two_node_loopback_cluster_makes_the_serial_folders(tmp_path, two_nodes):
    """benchmarks/sweep.py --ray-address on a real two-node cluster (two raylets on loopback, one worker per
    node): the same pruned weights and graphs, byte for byte, as the serial sweep."""
    import sweep

    assert sweep.main(_sweep_argv(tmp_path, tmp_path / "serial")) == 0
    work = tmp_path / "cluster"
    assert sweep.main([*_sweep_argv(tmp_path, work), "--ray-address", two_nodes, "--ray-workers", "2"]) == 0
    assert _made(work) == _made(tmp_path / "serial") and len(_made(work)) >= 5
