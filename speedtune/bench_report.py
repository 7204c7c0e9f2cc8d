"""The reports `speedtune bench` writes: <date>-<device>-<shape>-<data>-seq<N>[-cap<G>gb][-<precision>].json, .md
(a table with the ratios) and .png (real tokens/s and peak memory side by side), and the ratios themselves."""

from __future__ import annotations

import json
import re
from pathlib import Path

RATIOS = (("speedtune_vs_unsloth", "speedtune", "unsloth"), ("speedtune_vs_peft", "speedtune", "peft"),
          ("unsloth_vs_peft", "unsloth", "peft"), ("speedtune_vs_peft_best", "speedtune", "peft-best"),
          ("memory_profile_vs_peft", "speedtune-memory", "peft"),
          ("speedtune_lean_vs_unsloth", "speedtune-lean", "unsloth"), ("speedtune_lean_vs_peft", "speedtune-lean", "peft"),
          ("speedtune_12gb_vs_unsloth", "speedtune-12gb", "unsloth"), ("speedtune_12gb_vs_peft", "speedtune-12gb", "peft"))


def summarise(report: dict) -> None:
    """Per run: speed and memory against vanilla PEFT; top level: the headline ratios of real tokens/s."""
    by = {r["name"]: r for r in report["results"] if "real_tokens_per_s" in r}
    base = by.get("peft")
    for r in by.values():
        if base:
            r["speedup_vs_peft"] = r["real_tokens_per_s"] / base["real_tokens_per_s"]
            r["memory_vs_peft"] = r["peak_alloc_gb"] / base["peak_alloc_gb"]
    for key, a, b in RATIOS:
        if a in by and b in by:
            report[key] = by[a]["real_tokens_per_s"] / by[b]["real_tokens_per_s"]
    for name in ("speedtune", "speedtune-lean", "speedtune-12gb"):
        if name in by and base:
            report[f"{name.replace('-', '_')}_memory_vs_peft"] = by[name]["peak_alloc_gb"] / base["peak_alloc_gb"]
    for r in by.values():  # data parallel: against the same run on one process (same backend and fit)
        one = next((o for o in by.values() if o.get("processes", 1) == 1 and o.get("backend") == r.get("backend")
                    and o.get("layout") == r.get("layout")), None)
        if r.get("processes", 1) > 1 and one:
            r["scaling_vs_one_process"] = r["real_tokens_per_s"] / one["real_tokens_per_s"]
            r["per_process_vs_one_process"] = r["scaling_vs_one_process"] / r["processes"]
            report.setdefault("scaling", {})[r["name"]] = {"processes": r["processes"], "vs_one_process":
                                                           r["scaling_vs_one_process"], "vs_one_process_per_process":
                                                           r["per_process_vs_one_process"], "against": one["name"]}


def data_label(report: dict) -> str:
    data = str(report.get("data") or "")
    return "dense" if data == "dense" else re.sub(r"[^a-z0-9]+", "-", Path(data).stem.lower()).strip("-") or "data"


def stem_for(report: dict, folder: Path) -> Path:
    dev = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    s = report["suite"]
    profile = (f"-cap{s['memory_cap_gb']:g}gb" if s.get("memory_cap_gb") else "") + \
        (f"-{s['precision']}" if s.get("precision", "auto") != "auto" else "")
    what = "longest" if s.get("longest") else f"{data_label(report)}-seq{s['seq_len']}"
    return folder / f"{report['date']}-{dev}-{report['shape']}-{what}{profile}"


def _f(r: dict, key: str, fmt: str) -> str:
    return fmt.format(r[key]) if r.get(key) is not None else "–"


