"""The reports `speedtune bench` writes: <date>-<device>-<shape>-<data>-seq<N>[-cap<G>gb][-<precision>].json, .md (a
table of every run, labelled by what it is, with the ratios and the checks), .png (real tokens/s, peak reserved and
allocated memory) and, with held-out data, -eval.png (the eval-loss curves side by side): speedtune.benchmarking.charts.

The headline ratios are the headline run's (`speedtune` unless the suite names another) against Unsloth run by its
own trainer on the same rows: the best of the Unsloth runs (the fastest; for kernel time, the least kernel time among
those within the memory cap) and its tutorial code. Memory is compared on peak reserved memory (what a card must
hold), allocated memory is shown beside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from speedtune.benchmarking.charts import charts

# the named runs of the older suites (speedtune through its own loop on either backend)
RATIOS = (("speedtune_vs_unsloth", "speedtune", "unsloth"), ("speedtune_vs_peft", "speedtune", "peft"),
          ("unsloth_vs_peft", "unsloth", "peft"), ("speedtune_vs_peft_best", "speedtune", "peft-best"),
          ("memory_profile_vs_peft", "speedtune-memory", "peft"),
          ("speedtune_lean_vs_unsloth", "speedtune-lean", "unsloth"),
          ("speedtune_lean_vs_peft", "speedtune-lean", "peft"),
          ("speedtune_12gb_vs_unsloth", "speedtune-12gb", "unsloth"),
          ("speedtune_12gb_vs_peft", "speedtune-12gb", "peft"))
UNSLOTH_KINDS = ("unsloth-tutorial", "unsloth-tuned")


def memory(r: dict) -> float | None:
    """The memory a run is compared on: peak reserved on a GPU, the process's peak RSS on a CPU."""
    return r.get("peak_reserved_gb") if r.get("peak_reserved_gb") is not None else r.get("peak_alloc_gb")


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarise(report: dict) -> None:
    """Per run: speed and memory against vanilla PEFT, and whether it stayed within the memory cap; top level: the
    headline ratios."""
    by = {r["name"]: r for r in report["results"] if "real_tokens_per_s" in r}
    suite = report.get("suite") or {}
    cap = suite.get("memory_cap_gb")
    base = by.get("peft")
    for r in by.values():
        if base:
            r["speedup_vs_peft"] = r["real_tokens_per_s"] / base["real_tokens_per_s"]
            r["memory_vs_peft"] = _ratio(memory(r), memory(base))
        if cap and r.get("peak_reserved_gb") is not None:
            r["within_memory_cap"] = r["peak_reserved_gb"] <= cap
    for key, a, b in RATIOS:
        if a in by and b in by:
            report[key] = by[a]["real_tokens_per_s"] / by[b]["real_tokens_per_s"]
    for name in ("speedtune", "speedtune-lean", "speedtune-12gb"):
        if name in by and base:
            report[f"{name.replace('-', '_')}_memory_vs_peft"] = _ratio(memory(by[name]), memory(base))
    headline_ratios(report, by, suite, cap)
    for r in by.values():  # data parallel: against the same run on one process (same backend and fit)
        one = next((o for o in by.values() if o.get("processes", 1) == 1 and o.get("backend") == r.get("backend")
                    and o.get("layout") == r.get("layout")), None)
        if r.get("processes", 1) > 1 and one:
            r["scaling_vs_one_process"] = r["real_tokens_per_s"] / one["real_tokens_per_s"]
            r["per_process_vs_one_process"] = r["scaling_vs_one_process"] / r["processes"]
            report.setdefault("scaling", {})[r["name"]] = {"processes": r["processes"], "vs_one_process":
                                                           r["scaling_vs_one_process"], "vs_one_process_per_process":
                                                           r["per_process_vs_one_process"], "against": one["name"]}


