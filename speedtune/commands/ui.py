"""`speedtune ui`: the whole path in a browser (speedtune.ui), on the code the CLI runs."""

from __future__ import annotations

import click

from speedtune.ui import require_gradio
from speedtune.ui.app import launch


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only; reach a remote box with ssh -L).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to listen on.")
def command(host: str, port: int):
    """A local web page for the whole path: pick a model and data, train with a live loss curve, chat, export.

    \b
    On a remote GPU box: run `speedtune ui` there, then here
      ssh -L 7860:127.0.0.1:7860 user@gpu-box
    and open http://127.0.0.1:7860 in your browser."""
    require_gradio()

    launch(host, port)
