"""Fault injection on every command that writes (prune, recover, export, bench, run): a full disk, a read-only
output, SIGKILL at exact points followed by a re-run, and corrupt or foreign inputs.

Each fault must end in one ``error:`` line and a non-zero exit, leave no complete-looking output, and a
re-run must leave no leftovers and produce what an uninterrupted run produces. Disk faults use a real
tmpfs (a small one for ENOSPC, a read-only one for EROFS); kills are sent by the process itself at a
chosen call (tests/fault_cli.py), so the point is exact and repeatable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import save_tiny

from owl_deploy.cli import main

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
COMMANDS = ("prune", "recover", "export", "bench", "run")


# ---------------------------------------------------------------- inputs and the commands' arguments
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama, a calibration text, its pruned folder and a deployment of it (made once)."""
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny("llama", root / "model", hidden=32, layers=2)
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.\n" * 60)
    paths = {"root": root, "model": model, "text": text}
    paths["pruned"] = root / "pruned"
    assert _cli(args("prune", paths, paths["pruned"])).exit_code == 0
    paths["odir"] = root / "odir"
    assert _cli(args("export", paths, paths["odir"])).exit_code == 0
    recipe = {
        "name": "tiny",
        "model": str(model),
        "calibration": {"text": str(text), "nsamples": 4, "seqlen": 32},
        "prune": {"sparsity": 0.5},
        "tune": {"m": [5], "lambda": [0.08], "heldout_tokens": 256, "seqlen": 32, "nsamples": 4},
        "evaluate": {"text": str(text), "seqlen": 32, "max_tokens": 256},
        "export": {"sequence_length": 64, "greedy_tokens": 4},
        "compile": {"engine": "onnxruntime", "max_new_tokens": 4},
        "bench": {"rounds": 1, "warmup_rounds": 0, "steps": 2, "context": 4, "prefill_length": 4},
    }
    recipe["bench"] |= {"measure_bandwidth": False, "gap_seconds": 0.0}
    paths["recipe"] = root / "tiny.yaml"
    paths["recipe"].write_text(json.dumps(recipe))
    return paths


def args(cmd: str, p: dict[str, Path], out: Path) -> list[str]:
    if cmd == "prune":
        calib = ["--calib", str(p["text"]), "--nsamples", "4", "--seqlen", "32"]
        return ["prune", "--model", str(p["model"]), "--sparsity", "0.5", *calib, "--out", str(out)]
    if cmd == "recover":
        text = str(p["text"])
        fast = ["--steps", "4", "--batch-size", "2", "--seqlen", "32", "--eval-every", "2", "--heldout-tokens", "64"]
        return ["recover", "--model", str(p["pruned"]), "--calib", text, *fast, "--eval-text", text,
                "--eval-tokens", "128", "--eval-seqlen", "32", "--out", str(out)]  # fmt: skip
    if cmd == "export":
        fast = ["--sequence-length", "64", "--prefill-length", "4", "--greedy-tokens", "4"]
        return ["export", "--model", str(p["pruned"]), *fast, "--out", str(out)]
    if cmd == "bench":
        fast = ["--rounds", "1", "--warmup-rounds", "0", "--steps", "2", "--context", "4", "--prefill-length", "4"]
        return ["bench", "--sparse", str(p["odir"]), "--dense", str(p["odir"]), *fast, "--no-measure-bandwidth",
                "--out", str(out)]  # fmt: skip
    return ["run", str(p["recipe"]), "--out", str(out)]


def _cli(argv: list[str]):
    return CliRunner().invoke(main, argv)


