"""`speedtune ui`: the whole path in a browser (model, data, train, chat, export), on the code the CLI runs.

Gradio is an optional dependency (the `ui` extra) and is imported only inside this package."""

from __future__ import annotations

from speedtune.errors import UserError, install_hint


def require_gradio():
    try:
        import gradio
    except ImportError:
        raise UserError(f"speedtune ui needs gradio: {install_hint('ui')}") from None
    return gradio
