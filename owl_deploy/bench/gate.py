"""The regression gate: each run's speedup over dense ONNX Runtime against a baseline results.json.

Ratios, not times: a CI machine that is 20% slower overall does not fail the gate; an engine whose
lead over the reference shrank does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from owl_deploy.bench.measure import HEADLINE, REFERENCE, SCHEMA, run_key
from owl_deploy.errors import OwlError, one_line

#: exit status of ``owl-deploy bench`` when the regression gate fails / when --strict refuses a noisy run
EXIT_REGRESSION = 3
EXIT_NOISY = 4


class GateFailed(OwlError):
    """The speedup of at least one engine fell more than the tolerance below the baseline's."""


def load_results(path: Path | str) -> dict[str, Any]:
    """Read a results.json (or the BDIR holding one); one-line errors for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise OwlError(f"baseline {path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise OwlError(f"baseline {path}: not a readable JSON file ({one_line(exc)})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("runs"), dict):
        raise OwlError(f"baseline {path}: not a results.json of `owl-deploy bench` (schema {SCHEMA})")
    return data


def compare(current: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Compare each run's speedup over dense ONNX Runtime with the baseline's (ratios, not times).

    A run regresses when ``current < baseline x (1 - tolerance)``.  Runs present in only one file are
    listed, not judged; the headline run must be in both.
    """
    if not 0 <= tolerance < 1:
        raise OwlError(f"--tolerance must be in [0, 1), got {tolerance}")
    checks, regressed, notes = [], [], []
    cur_runs, base_runs = current.get("runs", {}), baseline.get("runs", {})
    ref = (current.get("headline") or {}).get("reference") or run_key(*REFERENCE)
    for key in sorted(set(cur_runs) | set(base_runs)):
        if key == ref:
            continue
        c = (cur_runs.get(key) or {}).get("speedup_vs_dense_ort")
        b = (base_runs.get(key) or {}).get("speedup_vs_dense_ort")
        if c is None or b is None:
            notes.append(f"{key}: only in the {'baseline' if c is None else 'current run'}; not compared")
            continue
        change = c / b - 1.0 if b else 0.0
        bad = c < b * (1.0 - tolerance)
        checks.append({"run": key, "baseline": b, "current": c, "change": round(change, 4), "regressed": bool(bad)})
        if bad:
            regressed.append(key)
    head = (current.get("headline") or {}).get("run") or run_key(*HEADLINE)
    if head not in {c["run"] for c in checks}:
        notes.append(f"the headline run {head} is not in both results; it was not gated")
    hw_c, hw_b = current.get("hardware") or {}, baseline.get("hardware") or {}
    if hw_c.get("cpu_model") and hw_b.get("cpu_model") and hw_c["cpu_model"] != hw_b["cpu_model"]:
        notes.append(f"the baseline ran on a different CPU ({hw_b['cpu_model']} vs {hw_c['cpu_model']})")
    if (baseline.get("noise") or {}).get("noisy"):
        notes.append("the baseline run was flagged noisy")
    if (current.get("noise") or {}).get("noisy"):
        notes.append("this run was flagged noisy")
    return {
        "tolerance": tolerance,
        "passed": not regressed,
        "regressed": regressed,
        "checks": checks,
        "notes": notes,
        "current_noisy": bool((current.get("noise") or {}).get("noisy")),
    }


def gate_message(result: dict[str, Any]) -> str:
    parts = []
    for c in result["checks"]:
        if c["regressed"]:
            parts.append(
                f"{c['run']} speedup vs dense ONNX Runtime {c['current']:.3f}x is {-c['change']:.1%} below the "
                f"baseline's {c['baseline']:.3f}x (tolerance {result['tolerance']:.0%})"
            )
    msg = "regression: " + "; ".join(parts)
    if result.get("current_noisy"):
        msg += " [this run was flagged noisy: re-run on a quiet machine (or with --strict) before trusting it]"
    return msg
