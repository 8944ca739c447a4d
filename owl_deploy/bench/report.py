"""Reports of a benchmark: results.md, decode.png and the summary lines, from a results.json dictionary."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy.bench.measure import SHORT
from owl_deploy.errors import OwlError

#: bar colour per engine in decode.png
COLORS = {"deepsparse": "#d62728", "onnxruntime": "#1f77b4", "llama.cpp": "#2ca02c", "ort-standard": "#9467bd"}


def engine_name(engine: str) -> str:
    return SHORT.get(engine, engine)


def _versus(sentence: str, by_round: dict[str, Any], tail: str) -> list[str]:
    """One headline ratio with its per-round spread (when rounds were timed), as a paragraph."""
    spread = f" (per-round p10–p90 {by_round['p10']:.2f}–{by_round['p90']:.2f})" if by_round.get("n") else ""
    return [sentence + spread + tail, ""]


def render_markdown(res: dict[str, Any]) -> str:
    s, noise = res["settings"], res["noise"]
    lines = ["# Decode benchmark", ""]
    if noise["noisy"]:
        lines += ["> **NOISY RUN** — the numbers below are not trustworthy:", ">"]
        lines += [f"> - {r}" for r in noise["reasons"]] + [""]
    head = res.get("headline")
    if head:
        first = (
            f"**Headline:** {head['run']} decodes at {head['decode_tokens_per_s']:.1f} tok/s = "
            f"**{head['speedup_vs_dense_ort']:.2f}x** {head['reference']} ({head['reference_decode_tokens_per_s']:.1f} "
            "tok/s)"
        )
        lines += _versus(first, head["speedup_by_round"], "; the bytes-per-token ceiling of that ratio is "
                         f"{head['ceiling_speedup_bytes']:.2f}x.")  # fmt: skip
        if head.get("second_reference"):  # dense int8 in ONNX Runtime (--model dense-int8=ODIR), not the fastest
            first = (
                f"Against the dense int8 reference, {head['second_reference']}: "
                f"**{head['speedup_vs_second_reference']:.2f}x**"
            )
            ceiling = f"; bytes-per-token ceiling {head['ceiling_speedup_bytes_vs_second_reference']:.2f}x."
            lines += _versus(first, head["speedup_vs_second_reference_by_round"], ceiling)
        if head.get("strongest_peer"):
            first = (
                f"Against the strongest peer, {head['strongest_peer']} "
                f"({head['strongest_peer_decode_tokens_per_s']:.1f} tok/s): "
                f"**{head['speedup_vs_strongest_peer']:.2f}x**"
            )
            ceiling = f"; bytes-per-token ceiling {head['ceiling_speedup_bytes_vs_strongest_peer']:.2f}x."
            lines += _versus(first, head["speedup_vs_strongest_peer_by_round"], ceiling)
    elif res.get("strongest_peer"):
        lines += [f"Strongest peer: {res['strongest_peer']}.", ""]
    ds_kv = sorted({str(r.get("kv_cache")) for r in res["runs"].values() if r["engine"] == "deepsparse"})
    lines += [
        f"Batch 1, cache filled to {s['context']} of {s['sequence_length']} tokens, {s['steps']} decode steps x "
        f"{s['rounds']} rounds (+{s['warmup_rounds']} warm-up, not counted), engines interleaved round by round; "
        f"prefill in chunks of {s['prefill_length']}; "
        + (f"DeepSparse KV cache {', '.join(ds_kv)}; " if ds_kv else "")
        + "decode tok/s = median (p10–p90) over all timed steps; throughput = steps / their total time.",
        "",
        *_peer_note(res),
        "| engine | model | decode tok/s | throughput | step ms | prefill tok/s | vs dense ORT "
        + ("| vs strongest peer " if res.get("strongest_peer") else "")
        + "| ceiling tok/s | of ceiling |",
        "|---|---|---|---|---|---|---" + ("|---" if res.get("strongest_peer") else "") + "|---|---|",
    ]
    for r in res["runs"].values():
        d, ms, p = r["decode_tokens_per_s"], r["decode_step_ms"], r["prefill_tokens_per_s"]
        pre = f"{p['median']:.1f} ({p['p10']:.1f}–{p['p90']:.1f})" if p and p.get("n") else "—"
        ceil = (
            f"{r['ceiling_tokens_per_s']:.0f} ({r['bytes_per_token_encoding']})" if r["ceiling_tokens_per_s"] else "—"
        )
        frac = f"{r['fraction_of_ceiling']:.0%}" if r["fraction_of_ceiling"] else "—"
        vs_peer = f"{_x(r.get('speedup_vs_strongest_peer'))} | " if res.get("strongest_peer") else ""
        lines.append(
            f"| {engine_name(r['engine'])} | {r['model']} | {d['median']:.2f} ({d['p10']:.2f}–{d['p90']:.2f}) | "
            f"{r.get('decode_throughput_tokens_per_s') or 0:.2f} | {ms['median']:.2f} | {pre} | "
            f"{_x(r['speedup_vs_dense_ort'])} | {vs_peer}{ceil} | {frac} |"
        )
    lines += _prefill_markdown(res) + _throughput_markdown(res)
    lines += [
        "",
        "## Models",
        "",
        "| model | zeros in block weights | zeros in all MatMul weights | bytes/token dense | bytes/token bitmask "
        "| path |",
    ]
    lines += ["|---|---|---|---|---|---|"]
    for label, m in res["models"].items():
        w, bpt = m["weights"], m["bytes_per_token"]
        sp, spb = w.get("sparsity"), w.get("sparsity_excluding_lm_head")
        lines.append(
            f"| {label} | {spb or 0:.1%} | {sp:.1%} | {megabytes(bpt['dense'])} | {megabytes(bpt['bitmask'])} "
            f"| `{m['path']}` |"
            if sp is not None
            else f"| {label} | — | — | — | — | `{m['path']}` |"
        )
    if res.get("agreement"):
        lines += [
            "",
            "Same model in both engines: "
            + "; ".join(
                f"{k}: greedy tokens {'identical' if v['same_greedy_tokens'] else 'DIFFER'}"
                + (
                    f", max |Δlogit| {v['first_step_max_abs_logit_diff']:.2e}"
                    if v["first_step_max_abs_logit_diff"] is not None
                    else ""
                )
                for k, v in res["agreement"].items()
            ),
        ]
        if any(not v["same_greedy_tokens"] and _is_int8(res["models"].get(k)) for k, v in res["agreement"].items()):
            lines.append(
                "(int8 graphs: DeepSparse rounds int8 differently from ONNX Runtime, so greedy tokens part after a "
                "while at equal quality; compare `owl-deploy eval --engine deepsparse` with `--engine onnxruntime` "
                "on the same folder.)"
            )
    lines += peers_markdown(res)
    lines += machine_markdown(res)
    g = res.get("gate")
    if g:
        lines += [
            "",
            f"## Regression gate ({'PASSED' if g['passed'] else 'FAILED'}, tolerance {g['tolerance']:.0%})",
            "",
        ]
        lines += ["| run | baseline speedup | this run | change | |", "|---|---|---|---|---|"]
        for c in g["checks"]:
            mark = "REGRESSED" if c["regressed"] else "ok"
            lines.append(f"| {c['run']} | {c['baseline']:.3f}x | {c['current']:.3f}x | {c['change']:+.1%} | {mark} |")
        lines += [f"- {n}" for n in g["notes"]]
    lines.append("")
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    return f"{ratio:.3f}x" if ratio is not None else "—"


def _spread(stat: dict[str, Any] | None, fmt: str = ".1f") -> str:
    if not stat or not stat.get("n"):
        return "—"
    return f"{stat['median']:{fmt}} ({stat['p10']:{fmt}}–{stat['p90']:{fmt}})"


def _numeric(by_size: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """Items keyed by a batch size or prompt length, in numeric order (JSON keys are sorted as strings)."""
    return sorted((by_size or {}).items(), key=lambda kv: int(kv[0]))


def _prefill_markdown(res: dict[str, Any]) -> list[str]:
    """Prefill tok/s and time to first token per prompt length (batch 1, from an empty cache)."""
    rows = [(r, n, v) for r in res["runs"].values() for n, v in _numeric(r.get("prefill_by_length"))]
    if not rows:
        return []
    out = ["", "## Prefill and time to first token (batch 1, empty cache)", ""]
    out += ["| engine | model | prompt tokens | prefill tok/s | TTFT ms |", "|---|---|---:|---|---|"]
    for r, n, v in rows:
        out.append(
            f"| {engine_name(r['engine'])} | {r['model']} | {n} | {_spread(v['tokens_per_s'])} | "
            f"{_spread(v['ttft_ms'])} |"
        )
    return out


def _throughput_markdown(res: dict[str, Any]) -> list[str]:
    """Decode throughput by batch size: the serving path (``runtime.Decoder``) above batch 1."""
    tp = res.get("throughput") or {}
    if not tp:
        return []
    out = [
        "",
        "## Decode throughput by batch size",
        "",
        "Batch 1 is the run above; larger batches step that many sequences together through `runtime.Decoder` "
        "with the KV caches `owl-deploy serve` uses (internal: one DeepSparse cache per row; external: numpy "
        "arrays fed in and out each step), each row from the same cached context. "
        "Greedy ✓: every row decoded exactly the batch-1 tokens of the same plan (ONNX Runtime's for fp32 graphs; "
        "DeepSparse rounds int8 its own way, so its int8 rows are checked against its own batch 1).",
        "",
        "| engine | model | batch | KV cache | per-stream tok/s | aggregate tok/s | step ms | greedy |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for key, by_batch in tp.items():
        engine, model = key.split("/", 1)
        for b, v in _numeric(by_batch):
            ok = v["same_greedy_tokens_as_batch_1"]
            mark = "—" if ok is None else ("✓" if ok else "DIFFER")
            out.append(
                f"| {engine_name(engine)} | {model} | {b} | {(v.get('kv_cache') or '—').split(' ')[0]} | "
                f"{_spread(v['per_stream_tokens_per_s'], '.2f')} | "
                f"{_spread(v['aggregate_tokens_per_s'])} | {_spread(v['step_ms'], '.2f')} | {mark} |"
            )
    return out


def _is_int8(model: dict[str, Any] | None) -> bool:
    """A benchmarked deployment exported with ``--quantize int8`` (its export report says so)."""
    return bool(model) and (model.get("export") or {}).get("quantize") == "int8"


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per engine x model x test, as llama-bench prints them: ``pp<N>`` prefill of an N-token
    prompt (with its time to first token), ``tg<steps>@d<context>`` decode after ``context`` cached tokens
    at each batch size (per-stream and aggregate tok/s). Medians; p10/p90 beside them."""
    s, rows = res["settings"], []
    tg = f"tg{s['steps']}@d{s['context']}"
    for key, r in res["runs"].items():
        base = {"engine": r["engine"], "model": r["model"], "bytes_per_token": r["bytes_per_token"]}
        for n, v in _numeric(r.get("prefill_by_length")):
            t, f = v["tokens_per_s"], v["ttft_ms"]
            rows.append({**base, "batch": 1, "test": f"pp{n}", "tokens_per_s": t["median"], "p10": t["p10"],
                         "p90": t["p90"], "aggregate_tokens_per_s": t["median"], "ttft_ms": f["median"],
                         "speedup_vs_dense_ort": None})  # fmt: skip
        by_batch = (res.get("throughput") or {}).get(key) or {}
        d = r["decode_tokens_per_s"]
        rows.append({**base, "batch": 1, "test": tg, "tokens_per_s": d["median"], "p10": d["p10"], "p90": d["p90"],
                     "aggregate_tokens_per_s": d["median"], "ttft_ms": None,
                     "speedup_vs_dense_ort": r["speedup_vs_dense_ort"]})  # fmt: skip
        for b, v in _numeric(by_batch):
            if b == "1":
                continue
            p, a = v["per_stream_tokens_per_s"], v["aggregate_tokens_per_s"]
            rows.append({**base, "batch": int(b), "test": tg, "tokens_per_s": p["median"], "p10": p["p10"],
                         "p90": p["p90"], "aggregate_tokens_per_s": a["median"], "ttft_ms": None,
                         "speedup_vs_dense_ort": None})  # fmt: skip
    return rows


