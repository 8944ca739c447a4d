"""Reports of a benchmark: results.md, decode.png and the summary lines, from a results.json dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from owl_deploy.bench.measure import SHORT


def render_markdown(res: dict[str, Any]) -> str:
    s, noise = res["settings"], res["noise"]
    lines = ["# Decode benchmark", ""]
    if noise["noisy"]:
        lines += ["> **NOISY RUN** — the numbers below are not trustworthy:", ">"]
        lines += [f"> - {r}" for r in noise["reasons"]] + [""]
    head = res.get("headline")
    if head:
        sp = head["speedup_by_round"]
        spread = f" (per-round p10–p90 {sp['p10']:.2f}–{sp['p90']:.2f})" if sp.get("n") else ""
        lines += [
            f"**Headline:** {head['run']} decodes at {head['decode_tokens_per_s']:.1f} tok/s = "
            f"**{head['speedup_vs_dense_ort']:.2f}x** {head['reference']} "
            f"({head['reference_decode_tokens_per_s']:.1f} tok/s){spread}; "
            f"the bytes-per-token ceiling of that ratio is {head['ceiling_speedup_bytes']:.2f}x.",
            "",
        ]
        if head.get("second_reference"):
            sp2 = head["speedup_vs_second_reference_by_round"]
            spread2 = f" (per-round p10–p90 {sp2['p10']:.2f}–{sp2['p90']:.2f})" if sp2.get("n") else ""
            lines += [
                f"Against the strongest dense peer, {head['second_reference']}: "
                f"**{head['speedup_vs_second_reference']:.2f}x**{spread2}; bytes-per-token ceiling "
                f"{head['ceiling_speedup_bytes_vs_second_reference']:.2f}x.",
                "",
            ]
    lines += [
        f"Batch 1, cache filled to {s['context']} of {s['sequence_length']} tokens, {s['steps']} decode steps x "
        f"{s['rounds']} rounds (+{s['warmup_rounds']} warm-up, not counted), engines interleaved round by round; "
        f"prefill in chunks of {s['prefill_length']}; DeepSparse KV cache "
        f"{', '.join(sorted({str(r.get('kv_cache')) for r in res['runs'].values() if r['engine'] == 'deepsparse'}))}; "
        "decode tok/s = median (p10–p90) over all timed steps; throughput = steps / their total time.",
        "",
        "| engine | model | decode tok/s | throughput | step ms | prefill tok/s | vs dense ORT | ceiling tok/s "
        "| of ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"].values():
        d, ms, p = r["decode_tokens_per_s"], r["decode_step_ms"], r["prefill_tokens_per_s"]
        pre = f"{p['median']:.1f} ({p['p10']:.1f}–{p['p90']:.1f})" if p and p.get("n") else "—"
        ceil = (
            f"{r['ceiling_tokens_per_s']:.0f} ({r['bytes_per_token_encoding']})" if r["ceiling_tokens_per_s"] else "—"
        )
        frac = f"{r['fraction_of_ceiling']:.0%}" if r["fraction_of_ceiling"] else "—"
        lines.append(
            f"| {SHORT[r['engine']]} | {r['model']} | {d['median']:.2f} ({d['p10']:.2f}–{d['p90']:.2f}) | "
            f"{r.get('decode_throughput_tokens_per_s') or 0:.2f} | {ms['median']:.2f} | {pre} | "
            f"{r['speedup_vs_dense_ort']:.3f}x | {ceil} | {frac} |"
        )
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


def megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e7 else f"{nbytes / 1e6:.3f} MB"


def render_png(res: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(res["runs"].values())
    labels = [f"{SHORT[r['engine']]}\n{r['model']}" for r in runs]
    colors = ["#d62728" if r["engine"] == "deepsparse" else "#1f77b4" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
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


def write_results(res: dict[str, Any], out_dir: Path | str) -> Path:
    """results.json, results.md and decode.png, all or nothing."""
    from owl_deploy.io import atomic_dir, write_json

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "results.json", res)
        (tmp / "results.md").write_text(render_markdown(res))
        render_png(res, tmp / "decode.png")
    return out_dir


def summary_lines(res: dict[str, Any]) -> list[str]:
    out = []
    for key, r in res["runs"].items():
        d = r["decode_tokens_per_s"]
        out.append(
            f"{key:28s} decode {d['median']:8.2f} tok/s (p10 {d['p10']:.2f}, p90 {d['p90']:.2f})  "
            f"x{r['speedup_vs_dense_ort']:.3f} vs dense ORT"
        )
    h = res.get("headline")
    if h:
        out.append(f"headline: {h['run']} = {h['speedup_vs_dense_ort']:.3f}x {h['reference']}")
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
        "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
    ]
