"""What every tab shares: errors shown as the CLI's one-line messages (never a traceback), and small HTML helpers."""

from __future__ import annotations

import functools
import html
import inspect
import logging
import traceback

from speedtune.errors import UserError

log = logging.getLogger("speedtune.ui")


def one_line(e: BaseException) -> str:
    """A user mistake reads exactly as the CLI prints it; anything else as its type and first line."""
    if isinstance(e, UserError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def message(kind: str, text: str) -> str:
    """A status line: kind is ok, error, info or warn."""
    prefix = "error: " if kind == "error" else ""
    return f'<div class="st-msg st-{kind}">{html.escape(prefix + text)}</div>'


def guard(n_outputs: int, clear: bool = False):
    """Wrap a handler whose first output is its status line: an exception becomes that line (the other outputs are
    left as they are, or emptied with `clear`) and the server goes on. Works for plain and generator handlers."""
    import gradio as gr

    def failed(e: BaseException):
        if not isinstance(e, UserError):
            log.error("ui handler failed:\n%s", traceback.format_exc())
        out = (message("error", one_line(e)),) + tuple("" if clear else gr.skip() for _ in range(n_outputs - 1))
        return out if n_outputs > 1 else out[0]

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - every failure becomes one line on the page
                    yield failed(e)
            return gen

        @functools.wraps(fn)
        def plain(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                return failed(e)
        return plain

    return wrap


def esc(text) -> str:
    return html.escape(str(text))


CSS = """
.st-msg { padding: 8px 12px; border-radius: 6px; font-family: ui-monospace, monospace; font-size: 14px; }
.st-error { background: #fee2e2; color: #991b1b; border: 1px solid #fca5a5; }
.st-ok { background: #dcfce7; color: #166534; border: 1px solid #86efac; }
.st-info { background: #eff6ff; color: #1e3a8a; border: 1px solid #bfdbfe; }
.st-warn { background: #fef9c3; color: #854d0e; border: 1px solid #fde047; }
.st-example { border: 1px solid #d1d5db; border-radius: 6px; margin: 8px 0; overflow: hidden; }
.st-ex-title { background: #f3f4f6; padding: 4px 10px; font-size: 13px; color: #374151; }
.st-ex-text { margin: 0; padding: 8px 10px; white-space: pre-wrap; word-break: break-word; font-size: 13px;
  font-family: ui-monospace, monospace; background: #fff; line-height: 1.5; }
.st-prompt { color: #6b7280; }
.st-trained { background: #bbf7d0; color: #14532d; }
.st-special { color: #a21caf; font-weight: bold; }
.st-trained.st-special { text-decoration: underline; }
.st-legend span { margin-right: 12px; padding: 1px 4px; border-radius: 3px; font-family: ui-monospace, monospace; }
.st-bar { background: #e5e7eb; border-radius: 6px; height: 18px; overflow: hidden; }
.st-bar-fill { background: #10b981; height: 100%; transition: width 0.4s; }
.st-bar-text { font-family: ui-monospace, monospace; font-size: 14px; margin-top: 4px; }
table.st-table { border-collapse: collapse; font-size: 14px; width: 100%; }
table.st-table th, table.st-table td { border: 1px solid #d1d5db; padding: 4px 8px; text-align: left; }
table.st-table th { background: #f3f4f6; }
.st-good { color: #166534; font-weight: bold; }
.st-bad { color: #b91c1c; font-weight: bold; }
"""