def render_table(res: dict[str, Any], fmt: str = "md") -> str:
    """The stdout table: ``md`` (llama-bench's look), ``csv`` (one row per test) or ``json`` (results.json)."""
    import csv
    import io
    import json

    if fmt == "json":
        return json.dumps(res, indent=2, sort_keys=True, default=str) + "\n"
    rows = table_rows(res)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["engine"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def num(v: float | None, f: str = ".2f") -> str:
        return "—" if v is None else f"{v:{f}}"

    out = [
        "| engine | model | MB/token | batch | test | t/s (p10–p90) | aggregate t/s | TTFT ms | vs dense ORT |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {engine_name(r['engine'])} | {r['model']} | {r['bytes_per_token'] / 1e6:.1f} | {r['batch']} | "
            f"{r['test']} | {num(r['tokens_per_s'])} ({num(r['p10'])}–{num(r['p90'])}) | "
            f"{num(r['aggregate_tokens_per_s'])} | {num(r['ttft_ms'], '.1f')} | {_x(r['speedup_vs_dense_ort'])} |"
        )
    hw = res["hardware"]
    out.append("")
    out.append(f"{hw['cpu_model']}, {hw['physical_cores']} cores" + ("; NOISY RUN" if res["noise"]["noisy"] else ""))
    return "\n".join(out) + "\n"


def _peer_note(res: dict[str, Any]) -> list[str]:
    if not res.get("peers"):
        return []
    return [
        "Peers (what users run instead) ran in the same rounds with the same threads: llama.cpp prefills the "
        "prompt in one batch, the standard ORT export in one call; their KV cache grows with the sequence.",
        "",
    ]


def peers_markdown(res: dict[str, Any]) -> list[str]:
    """The "## Peers" section: each peer's file, format and bytes per token, and its agreement with the
    reference on the benchmark prompt."""
    peers = res.get("peers") or {}
    if not peers:
        return []
    lines = [
        "",
        "## Peers",
        "",
        "| peer | format | file size | bytes/token (weights + KV) | threads | same greedy tokens as reference "
        "| max Δlogit (step 1) | path |",
        "|---|---|---|---|---|---|---|---|",
    ]
    agree = res.get("peer_agreement") or {}
    for key, p in peers.items():
        fmt = p.get("format") or {}
        kind = fmt.get("file_type")
        kind = f"GGUF ftype {kind}" if kind is not None else ("ONNX" if p["engine"] == "ort-standard" else "—")
        a = agree.get(key) or {}
        diff = a.get("first_step_max_abs_logit_diff")
        same = {True: "yes", False: "no"}.get(a.get("same_greedy_tokens"), "—")
        bpt = p["bytes_per_token"]
        lines.append(
            f"| {key} | {kind} | {megabytes(p['bytes'])} | {megabytes(bpt['dense'])} "
            f"({megabytes(bpt['weights_dense'])} + {megabytes(bpt['kv_cache'])}) | "
            f"{(p.get('runtime') or {}).get('threads') or 'default'} | {same} | "
            f"{f'{diff:.2e}' if diff is not None else '—'} | `{p['path']}` |"
        )
    info = next(
        (p["runtime"].get("system_info") for p in peers.values() if (p.get("runtime") or {}).get("system_info")), None
    )
    if info:
        lines += ["", f"llama.cpp system info: `{info}`"]
    return lines


def _speed_line(noise: dict[str, Any]) -> list[str]:
    """The CPU's own speed across the session-rounds (records before it have none)."""
    speed = noise.get("cpu_speed")
    if not speed:
        return []
    if speed["two_speeds"]:
        return [f"- CPU speed: **two speeds** — {speed['slow_rounds']} of {speed['judged_rounds']} session-rounds "
                f"{speed['slow_over_fast']}x slower, in {', '.join(speed['slow_sessions'])}"]  # fmt: skip
    limit = (noise.get("policy") or {}).get("phase_ratio", 1.2)
    return [f"- CPU speed: steady over {speed['judged_rounds']} session-rounds (no group of them {limit}x slower than "
            "the rest)"]  # fmt: skip


def megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e7 else f"{nbytes / 1e6:.3f} MB"


def render_png(res: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(res["runs"].values())
    labels = [f"{engine_name(r['engine'])}\n{r['model']}" for r in runs]
    colors = [COLORS.get(r["engine"], "#7f7f7f") for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 1.8 * len(runs) + 2), 4.2))
    x = np.arange(len(runs))
    for ax, field_, title in (
        (axes[0], "decode_tokens_per_s", "decode tokens/s (batch 1)"),
        (axes[1], "prefill_tokens_per_s", f"prefill tokens/s ({res['settings']['context']}-token prompt)"),
    ):
        med = [((r[field_] or {}).get("median") or 0.0) for r in runs]
        lo = [max(0.0, m - ((r[field_] or {}).get("p10") or m)) for m, r in zip(med, runs, strict=True)]
        hi = [max(0.0, ((r[field_] or {}).get("p90") or m) - m) for m, r in zip(med, runs, strict=True)]
        ax.bar(x, med, color=colors, yerr=[lo, hi], capsize=4, alpha=0.85)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if field_ == "decode_tokens_per_s":
            top = max(max(m + h for m, h in zip(med, hi, strict=True)) * 1.25, 1e-9)
            ceils = [r["ceiling_tokens_per_s"] or 0.0 for r in runs]
            ymax = max(top, min(max(ceils), top * 2.5))
            ax.set_ylim(0, ymax)
            for i, r in enumerate(runs):
                c = ceils[i]
                if c and c <= ymax:
                    ax.plot([i - 0.4, i + 0.4], [c, c], "k--", lw=1)
                elif c:
                    ax.annotate(f"ceiling {c:.0f} ↑", (i, ymax * 0.97), ha="center", va="top", fontsize=7)
                if r["speedup_vs_dense_ort"]:
                    ax.annotate(
                        f"{r['speedup_vs_dense_ort']:.2f}x", (i, med[i] + hi[i]), ha="center", va="bottom", fontsize=8
                    )
            ax.plot([], [], "k--", lw=1, label="bytes/token ceiling")
            ax.legend(fontsize=8, loc="upper left")
    hw = res["hardware"]
    title = f"{hw['cpu_model']}, {hw['physical_cores']} cores — context {res['settings']['context']}"
    if res["noise"]["noisy"]:
        title = "NOISY RUN — " + title
    fig.suptitle(title, fontsize=10, color="red" if res["noise"]["noisy"] else "black")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


