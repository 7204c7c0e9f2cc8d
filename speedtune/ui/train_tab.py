"""The Train tab: the recipe's main settings with the CLI's defaults, a summary (and the exact command) before it
starts, then `speedtune train` in its own process with a progress bar, ETA and a live loss curve read from the run's
train_log.jsonl; Stop interrupts it (a checkpoint is saved), Resume continues it."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from types import SimpleNamespace

from speedtune import hardware
from speedtune.training import backends
from speedtune.training.config import RunConfig
from speedtune.errors import UserError
from speedtune.ui import charts
from speedtune.ui.common import esc, guard, message
from speedtune.ui.data_tab import model_spec, options
from speedtune.ui.jobs import INTERRUPTED, TRAINER, read_log

D = RunConfig()  # the CLI's defaults


def default_run() -> str:
    return str(Path.cwd() / "runs" / time.strftime("ui-%Y%m%d-%H%M%S"))


def cli_args(alias, custom, data, fmt, columns, template, train_on, drop_bad, seq_len, run, length, max_steps,
             epochs, lr, lora_r, lora_alpha, batch, accum, backend, fit, precision, overwrite,
             method="sft") -> list[str]:
    """The page's settings as `speedtune train` flags."""
    if not (data or "").strip():
        raise UserError("no data: pick a data file on the Model & data tab")
    if not (run or "").strip():
        raise UserError("no run folder: name the folder the run is written to")
    opts = options(fmt, columns, template, train_on, drop_bad)
    args = ["--model", model_spec(alias, custom), "--data", data.strip(),
            "--output", str(Path(run.strip()).expanduser().resolve())]
    args += ["--epochs", f"{float(epochs):g}"] if length == "epochs" else ["--max-steps", str(int(max_steps))]
    args += ["--lr", f"{float(lr):g}", "--lora-r", str(int(lora_r)), "--lora-alpha", str(int(lora_alpha)),
             "--batch-size", str(int(batch)), "--grad-accum", str(int(accum)), "--seq-len", str(int(seq_len)),
             "--backend", backend, "--fit", fit, "--precision", precision]
    for flag, key in (("--format", "format"), ("--columns", "columns"), ("--template", "template")):
        if opts[key]:
            args += [flag, opts[key]]
    if opts["train_on"] != "responses":
        args += ["--train-on", opts["train_on"]]
    if opts["drop_bad"]:
        args.append("--drop-bad")
    if overwrite:
        args.append("--overwrite")
    if method and method != "sft":  # preference training on chosen/rejected pairs (speedtune.training.preference)
        args += ["--method", method]
    return args


def summary(*values) -> str:
    try:
        args = cli_args(*values)
    except UserError as e:
        return message("warn", str(e))
    except (TypeError, ValueError):
        return message("warn", "fill in every number")
    (alias, custom, data, _, _, _, train_on, _, seq_len, run, length, max_steps, epochs, lr, r, alpha, batch, accum,
     backend, fit, precision, _, *method) = values
    how_long = f"{epochs:g} epochs" if length == "epochs" else f"{int(max_steps)} steps"
    rows = [("model", model_spec(alias, custom)), ("data", data), ("method", (method or ["sft"])[0]),
            ("length", how_long),
            ("batch", f"{int(batch)} × grad accum {int(accum)} = {int(batch) * int(accum)} rows per step"),
            ("learning rate", f"{float(lr):g}"), ("LoRA", f"r {int(r)}, alpha {int(alpha)}, all linear layers"),
            ("seq len", str(int(seq_len))), ("train on", train_on),
            ("backend · fit · precision", f"{backend} · {fit} · {precision}"), ("run folder", args[args.index("--output") + 1])]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    command = "speedtune train " + shlex.join(args)
    return (f'<table class="st-table" id="st-train-summary">{table}</table>'
            f'<pre id="st-train-command" class="st-ex-text">{esc(command)}</pre>')


def start(*values, resume: bool = False):
    args = cli_args(*values)
    run = Path(args[args.index("--output") + 1])
    if resume:
        args = [a for a in args if a != "--overwrite"] + ["--resume"]
    job = TRAINER.start(args, run)
    verb = "resuming" if resume else "started"
    return message("info", f"{verb}: speedtune train … --output {job.run} (pid {job.proc.pid})"), str(run)


def stop():
    job = TRAINER.stop()
    return message("info", f"stopping {job.run}: the CLI saves a checkpoint, then Resume continues it")


def poll(seen: str | None):
    """(status, progress, chart, output, seen): the chart is redrawn only when the log changed."""
    import gradio as gr

    job = TRAINER.job
    if job is None:
        return gr.skip(), charts.progress_bar(read_log(Path("/nonexistent")), None, "no run yet"), gr.skip(), \
            gr.skip(), seen
    p = read_log(job.run)
    code = job.proc.poll()
    if code is None:
        phase = "training" if p.begun else "loading the model and data"
        status = gr.skip()
    elif code == 0:
        phase = "done"
        status = message("ok", f"done: {p.step} steps, final loss {p.losses.get(p.step, float('nan')):.4f}; run "
                               f"folder {job.run} (chat with it or export it in the next tabs)")
    elif code == INTERRUPTED or job.stop_requested:
        phase = "stopped"
        saved = list(job.run.glob("checkpoints/checkpoint-*/trainer_state.json"))
        status = message("warn", f"stopped at step {p.step}: a checkpoint is saved in {job.run}; Resume continues it"
                         if saved else f"stopped before the first step: no checkpoint in {job.run}; Start again")
    else:
        phase = "failed"
        status = message("error", job.error_line())
    elapsed = job.elapsed_s
    key = f"{job.run}:{job.started}:{len(p.losses)}:{len(p.evals)}:{code}"
    chart = charts.loss_chart(p) if key != seen else gr.skip()
    return status, charts.progress_bar(p, elapsed, phase), chart, job.output_tail(), key