def headline_ratios(report: dict, by: dict, suite: dict, cap) -> None:
    head = by.get(suite.get("headline") or "speedtune")
    unsloth = [r for r in by.values() if r.get("kind") in UNSLOTH_KINDS]
    if head is None or not unsloth:
        return
    best = max(unsloth, key=lambda r: r["real_tokens_per_s"])
    tutorial = next((r for r in unsloth if r["kind"] == "unsloth-tutorial"), None)
    soonest = min(unsloth, key=lambda r: r["time_to_adapter_s"])
    report.update(headline=head["name"], unsloth_best=best["name"],
                  speedtune_vs_unsloth_best=head["real_tokens_per_s"] / best["real_tokens_per_s"],
                  speedtune_time_to_adapter_vs_unsloth_best=head["time_to_adapter_s"] / soonest["time_to_adapter_s"],
                  unsloth_soonest_adapter=soonest["name"],
                  speedtune_reserved_vs_unsloth_best=_ratio(memory(head), memory(best)))
    if tutorial:
        report["speedtune_vs_unsloth_tutorial"] = head["real_tokens_per_s"] / tutorial["real_tokens_per_s"]
    if suite.get("precision") == "fp16" and cap and cap <= 16:  # the T4 proxy (bench_suite.Suite.t4_proxy)
        fits = [r for r in unsloth if r.get("gpu_kernel_s_per_1k_tokens") and r.get("within_memory_cap", True)]
        k = head.get("gpu_kernel_s_per_1k_tokens")
        if tutorial:
            report["t4_kernel_ratio_vs_unsloth_tutorial"] = _ratio(k, tutorial.get("gpu_kernel_s_per_1k_tokens"))
        if fits:
            least = min(fits, key=lambda r: r["gpu_kernel_s_per_1k_tokens"])
            report["unsloth_best_kernel"] = least["name"]
            report["t4_kernel_ratio_vs_unsloth_best"] = _ratio(k, least["gpu_kernel_s_per_1k_tokens"])


def data_label(report: dict) -> str:
    data = str(report.get("data") or "")
    return "dense" if data == "dense" else re.sub(r"[^a-z0-9]+", "-", Path(data).stem.lower()).strip("-") or "data"


def stem_for(report: dict, folder: Path) -> Path:
    dev = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    s = report["suite"]
    profile = (f"-cap{s['memory_cap_gb']:g}gb" if s.get("memory_cap_gb") else "") + \
        (f"-{s['precision']}" if s.get("precision", "auto") != "auto" else "")
    what = "longest" if s.get("longest") else f"{data_label(report)}-seq{s['seq_len']}"
    shape = re.sub(r"[^a-z0-9.]+", "-", Path(str(report["shape"]).rstrip("/")).name.lower()).strip("-")
    return folder / f"{report['date']}-{dev}-{shape}-{what}{profile}"


def _f(r: dict, key: str, fmt: str) -> str:
    return fmt.format(r[key]) if r.get(key) is not None else "–"


HEAD = ["run", "what it is", "layout", "checkpointing", "real tok/s", "vs best Unsloth", "s/step", "passes/step",
        "GPU kernel s / 1k tok", "time to adapter s", "peak reserved GB", "peak allocated GB", "MFU", "first loss",
        "last loss", "final eval loss"]


def row(r: dict, best: dict | None) -> str:
    if r.get("failed") or r.get("oom"):
        what = "out of memory" if r.get("oom") else f"failed: {r.get('error') or 'exit ' + str(r.get('exit'))}"
        return f"| {r['name']} | {r.get('label', '')} | {what} |" + " |" * (len(HEAD) - 3)
    how = (f"tokens ≤ {r['token_budget']}" if r.get("layout") == "tokens" else
           f"{r.get('micro_batch')} x {r.get('grad_accum')}")
    how += (", padding-free" if r.get("padding_free") else ", CUDA graphs" if r.get("cuda_graphs") else "") + \
        (", pass graphs" if r.get("step_graphs") else "") + (f", {r['dtype']}" if r.get("dtype") else "")
    how += f", cap {r['memory_cap_gb']:g} GB" if r.get("memory_cap_gb") else ""
    ck = r.get("gradient_checkpointing")
    ck = "offloaded (unsloth)" if ck == "unsloth" else "on" if ck else "off"
    vs = f"{r['real_tokens_per_s'] / best['real_tokens_per_s']:.2f}x" if best else "–"
    return (f"| {r['name']} | {r.get('label', '')} | {how} | {ck} | {r['real_tokens_per_s']:,.0f} | {vs} | "
            f"{r['s_per_step']:.3f} | {_f(r, 'passes_per_step', '{:.1f}')} | "
            f"{_f(r, 'gpu_kernel_s_per_1k_tokens', '{:.4f}')} | {r['time_to_adapter_s']:.0f} | "
            f"{_f(r, 'peak_reserved_gb', '{:.2f}')} | {_f(r, 'peak_alloc_gb', '{:.2f}')} | {_f(r, 'mfu', '{:.1%}')} | "
            f"{r['first_loss']:.4f} | {r['last_loss']:.4f} | {_f(r, 'final_eval_loss', '{:.4f}')} |")