def write_report(report: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem_for(report, folder)
    s = report["suite"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# {report['shape']} · data {report.get('data')} · seq ≤ {s['seq_len']} · {s['batch_size'] * s['grad_accum']} "
             f"rows/step · LoRA r {s['lora_r']} · {'4-bit' if s['load_in_4bit'] else '16-bit'} · {s['steps']} steps · "
             f"{report['device']} · {report['date']}", ""]
    ok = [r for r in report["results"] if "real_tokens_per_s" in r]
    if ok:
        lines += ["| run | backend | layout | checkpointing | real tok/s | vs peft | s/step | passes/step | padding | "
                  "time to adapter s | peak alloc GB | vs peft | MFU | first loss | last loss |", "|" + "---|" * 15]
    for r in report["results"]:
        if r.get("failed"):
            lines.append(f"| {r['name']} | {r['backend']} | failed (exit {r['exit']}) |" + " |" * 12)
            continue
        if "real_tokens_per_s" not in r:
            continue
        how = (f"tokens ≤ {r['token_budget']}" if r.get("layout") == "tokens" else
               f"{r['micro_batch']} x {r['grad_accum']}")
        how += (", padding-free" if r.get("padding_free") else ", CUDA graphs" if r.get("cuda_graphs") else
                ", pass graphs" if r.get("step_graphs") else "")
        how += f", cap {r['memory_cap_gb']:g} GB" if r.get("memory_cap_gb") else ""
        lines.append(f"| {r['name']} | {r['backend']} | {how} | {'on' if r['gradient_checkpointing'] else 'off'}"
                     f"{' (+ embeddings in CPU memory)' if r.get('offload_embeddings') else ''} | "
                     f"{r['real_tokens_per_s']:,.0f} | {_f(r, 'speedup_vs_peft', '{:.2f}x')} | {r['s_per_step']:.2f} | "
                     f"{r['passes_per_step']:.1f} | {r['padding_share']:.0%} | {r['time_to_adapter_s']:.0f} | "
                     f"{r['peak_alloc_gb']:.2f} | {_f(r, 'memory_vs_peft', '{:.2f}')} | {_f(r, 'mfu', '{:.1%}')} | "
                     f"{r['first_loss']:.3f} | {r['last_loss']:.3f} |")
    for key, a, b in RATIOS:
        if key in report:
            lines.append(f"\n**{key}** ({a} / {b}, real tokens/s): {report[key]:.2f}x")
    for name, sc in report.get("scaling", {}).items():
        lines.append(f"\n**scaling** {name} on {sc['processes']} processes: {sc['vs_one_process']:.2f}x "
                     f"{sc['against']} on one ({sc['vs_one_process_per_process']:.0%} per process)")
    for name, n in report.get("longest", {}).items():
        lines.append(f"\n**longest sequence** that trains at batch 1, {name}: {n}" +
                     (f" (memory cap {s['memory_cap_gb']} GB)" if s.get("memory_cap_gb") else "") +
                     (" (the search's upper bound)" if n >= s["max_seq_len"] else ""))
    diffs = [(r["name"], r["max_rel_loss_diff"]) for r in ok if "max_rel_loss_diff" in r]
    if diffs:
        lines.append(f"\n**same math**: largest per-step loss difference against {s['reference']}: " +
                     "; ".join(f"{n} {d:.2%}" for n, d in diffs))
    lines += ["", f"Fairness: {report['fairness']}. MFU: model FLOPs (4 x linear parameters per token + causal "
                  "attention) over the bf16 matmul peak measured on the same GPU."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if ok:
        _chart(report, ok, stem.with_suffix(".png"))
    return stem


def _chart(report: dict, ok: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    names = [r["name"] for r in ok]
    colors = ["#888", "#aaa", "#2a7", "#27c", "#c72", "#a4c"][: len(names)]
    for ax, key, title, fmt in ((axes[0], "real_tokens_per_s", "real tokens/s (higher is better)", "{:,.0f}"),
                                (axes[1], "peak_alloc_gb", "peak memory GB (lower is better)", "{:.2f}")):
        bars = ax.bar(names, [r[key] for r in ok], color=colors)
        ax.bar_label(bars, [fmt.format(r[key]) for r in ok], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.suptitle(f"{report['shape']} · {report.get('data')} · seq ≤ {report['suite']['seq_len']} on {report['device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
