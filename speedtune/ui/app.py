"""The page: four tabs on one Gradio Blocks (Model & data, Train, Chat, Export), sharing the model and data picked on
the first; and `launch`, which serves it and interrupts a running training job (checkpoint saved) on exit."""

from __future__ import annotations

import atexit
import os

from speedtune.errors import UserError
from speedtune.ui import chat_tab, data_tab, export_tab, train_tab
from speedtune.ui.common import CSS
from speedtune.ui.jobs import TRAINER

TITLE = "speedtune"


def build():
    import gradio as gr

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown("## speedtune — fine-tune, chat, export\nPick a model and data, train a LoRA with a live loss "
                    "curve, chat with the result beside its base model, export verified GGUFs for Ollama and LM Studio. "
                    "Every action runs the same code as the `speedtune` command.")
        with gr.Tabs():
            with gr.Tab("1 · Model & data", id="data", elem_id="tab-data"):
                data = data_tab.build(gr)
            with gr.Tab("2 · Train", id="train", elem_id="tab-train"):
                train = train_tab.build(gr, data)
            with gr.Tab("3 · Chat", id="chat", elem_id="tab-chat"):
                chat_tab.build(gr, data, train)
            with gr.Tab("4 · Export", id="export", elem_id="tab-export"):
                export_tab.build(gr, train)
        fn, inputs, plan = train.summary_refresh
        demo.load(fn, inputs, plan)
    return demo


def theme(gr):
    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline
    return gr.themes.Soft(primary_hue="emerald", font=system, font_mono=["ui-monospace", "monospace"])


def launch(host: str, port: int) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    demo = build()
    demo.queue(default_concurrency_limit=1)
    atexit.register(TRAINER.shutdown)
    print(f"speedtune ui: open http://{host}:{port} (on a remote box: ssh -L {port}:127.0.0.1:{port} user@gpu-box, "
          f"then open http://127.0.0.1:{port} here)", flush=True)
    try:
        demo.launch(server_name=host, server_port=port, inbrowser=False, show_error=False, quiet=True,
                    theme=theme(gr), css=CSS)
    except OSError as e:
        raise UserError(f"can't listen on {host}:{port} ({e}); pick another --port") from None