TOP = (("speedtune_vs_unsloth_best", "real tokens/s against the fastest Unsloth run ({unsloth_best})"),
       ("speedtune_vs_unsloth_tutorial", "real tokens/s against Unsloth's tutorial code"),
       ("speedtune_time_to_adapter_vs_unsloth_best", "whole command to a saved adapter, against the soonest Unsloth "
                                                     "run ({unsloth_soonest_adapter}); lower is better"),
       ("speedtune_reserved_vs_unsloth_best", "peak reserved memory against {unsloth_best}"),
       ("t4_kernel_ratio_vs_unsloth_tutorial", "GPU-kernel time per real token against Unsloth's tutorial code "
                                               "(the T4 proxy); lower is better"),
       ("t4_kernel_ratio_vs_unsloth_best", "GPU-kernel time per real token against the Unsloth run with the least "
                                           "within the cap ({unsloth_best_kernel}); lower is better"))


def write_report(report: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem_for(report, folder)
    s = report["suite"]
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(stem.with_suffix(".json"))
    lines = [f"# {report['shape']} · data {report.get('data')} · seq ≤ {s['seq_len']} · "
             f"{s['batch_size'] * s['grad_accum']} rows/step · LoRA r {s['lora_r']} · "
             f"{'4-bit' if s['load_in_4bit'] else '16-bit'} · {s['steps']} steps · {report['device']} · "
             f"{report['date']}", ""]
    ok = [r for r in report["results"] if "real_tokens_per_s" in r]
    best = next((r for r in ok if r["name"] == report.get("unsloth_best")), None)
    shown = [r for r in report["results"] if "real_tokens_per_s" in r or r.get("failed") or r.get("oom")]
    if shown:
        lines += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)] + [row(r, best) for r in shown]
    names = {k: report.get(k) for k in ("unsloth_best", "unsloth_soonest_adapter", "unsloth_best_kernel")}
    for key, text in TOP:
        if report.get(key) is not None:
            lines.append(f"\n**{key}**: {report[key]:.2f}x — {text.format(**names)}")
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
    lines += checks_lines(report, ok)
    lines += ["", f"Fairness: {report['fairness']}. Memory is compared on peak reserved memory. GPU kernel time: the "
                  "device kernels' summed time over the last profiled steps (torch.profiler) per 1,000 real tokens. "
                  "MFU: model FLOPs (4 x linear parameters per token + causal attention) over the bf16 matmul peak "
                  "measured on the same GPU."]
    tmp = stem.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(stem.with_suffix(".md"))
    charts(report, ok, stem)
    return stem


def checks_lines(report: dict, ok: list[dict]) -> list[str]:
    out = []
    lc = report.get("loss_check") or {}
    if lc.get("failures") is not None:
        diffs = [f"{r['name']} {r['max_rel_loss_diff']:.2%} (grad norm {r.get('max_rel_grad_norm_diff', 0):.2%})"
                 for r in ok if "max_rel_loss_diff" in r]
        out.append(f"\n**same math** (per-step losses and gradient norms against {lc.get('reference')}, tolerance from "
                   f"{lc.get('tolerance_from', '–')}): " + ("; ".join(diffs) or "nothing compared") +
                   (" — **failed**: " + "; ".join(lc["failures"]) if lc["failures"] else " — passed"))
    ev = report.get("eval_check")
    if ev:
        if ev.get("spread") is None:
            out.append(f"\n**eval loss**: {ev.get('note')}")
        else:
            each = [f"{r['name']} {r['final_eval_loss']:.4f} "
                    f"{'within' if r['eval_within_seed_spread'] else 'OUTSIDE'}"
                    for r in ok if "eval_within_seed_spread" in r]
            out.append(f"\n**eval loss** (final, held-out rows): {ev['reference']}'s seeds {ev['seeds']} give "
                       f"{', '.join(f'{x:.4f}' for x in ev['finals'])}: mean {ev['mean']:.4f}, spread "
                       f"{ev['spread']:.4f}; " + ("; ".join(each) or "no other run"))
    bad = [f"{r['name']} steps {r['nonfinite_steps'][:5]}" for r in ok if r.get("nonfinite_steps")]
    if bad:
        out.append("\n**non-finite loss or gradient norm** (fp16 overflow?): " + "; ".join(bad))
    over = [r["name"] for r in ok if r.get("within_memory_cap") is False]
    if over:
        out.append(f"\n**over the memory cap** (peak reserved): {', '.join(over)}")
    return out