def _subprocess(argv: list[str], fault: str | None = None, action: str = "kill-after") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if fault:
        env |= {"OWL_FAULT": fault, "OWL_FAULT_ACTION": action}
    cmd = [sys.executable, str(TESTS / "fault_cli.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def _checkpoints(folder: Path) -> list[Path]:
    """recover's resumable checkpoints (``.NAME.recover-KEY``), kept by a killed run for the next one."""
    return [p for p in folder.rglob(".*") if ".recover-" in p.name]


def _hidden(folder: Path) -> list[Path]:
    """Temporary siblings a writer leaves behind (``.NAME.tmp-*``, ``.NAME.old-*``), anywhere below."""
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def _weights_hash(out: Path) -> str:
    """One digest of every safetensors shard of a model folder, in name order."""
    digest = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def _result(cmd: str, out: Path) -> object:
    """What must be the same after an interrupted run and its re-run as after one clean run."""
    if cmd == "prune":
        report = json.loads((out / "sparsity.json").read_text())
        report.pop("timings"), report.pop("peak_rss_mb")
        return report, _weights_hash(out)
    if cmd == "recover":
        report = json.loads((out / "recover.json").read_text())
        kept = ("zeros", "perplexity", "evals", "best", "steps_run")
        return {k: report[k] for k in kept}, _weights_hash(out)
    if cmd == "export":
        report = json.loads((out / "export.json").read_text())
        kept = ("zeros", "greedy", "files", "spec", "ok", "weight_bytes", "contract")
        return {k: report[k] for k in kept}, hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    if cmd == "bench":
        res = json.loads((out / "results.json").read_text())
        return sorted(res["runs"]), res["agreement"], {k: res["settings"][k] for k in ("steps", "context")}
    summary = json.loads((out / "summaries" / "tiny.json").read_text())
    return {k: summary[k] for k in ("perplexity", "sparsity", "export")}


@pytest.fixture(scope="module")
def clean(inputs) -> dict[str, object]:
    """Each command's result from one uninterrupted run."""
    results = {}
    for cmd in COMMANDS:
        out = inputs["root"] / f"clean-{cmd}"
        res = _subprocess(args(cmd, inputs, out)) if cmd == "run" else _cli(args(cmd, inputs, out))
        code = res.returncode if cmd == "run" else res.exit_code
        assert code == 0, res.stderr[-2000:]
        results[cmd] = _result(cmd, out)
    return results


# ---------------------------------------------------------------- a full disk and a read-only output
@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


#: a tmpfs smaller than what each command writes (the tiny model's weights are ~150 kB, a benchmark's report ~50 kB)
FULL = {"prune": "96k", "recover": "96k", "export": "96k", "bench": "16k", "run": "96k"}


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize(
    ("fault", "cause"), [("enospc", "No space left on device"), ("erofs", "Read-only file system")]
)
def test_disk_faults_are_one_line_and_leave_nothing(inputs, tmp_path, cmd, fault, cause):
    with tmpfs(tmp_path / "mnt", FULL[cmd] if fault == "enospc" else "1m", readonly=fault == "erofs") as mnt:
        out = mnt / "out"
        res = _subprocess(args(cmd, inputs, out))
        assert res.returncode == 1, res.stderr
        line = _one_error_line(res.stderr)
        assert line == f"error: cannot write {out}: {cause}", line
        assert not _hidden(mnt), _hidden(mnt)
        if cmd == "run":  # stages completed before the fault stay (they are whole); the failed one left nothing
            assert not list(out.glob("prune/*/done.json"))
        else:
            assert not out.exists()


# ---------------------------------------------------------------- SIGKILL at exact points, then a re-run
KILLS = [
    ("prune", "safetensors.torch:save_file", "kill-before"),  # the output folder just created, empty
    ("prune", "safetensors.torch:save_file", "kill-after"),  # the first pruned block written, the rest not
    ("prune", "owl_deploy.model:save_tokenizer", "kill-after"),  # weights written, no sparsity.json yet
    ("prune", "owl_deploy.io:write_json", "kill-after"),  # everything written, not renamed into place
    ("recover", "owl_deploy.recover:_save_checkpoint", "kill-after"),  # half-trained: the re-run resumes
    ("recover", "owl_deploy.model:save_model", "kill-after"),  # merged weights written, no recover.json
    ("export", "owl_deploy.export:export_onnx", "kill-after"),  # model.onnx written, nothing verified
    ("export", "owl_deploy.export.verify:engine_sparsity", "kill-before"),  # verified in both engines
    ("bench", "owl_deploy.bench.report:render_png", "kill-before"),  # results.json and .md written
    ("run", "owl_deploy.export:export_onnx", "kill-after"),  # mid-way through the export stage
]


@pytest.mark.parametrize(("cmd", "fault", "action"), KILLS)
def test_a_killed_command_leaves_no_output_and_the_rerun_matches_a_clean_run(
    inputs, clean, tmp_path, cmd, fault, action
):
    out = tmp_path / "out"
    killed = _subprocess(args(cmd, inputs, out), fault, action)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if cmd != "run":  # nothing that looks complete: the output folder does not exist yet
        # (the killed writer's temporary folder is left, or recover's checkpoint it resumes from)
        assert not out.exists() and (_hidden(tmp_path) or _checkpoints(tmp_path))
    else:
        assert not list(out.glob("export/*/done.json")) and _hidden(out)
    again = _subprocess(args(cmd, inputs, out))
    assert again.returncode == 0, again.stderr
    assert not _hidden(tmp_path), _hidden(tmp_path)  # the re-run removed what the killed run left
    assert not _checkpoints(tmp_path), _checkpoints(tmp_path)
    assert _result(cmd, out) == clean[cmd]


def test_a_rerun_leaves_a_live_writers_folder_alone(tmp_path):
    """Only leftovers of dead writers are removed: a concurrent live writer keeps its temporary folder."""
    from owl_deploy.io import atomic_dir

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / f".out.tmp-{live.pid}-abc").mkdir()
        (tmp_path / f".out.tmp-{dead.pid}-abc").mkdir()
        (tmp_path / f".other.tmp-{dead.pid}-abc").mkdir()  # another output's leftover: not ours to remove
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted([f".out.tmp-{live.pid}-abc", f".other.tmp-{dead.pid}-abc", "out"])
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- corrupt and foreign inputs
def _foreign_model(inputs, tmp_path: Path) -> Path:
    """The tiny Llama's folder with config.json claiming another architecture (BERT)."""
    src = tmp_path / "bert"
    shutil.copytree(inputs["model"], src)
    config = json.loads((src / "config.json").read_text())
    config |= {"model_type": "bert", "architectures": ["BertLMHeadModel"]}
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_a_foreign_architecture_is_refused_naming_the_weights(inputs, tmp_path):
    src = _foreign_model(inputs, tmp_path)
    out = tmp_path / "out"
    res = _cli(["prune", "--model", str(src), "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32",
                "--calib", str(inputs["text"]), "--out", str(out)])  # fmt: skip
    line = _one_error_line(res.stderr)
    assert res.exit_code == 1 and "as BertLMHeadModel" in line and "freshly initialised" in line
    assert "model.layers.0" in line and not out.exists() and not _hidden(tmp_path)
    res = _cli(["export", "--model", str(src), "--out", str(out)])
    assert res.exit_code == 1 and "freshly initialised" in _one_error_line(res.stderr) and not out.exists()


def test_a_recipe_on_a_foreign_model_fails_at_its_first_load(inputs, tmp_path):
    recipe = json.loads(inputs["recipe"].read_text()) | {"model": str(_foreign_model(inputs, tmp_path))}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    res = _subprocess(["run", str(path), "--out", str(tmp_path / "cache")])
    assert res.returncode == 1
    assert "stage tune failed: cannot load" in _one_error_line(res.stderr)  # the first stage that loads it
    assert not _hidden(tmp_path / "cache")


def test_corrupt_deployments_are_refused(inputs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(inputs["odir"], bad)
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:1000])
    for argv in (args("bench", {**inputs, "odir": bad}, tmp_path / "b"), ["eval", "--model", str(bad)]):
        res = _cli(argv)
        assert res.exit_code == 1 and "not a readable ONNX model" in _one_error_line(res.stderr)
    assert not (tmp_path / "b").exists()
    (bad / "model.onnx").unlink()  # a deployment folder without its graph: say what is missing
    res = _cli(["eval", "--model", str(bad)])
    assert res.exit_code == 1 and "has no model.onnx" in _one_error_line(res.stderr)