def machine() -> str:
    hw = hardware.detect()
    try:
        backend, why = backends.choose("auto", hw.device)
    except Exception:  # noqa: BLE001 - only a hint on the page
        backend, why = "?", ""
    return message("info", f"this machine: {hw.device} {hw.name}; precision auto = {hw.dtype} ({hw.why}); backend "
                           f"auto = {backend} ({why})")


def build(gr, data: SimpleNamespace) -> SimpleNamespace:
    ui = SimpleNamespace()
    gr.HTML(machine, elem_id="train-machine")
    with gr.Row():
        ui.run = gr.Textbox(value=default_run, label="run folder (--output)", elem_id="train-run", scale=4)
        overwrite = gr.Checkbox(False, label="replace it if not empty (--overwrite)", elem_id="train-overwrite")
    with gr.Row():
        length = gr.Radio(["steps", "epochs"], value="steps", label="train for", elem_id="train-length")
        max_steps = gr.Number(D.max_steps, precision=0, minimum=1, label="steps", elem_id="train-steps")
        epochs = gr.Number(1, minimum=0.01, label="epochs", elem_id="train-epochs")
        lr = gr.Number(D.lr, label="learning rate", elem_id="train-lr")
        lora_r = gr.Number(D.lora_r, precision=0, minimum=1, label="LoRA r", elem_id="train-lora-r")
        lora_alpha = gr.Number(D.lora_alpha, precision=0, minimum=1, label="LoRA alpha", elem_id="train-lora-alpha")
    with gr.Row():
        batch = gr.Number(D.batch_size, precision=0, minimum=1, label="batch size", elem_id="train-batch")
        accum = gr.Number(D.grad_accum, precision=0, minimum=1, label="grad accum", elem_id="train-accum")
        backend = gr.Dropdown(["auto", "unsloth", "peft"], value=D.backend, label="backend", elem_id="train-backend")
        fit = gr.Dropdown(["auto", "lean", "memory", "off"], value=D.fit, label="fit (GPU)", elem_id="train-fit")
        precision = gr.Dropdown(["auto", "bf16", "fp16", "fp32"], value=D.precision, label="precision",
                                elem_id="train-precision")
        method = gr.Dropdown(["sft", "dpo", "orpo"], value=D.method, label="method (dpo, orpo: preference pairs)",
                             elem_id="train-method")
    inputs = [data.alias, data.custom, data.data, data.fmt, data.columns, data.template, data.train_on, data.drop_bad,
              data.seq_len, ui.run, length, max_steps, epochs, lr, lora_r, lora_alpha, batch, accum, backend, fit,
              precision, overwrite, method]
    gr.Markdown("#### What will run")
    plan = gr.HTML(elem_id="train-summary")
    with gr.Row():
        go = gr.Button("Start training", variant="primary", elem_id="train-start")
        halt = gr.Button("Stop", variant="stop", elem_id="train-stop")
        again = gr.Button("Resume", elem_id="train-resume")
    status = gr.HTML(elem_id="train-status")
    progress = gr.HTML(elem_id="train-progress")
    chart = gr.HTML(elem_id="train-chart")
    with gr.Accordion("speedtune train output", open=False):
        output = gr.Textbox(lines=12, max_lines=12, show_label=False, elem_id="train-output", interactive=False)
    seen = gr.State(None)
    ui.started_run = gr.Textbox(visible=False)  # set on start: the chat and export tabs pick the run up from here
    shown = gr.State(None)  # the summary on the page
    for comp in inputs:  # one queue, in order, the latest change last: an earlier summary never overwrites a later one
        comp.change(lambda *v: (summary(*v),) * 2, inputs, [plan, shown], show_progress="hidden",
                    trigger_mode="always_last", concurrency_id="train-summary", concurrency_limit=1)
    go.click(guard(2)(start), inputs, [status, ui.started_run])
    again.click(guard(2)(lambda *v: start(*v, resume=True)), inputs, [status, ui.started_run])
    halt.click(guard(1)(stop), None, status)
    timer = gr.Timer(1.0)
    timer.tick(poll, seen, [status, progress, chart, output, seen], show_progress="hidden")
    # and from the fields as they are each second: gradio can send a change with the field's previous value when the
    # browser is slow (seen under a busy test run: the page showed --lr 0.0002 after 5e-4 was typed), and then no
    # other change would correct it
    def refresh(old, *values):  # the summary, once, and no update where the page already shows it
        text = summary(*values)
        return (gr.skip(),) * 2 if text == old else (text,) * 2

    timer.tick(refresh, [shown, *inputs], [plan, shown], show_progress="hidden", concurrency_id="train-summary",
               concurrency_limit=1)
    ui.summary_refresh = (summary, inputs, plan)
    return ui