RESULT_FILES = ("results.json", "results.md", "decode.png")


def check_out_dir(out_dir: Path | str) -> None:
    """The results folder is replaced whole: refuse one that holds anything a bench did not write (it would be
    lost with it). Checked before the run and again when writing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OwlError(f"--out {out_dir} is a file, not a folder")
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in RESULT_FILES) if out_dir.is_dir() else []
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise OwlError(
            f"--out {out_dir} holds files a bench did not write ({shown}); the results replace the folder whole, "
            "so choose an empty or new one"
        )


def write_results(res: dict[str, Any], out_dir: Path | str) -> Path:
    """results.json, results.md and decode.png, all or nothing. The Markdown is rendered from the JSON as
    written (keys sorted), so re-rendering results.json gives the same file."""
    from owl_deploy.io import atomic_dir, write_json

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "results.json", res)
        res = json.loads((tmp / "results.json").read_text())
        (tmp / "results.md").write_text(render_markdown(res))
        with contextlib.suppress(ModuleNotFoundError):  # a serving install has no matplotlib: JSON and Markdown
            render_png(res, tmp / "decode.png")
    return out_dir


def summary_lines(res: dict[str, Any]) -> list[str]:
    out = []
    for key, r in res["runs"].items():
        d = r["decode_tokens_per_s"]
        peer = res.get("strongest_peer")
        vs_peer = f", {_x(r.get('speedup_vs_strongest_peer'))} vs {peer}" if peer else ""
        vs_ref = f"  {_x(r['speedup_vs_dense_ort'])} vs dense ORT" if r["speedup_vs_dense_ort"] is not None else ""
        out.append(
            f"{key:28s} decode {d['median']:8.2f} tok/s (p10 {d['p10']:.2f}, p90 {d['p90']:.2f}){vs_ref}{vs_peer}"
        )
    h = res.get("headline")
    if h:
        out.append(f"headline: {h['run']} = {h['speedup_vs_dense_ort']:.3f}x {h['reference']}")
        if h.get("strongest_peer"):
            out.append(f"headline vs the strongest peer: {h['speedup_vs_strongest_peer']:.3f}x {h['strongest_peer']}")
    g = res.get("gate")
    if g:
        verdict = "passed" if g["passed"] else "FAILED: " + ", ".join(g["regressed"])
        out.append(f"gate vs baseline (tolerance {g['tolerance']:.0%}): {verdict}")
        out += [f"gate note: {n}" for n in g["notes"]]
    if res["noise"]["noisy"]:
        out.append("warning: NOISY RUN: " + "; ".join(res["noise"]["reasons"]))
    return out


def machine_markdown(res: dict) -> list[str]:
    """The "## Machine" section of a report from a results.json: hardware, load and versions."""
    hw, noise = res["hardware"], res["noise"]
    bw = hw.get("memory_read_gb_per_s") or {}
    flags = ", ".join(k for k, v in hw["flags"].items() if v) or "none"
    return [
        "",
        "## Machine",
        "",
        f"- CPU: {hw['cpu_model']} ({hw['physical_cores']} cores, {hw['logical_cpus']} logical CPUs"
        f"{', virtual machine' if hw.get('hypervisor') else ''}); flags: {flags}; "
        f"DeepSparse sees `{hw.get('deepsparse_isa')}`{' + VNNI' if hw.get('deepsparse_vnni') else ''}",
        f"- memory {hw['memory_gb']} GB; read bandwidth {bw.get('1_thread', '—')} GB/s (1 thread), "
        f"{bw.get('all_cores', '—')} GB/s (all cores)",
        f"- load average before {noise['loadavg_before']}, after {noise['loadavg_after']}; other processes "
        f"{noise['other_cpu_before']:.2f} cores before, {noise['other_cpu_mean']:.2f} mean during "
        f"(per round {noise['other_cpu_rounds']}); this process {noise['own_cpu_mean']:.2f} cores",
        *_speed_line(noise),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
    ]
