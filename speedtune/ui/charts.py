"""The Train tab's pictures, drawn as HTML and inline SVG (no plotting service, no network, easy to test): the
progress bar with ETA and the loss curve."""

from __future__ import annotations

from speedtune.ui.common import esc
from speedtune.ui.jobs import Progress


def duration(s: float | None) -> str:
    if s is None:
        return "…"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_bar(p: Progress, elapsed_s: float | None, phase: str) -> str:
    total = p.max_steps or 0
    frac = min(1.0, p.step / total) if total else 0.0
    loss = f" · loss {p.losses[p.step]:.4f}" if p.step in p.losses else ""
    steps = f"step {p.step}/{total}" if total else "step –"
    text = f"{phase} · {steps} · {duration(elapsed_s)} elapsed · ETA {duration(0 if phase == 'done' else p.eta_s() if phase == 'training' else None)}{loss}"
    return (f'<div id="st-progress" data-step="{p.step}" data-max-steps="{total}"><div class="st-bar">'
            f'<div class="st-bar-fill" style="width:{frac * 100:.1f}%"></div></div>'
            f'<div class="st-bar-text">{esc(text)}</div></div>')


def loss_chart(p: Progress, width: int = 720, height: int = 280) -> str:
    """Train loss as a line (and eval loss as red dots) against the step; `data-points` counts the train points."""
    steps = sorted(p.losses)
    if not steps:
        return (f'<svg id="st-loss" data-points="0" width="{width}" height="80" role="img">'
                '<text x="10" y="40" fill="#6b7280" font-size="14">the loss curve appears after the first step'
                '</text></svg>')
    left, right, top, bottom = 56, 16, 16, 36
    values = [p.losses[s] for s in steps] + list(p.evals.values())
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or max(abs(hi) * 0.05, 0.05)
    lo, hi = lo - pad, hi + pad
    x_max = max(p.max_steps or 0, steps[-1], 2)
    x = lambda s: left + (s - 1) / max(x_max - 1, 1) * (width - left - right)  # noqa: E731
    y = lambda v: top + (hi - v) / (hi - lo) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg id="st-loss" data-points="{len(steps)}" data-last-loss="{p.losses[steps[-1]]:.4f}" '
             f'width="{width}" height="{height}" role="img" style="background:#fff;font-family:sans-serif">',
             '<title>training loss</title>']
    for i in range(5):  # horizontal grid and y labels
        v = lo + (hi - lo) * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#374151">'
                     f'{v:.3g}</text>')
    ticks = sorted({1, x_max, *[max(1, round(x_max * k / 4)) for k in range(1, 4)]})
    for s in ticks:
        parts.append(f'<text x="{x(s):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle" '
                     f'fill="#374151">{s}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" font-size="12" text-anchor="middle" '
                 'fill="#111827">step</text>')
    points = " ".join(f"{x(s):.1f},{y(p.losses[s]):.1f}" for s in steps)
    parts.append(f'<polyline class="st-train-loss" points="{points}" fill="none" stroke="#2563eb" stroke-width="2"/>')
    parts += [f'<circle cx="{x(s):.1f}" cy="{y(p.losses[s]):.1f}" r="2.5" fill="#2563eb"/>' for s in steps]
    parts += [f'<circle class="st-eval-loss" cx="{x(s):.1f}" cy="{y(v):.1f}" r="4" fill="#dc2626"/>'
              for s, v in sorted(p.evals.items())]
    parts.append(f'<text x="{width - right}" y="{top + 4}" font-size="12" text-anchor="end" fill="#2563eb">train loss'
                 + ('</text><text x="' + str(width - right) + f'" y="{top + 20}" font-size="12" text-anchor="end" '
                    'fill="#dc2626">eval loss' if p.evals else '') + '</text>')
    parts.append("</svg>")
    return "".join(parts)
