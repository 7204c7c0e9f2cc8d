"""The pictures of a `speedtune bench` report: STEM.png (real tokens/s; peak reserved memory with the allocated
part inside it) and, where the runs have held-out eval losses, STEM-eval.png (every run's eval-loss curve)."""

from __future__ import annotations

from pathlib import Path

COLORS = ["#888", "#aaa", "#2a7", "#27c", "#c72", "#a4c", "#5bc", "#d55", "#7a3", "#346", "#b93", "#639"]


def charts(report: dict, ok: list[dict], stem: Path) -> None:
    if not ok:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in ok]
    colors = [COLORS[i % len(COLORS)] for i in range(len(ok))]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.2 * len(ok) + 4), 4.5), dpi=110)
    bars = axes[0].bar(names, [r["real_tokens_per_s"] for r in ok], color=colors)
    axes[0].bar_label(bars, [f"{r['real_tokens_per_s']:,.0f}" for r in ok], fontsize=7)
    axes[0].set_title("real tokens/s (higher is better)")
    reserved = [r.get("peak_reserved_gb") or r.get("peak_alloc_gb") or 0 for r in ok]
    bars = axes[1].bar(names, reserved, color=colors, alpha=0.45, label="reserved")
    axes[1].bar(names, [r.get("peak_alloc_gb") or 0 for r in ok], color=colors, label="allocated")
    axes[1].bar_label(bars, [f"{x:.1f}" for x in reserved], fontsize=7)
    cap = report["suite"].get("memory_cap_gb")
    if cap:
        axes[1].axhline(cap, color="#c22", linestyle="--", linewidth=1, label=f"cap {cap:g} GB")
    axes[1].set_title("peak memory GB: reserved (pale), allocated (lower is better)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle(f"{report['shape']} · {report.get('data')} · seq ≤ {report['suite']['seq_len']} on "
                 f"{report['device']}", fontsize=10)
    fig.tight_layout()
    _save(fig, stem.with_suffix(".png"))
    curves = [r for r in ok if r.get("eval_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        for i, r in enumerate(curves):
            ax.plot([p["step"] for p in r["eval_curve"]], [p["eval_loss"] for p in r["eval_curve"]], "o-",
                    markersize=3, linewidth=1.2, color=COLORS[i % len(COLORS)],
                    label=f"{r['name']} ({r['final_eval_loss']:.4f})")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"eval loss on the held-out rows · {report['shape']} · {report['device']}", fontsize=10)
        fig.tight_layout()
        _save(fig, stem.with_name(stem.name + "-eval.png"))
    plt.close("all")


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