def test_external_data_outside_the_folder_is_refused(inputs, tmp_path):
    import onnx

    from owl_deploy import runtime
    from owl_deploy.errors import OwlError

    odir = tmp_path / "odir"
    shutil.copytree(inputs["odir"], odir)
    proto = onnx.load(str(odir / "model.onnx"))
    onnx.save_model(proto, str(odir / "model.onnx"), save_as_external_data=True, location="w.data")
    proto = onnx.load(str(odir / "model.onnx"), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    onnx.save_model(proto, str(odir / "model.onnx"))
    with pytest.raises(OwlError, match="outside its folder"):
        runtime.open_deployment(odir)


def test_a_missing_tokenizer_is_named_before_anything_slow(inputs, tmp_path):
    odir = tmp_path / "odir"
    shutil.copytree(inputs["odir"], odir)
    for f in odir.glob("tokenizer*"):
        f.unlink()
    res = _cli(["generate", "--model", str(odir), "--prompt", "hello"])
    assert res.exit_code == 1 and "has no tokenizer files" in _one_error_line(res.stderr)
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    res = _cli(["prune", "--model", str(model), "--sparsity", "0.5", "--out", str(tmp_path / "p")])
    line = _one_error_line(res.stderr)
    assert res.exit_code == 1 and "cannot load tokenizer" in line and not line.endswith(":")
