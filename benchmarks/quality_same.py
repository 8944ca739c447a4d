#!/usr/bin/env python
"""Do two quality studies agree?  Every configuration both ran (and the dense model), compared bit for bit.

    .venv/bin/python benchmarks/quality_same.py benchmarks/results/A.json benchmarks/results/B.json \\
        [--out-stem STEM]

A row is the same when its per-window NLLs are equal to the last bit (so its perplexity, mean and standard error
are too) and so are its block sparsities; otherwise the largest per-window difference is shown. For a study run
on a Ray cluster against a serial run of the same code and thread count (benchmarks/quality.py --serial): the
cluster must change nothing. Either file may be a study's ``.<stem>.partial.json`` (its rows finished so far).
Exit 1 when a shared row differs or none is shared. ``--out-stem`` writes
benchmarks/results/<stem>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quality_report import label  # noqa: E402

from owl_deploy.io import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TIMING = {"seconds"}


def _key(cfg: dict) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k not in TIMING}, sort_keys=True)


def _rows(res: dict) -> dict[str, dict]:
    if isinstance(res["rows"], dict):  # a running or interrupted study's .partial.json (quality.py's checkpoint)
        done = res["rows"]
        # its evaluation rows are keyed by repr(config); tagged ones ("held-out ...") were scored on other text
        # (a serial run keeps its dense score in memory only: then there is no dense row to compare)
        res = {"dense": done.get("dense"), "rows": [r for k, r in done.items() if k.startswith("(")]}
    rows = {"dense": {"config": {"method": "dense"}, **res["dense"]}} if res["dense"] else {}
    for r in res["rows"]:
        rows[_key(r["config"])] = r
    return rows


def compare(a: dict, b: dict) -> list[dict]:
    """One entry per configuration both studies ran, in ``a``'s order."""
    ra, rb = _rows(a), _rows(b)
    out = []
    for key, x in ra.items():
        if key not in rb:
            continue
        y = rb[key]
        diff = max(abs(p - q) for p, q in zip(x["window_nll"], y["window_nll"], strict=True))
        same = x["window_nll"] == y["window_nll"] and x.get("block_sparsity") == y.get("block_sparsity")
        cfg = x["config"]
        name = (
            "dense"
            if key == "dense"
            else f"{label(cfg)} {cfg['sparsity']:.0%}" + (f" {cfg['nm']}" if cfg["nm"] else "")
        )
        out.append(
            {"row": name, "ppl_a": x["perplexity"], "ppl_b": y["perplexity"], "same": same, "max_window_diff": diff}
        )
    return out


def markdown(a_path: str, b_path: str, a: dict, b: dict, rows: list[dict]) -> str:
    def who(path: str, res: dict) -> str:
        if "meta" not in res:
            return f"`{Path(path).name}` (the rows finished so far of a study that did not complete)"
        m = res["meta"]
        ray = m.get("ray") or {}
        how = f"Ray at {ray['address']}, {ray.get('threads_per_worker')} thread(s) per worker" if ray else "serial"
        return f"`{Path(path).name}` ({how}; {m['cpu']}, {m['threads']} threads, {m['date']})"

    n_same = sum(r["same"] for r in rows)
    lines = [
        "# Two quality studies, row by row",
        "",
        f"A: {who(a_path, a)}  ",
        f"B: {who(b_path, b)}",
        "",
        f"{len(rows)} configurations in both; **{n_same} identical to the last bit** (per-window NLL and block "
        "sparsities), " + f"{len(rows) - n_same} different.",
        "",
        "| row | perplexity A | perplexity B | identical | largest per-window NLL difference |",
        "|---|---:|---:|:---:|---:|",
    ]
    lines += [
        f"| {r['row']} | {r['ppl_a']:.4f} | {r['ppl_b']:.4f} | {'yes' if r['same'] else '**no**'} | "
        f"{r['max_window_diff']:.3g} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="a quality study's JSON (benchmarks/quality.py)")
    p.add_argument("b", help="another one")
    p.add_argument("--out-stem", default=None, help="write benchmarks/results/<stem>.{json,md}")
    args = p.parse_args()
    try:
        a, b = (json.loads(Path(x).read_text()) for x in (args.a, args.b))
        rows = compare(a, b)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot compare {args.a} and {args.b}: {e!r}") from None
    md = markdown(args.a, args.b, a, b, rows)
    print(md, end="")
    if args.out_stem:
        write_report(RESULTS / args.out_stem, {"a": args.a, "b": args.b, "rows": rows}, md)
    if not rows:
        raise SystemExit("error: the two studies share no configuration")
    if not all(r["same"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
