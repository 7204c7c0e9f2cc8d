"""The Chat tab: a streaming chat with the run (history, reset, system prompt), side by side with its base model,
through `speedtune.inference.loader.load_engine` — a run folder, a model alias or folder, or a .gguf."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from speedtune.inference.engine import Sampling
from speedtune.errors import UserError
from speedtune.inference.loader import is_run_folder, load_engine, run_base_model
from speedtune.ui.common import guard, message

_engines: dict[tuple, object] = {}
_lock = threading.Lock()


def engine(target: str):
    """A loaded engine, kept while the page uses it (a run trained again is loaded again)."""
    path = Path(target).expanduser()
    stamp = max((p.stat().st_mtime for p in path.glob("adapter_*")), default=0) if path.is_dir() else 0
    key = (target, stamp)
    with _lock:
        if key not in _engines:
            for old in [k for k in _engines if k[0] == target] + list(_engines)[:-2]:
                _engines.pop(old, None)  # at most three models in memory
            _engines[key] = load_engine(target)
        return _engines[key]


def base_of(target: str) -> str | None:
    path = Path(target).expanduser()
    return run_base_model(path) if is_run_folder(path) else None


def respond(text, tuned, base, target, base_target, compare, system, max_new, temperature, top_p):
    """Streams (status, tuned chat, base chat, message box, tuned history, base history)."""
    import gradio as gr

    text = (text or "").strip()
    target = (target or "").strip()
    if not target:
        raise UserError("nothing to chat with: give a run folder, a model alias or folder, or a .gguf")
    if not text:
        raise UserError("type a message first")
    sampling = Sampling(int(max_new), float(temperature), float(top_p))
    prefix = [{"role": "system", "content": system.strip()}] if (system or "").strip() else []
    sides = [("tuned", target, tuned)]
    base_target = (base_target or "").strip() or base_of(target)
    if compare and base_target:
        sides.append(("base", base_target, base))
    histories = {"tuned": list(tuned), "base": list(base)}
    boxes = lambda: (gr.Chatbot(histories["tuned"], label=f"fine-tuned: {target}"),  # noqa: E731
                     gr.Chatbot(histories["base"], label=f"base: {base_target}" if len(sides) > 1 else "base model"))
    for side, who, history in sides:
        yield message("info", f"loading {who} …"), *boxes(), "", *histories.values()
        eng = engine(who)
        history = histories[side] = history + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        answer = ""
        for piece in eng.stream(prefix + history[:-1], sampling):
            answer += piece
            history[-1] = {"role": "assistant", "content": answer}
            yield message("info", f"{who} is answering …"), *boxes(), "", *histories.values()
        history[-1] = {"role": "assistant", "content": answer.strip()}
    yield message("ok", f"ok: {len(sides)} answer{'s' if len(sides) > 1 else ''}"), *boxes(), "", \
        *histories.values()


def build(gr, data: SimpleNamespace, train: SimpleNamespace) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row():
        ui.target = gr.Textbox(label="chat with: run folder, model alias or folder, or .gguf", elem_id="chat-target",
                               scale=3)
        ui.base = gr.Textbox(label="beside it (default: the run's base model)", elem_id="chat-base", scale=2)
        compare = gr.Checkbox(True, label="side by side with the base", elem_id="chat-compare")
    with gr.Row():
        system = gr.Textbox(label="system prompt", elem_id="chat-system", scale=3)
        max_new = gr.Slider(8, 1024, value=128, step=8, label="max new tokens", elem_id="chat-max-new", min_width=200)
        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)", elem_id="chat-temp",
                                min_width=200)
        top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top p", elem_id="chat-top-p", min_width=200)
    with gr.Row():
        tuned_box = gr.Chatbot(label="fine-tuned", elem_id="chat-tuned", height=360)
        base_box = gr.Chatbot(label="base model", elem_id="chat-base-model", height=360)
    with gr.Row():
        text = gr.Textbox(show_label=False, placeholder="Ask something and press Enter", elem_id="chat-input", scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        reset = gr.Button("Reset", elem_id="chat-reset")
    status = gr.HTML(elem_id="chat-status")
    tuned, base = gr.State([]), gr.State([])
    inputs = [text, tuned, base, ui.target, ui.base, compare, system, max_new, temperature, top_p]
    outputs = [status, tuned_box, base_box, text, tuned, base]
    send.click(guard(6)(respond), inputs, outputs)
    text.submit(guard(6)(respond), inputs, outputs)
    reset.click(lambda: ("", [], [], [], []), None, [status, tuned_box, base_box, tuned, base])
    train.started_run.change(lambda run: run, train.started_run, ui.target)
    return ui
