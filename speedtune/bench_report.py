"""The reports `speedtune bench` writes: <date>-<device>-<shape>-seq<N>[-cap<G>gb][-<precision>].json, .md (a table
with the ratios against vanilla PEFT) and .png (tokens/s and peak memory side by side)."""

from __future__ import annotations

import json
from pathlib import Path


def _ratio(r: dict, key: str, unit: str = "") -> str:
    return f"{r[key]:.2f}{unit}" if key in r else "–"


def write_report(report: dict, folder: Path) -> Path:
    import re

    folder.mkdir(parents=True, exist_ok=True)
    dev = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    s = report["suite"]
    profile = (f"-cap{s['memory_cap_gb']:g}gb" if s.get("memory_cap_gb") else "") + \
        (f"-{s['precision']}" if s.get("precision", "auto") != "auto" else "")
    stem = folder / (f"{report['date']}-{dev}-{report['shape']}-" +
                     ("longest" if s.get("longest") else f"seq{s['seq_len']}") + profile)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# {report['shape']} · seq {s['seq_len']} · batch {s['batch_size']} × accum {s['grad_accum']} · "
             f"LoRA r {s['lora_r']} · {'4-bit' if s['load_in_4bit'] else '16-bit'} · {report['device']} · {report['date']}",
             ""]
    if report["results"]:
        lines += ["| run | backend | micro-batch x accum | checkpointing | tokens/s | vs peft | s/step | peak alloc GB | "
                  "vs peft | peak reserved GB | load s | first loss | last loss |", "|" + "---|" * 13]
    for r in report["results"]:
        if r.get("failed"):
            lines.append(f"| {r['name']} | {r['backend']} | failed (exit {r['exit']}) |" + " |" * 10)
            continue
        lines.append(f"| {r.get('name', r['backend'])} | {r['backend']} | {r.get('micro_batch', s['batch_size'])} x "
                     f"{r.get('grad_accum', s['grad_accum'])} | {'on' if r.get('gradient_checkpointing') else 'off'}"
                     f"{' (+ embeddings in CPU memory)' if r.get('offload_embeddings') else ''} | "
                     f"{r['tokens_per_s']:.0f} | {_ratio(r, 'speedup_vs_peft', 'x')} | {r['s_per_step']:.2f} | "
                     f"{r['peak_alloc_gb']:.2f} | {_ratio(r, 'memory_vs_peft')} | {r['peak_reserved_gb'] or 0:.2f} | "
                     f"{r['load_s']:.0f} | {r['first_loss']:.3f} | {r['last_loss']:.3f} |")
    for key, text in (("speedup", "unsloth / peft tokens/s"), ("memory_ratio", "unsloth / peft peak allocated"),
                      ("auto_speedup", "speedtune (fitted) / peft tokens/s"),
                      ("auto_memory_ratio", "speedtune (fitted) / peft peak allocated"),
                      ("memory_profile_ratio", "speedtune --fit memory / peft peak allocated"),
                      ("memory_profile_speedup", "speedtune --fit memory / peft tokens/s")):
        if key in report:
            lines.append(f"\n**{key}** ({text}): {report[key]:.2f}")
    for name, n in report.get("longest", {}).items():
        lines.append(f"\n**longest sequence** that trains at batch 1, {name}: {n}" +
                     (f" (memory cap {s['memory_cap_gb']} GB)" if s.get("memory_cap_gb") else "") +
                     (" (the search's upper bound)" if n >= s["max_seq_len"] else ""))
    diffs = [(r["name"], k, v) for r in report["results"] for k, v in r.items() if k.startswith("max_loss_diff_vs_")]
    if diffs:
        lines.append("\n**same math**: largest per-step loss difference, " + "; ".join(
            f"{n} vs {k.removeprefix('max_loss_diff_vs_')} {v:.4f}" for n, k, v in diffs))
    lines += ["", f"Fairness: {report['fairness']}."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    ok = [r for r in report["results"] if not r.get("failed")]
    if ok:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
        names = [r.get("name", r["backend"]) for r in ok]
        colors = ["#888", "#2a7", "#27c", "#c72", "#a4c"][: len(names)]
        for ax, key, title, fmt in ((axes[0], "tokens_per_s", "tokens/s (higher is better)", "{:,.0f}"),
                                    (axes[1], "peak_alloc_gb", "peak memory GB (lower is better)", "{:.2f}")):
            bars = ax.bar(names, [r[key] for r in ok], color=colors)
            ax.bar_label(bars, [fmt.format(r[key]) for r in ok], fontsize=8)
            ax.set_title(title)
            ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        fig.suptitle(f"{report['shape']} seq {s['seq_len']} on {report['device']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"))
        plt.close(fig)
    return stem
