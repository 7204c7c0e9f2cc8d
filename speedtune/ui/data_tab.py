"""The Model & data tab: a built-in alias (with its status), a local folder or a hub id; a data path, an uploaded file
or a LLaMA-Factory `dataset_info.json:name`; the detected format, column mapping and template; every row checked as
`speedtune data check` does, and a few rows rendered as `speedtune data preview` shows them."""

from __future__ import annotations

import re
from types import SimpleNamespace

from speedtune.data import formats, sources
from speedtune.data.dataset import DataOptions, for_model, stop_check
from speedtune.data.templates import names
from speedtune.errors import UserError
from speedtune.models.registry import ALIASES, model_status
from speedtune.training.config import RunConfig
from speedtune.paths import demo_dir
from speedtune.ui.common import esc, guard, message

FORMATS = ["auto", "alpaca", "chat", "sharegpt", "text", "pair"]
OWN_TEMPLATE = "the model's own"
FIELDS = {"chat": ["messages", "system"], "sharegpt": ["conversations", "system"],
          "alpaca": ["instruction", "input", "output", "system", "history"], "text": ["text"],
          "pair": ["user", "assistant", "system"]}


def model_spec(alias: str | None, custom: str | None) -> str:
    """The model the page works on: a folder or hub id typed in wins over the alias picked."""
    return (custom or "").strip() or (alias or RunConfig.model)


def alias_choices() -> list[tuple[str, str]]:
    return [(f"{a.name}  ({model_status(a)})", a.name) for a in ALIASES.values()]


def models_table() -> str:
    rows = "".join(f"<tr><td>{esc(a.name)}</td><td>{esc(a.hf_id)}</td><td>{esc(model_status(a))}</td>"
                   f"<td>{esc(a.about)}</td></tr>" for a in ALIASES.values())
    return ('<table class="st-table" id="st-models"><tr><th>alias</th><th>hub id</th><th>status</th><th>about</th>'
            f"</tr>{rows}</table>")


def options(fmt, columns, template, train_on, drop_bad) -> dict:
    """The page's data settings as the CLI's (None where the CLI's default applies)."""
    return {"format": None if fmt in (None, "", "auto") else fmt, "columns": (columns or "").strip() or None,
            "template": None if template in (None, "", OWN_TEMPLATE) else template,
            "train_on": train_on or "responses", "drop_bad": bool(drop_bad)}


def specials_pattern(tokenizer):
    specials = sorted({*tokenizer.all_special_tokens, *map(str, tokenizer.get_added_vocab())}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in specials)) if specials else None


def render_example(ex, pattern) -> str:
    """One example as HTML: the trained part highlighted, special tokens marked (as `data preview` colours them)."""
    out = []
    cuts = sorted({0, len(ex.text), *[p for span in ex.spans for p in span]})
    for a, b in zip(cuts, cuts[1:]):
        cls = "st-trained" if any(s <= a and b <= e for s, e in ex.spans) else "st-prompt"
        chunk, last = ex.text[a:b], 0
        for m in pattern.finditer(chunk) if pattern else []:
            out.append(f'<span class="{cls}">{esc(chunk[last:m.start()])}</span>')
            out.append(f'<span class="{cls} st-special">{esc(m.group(0))}</span>')
            last = m.end()
        out.append(f'<span class="{cls}">{esc(chunk[last:])}</span>')
    title = f"{ex.where} — {len(ex.input_ids)} tokens, {ex.n_trained} trained"
    return (f'<div class="st-example"><div class="st-ex-title">{esc(title)}</div>'
            f'<pre class="st-ex-text">{"".join(out)}</pre></div>')


def column_mapping(data: str, fmt: str, columns: str | None) -> str:
    src = sources.load(data)
    mapped = {**src.columns, **formats.parse_columns(columns)}
    keys = set(src.records[0].data)
    pairs = [f"{f} ← {mapped.get(f, f)}" for f in FIELDS.get(fmt, []) if mapped.get(f, f) in keys]
    return ", ".join(pairs) or "–"


def load_data(alias, custom, data, fmt, columns, template, train_on, drop_bad, seq_len, count):
    """(status, summary, preview): the whole file checked, the first rows rendered."""
    data = (data or "").strip()
    if not data:
        raise UserError("no data: give a file path, upload a file, or a dataset_info.json:name entry")
    opts = options(fmt, columns, template, train_on, drop_bad)
    model = model_spec(alias, custom)
    built, tokenizer, gen = for_model(model, DataOptions(data, opts["format"], opts["columns"], opts["template"],
                                                         opts["train_on"], opts["drop_bad"]),
                                      seq_len=int(seq_len or RunConfig.seq_len))
    lengths = [e.length for e in built.examples]
    rows = [("model", model), ("data", built.label), ("format", built.format),
            ("columns", column_mapping(data, built.format, opts["columns"])),
            ("template", built.template.name), ("end of turn", built.template.eot or "–"),
            ("rows", f"{built.rows} ({len(built.examples)} usable, {len(built.dropped)} dropped)"),
            ("tokens", f"{built.tokens} ({built.trained_tokens} trained)"),
            ("length", f"min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} "
                       f"(seq len {int(seq_len)})")]
    rows += [(f"fixed ({n})", f) for f, n in built.fixed.items()]
    summary = '<table class="st-table" id="st-data-summary">' + "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"
    notes = []
    _, warning = stop_check(built.template, tokenizer, gen)
    if warning:
        notes.append(message("warn", f"warning: {warning}"))
    if built.dropped:
        first = built.dropped[0]
        notes.append(message("warn", f"dropped {len(built.dropped)} of {built.rows} rows (first: {first[0]}: "
                                     f"{first[1]})"))
    legend = ('<div class="st-legend"><span class="st-prompt">prompt (not trained)</span>'
              '<span class="st-trained">trained</span><span class="st-special">&lt;special token&gt;</span></div>')
    pattern = specials_pattern(tokenizer)
    shown = built.examples[: int(count or 3)]
    if getattr(built, "pairs", False):  # preference pairs: each pair's chosen and rejected sequence
        from speedtune.data.pairs import views

        shown = [v for ex in shown for v in views(ex)]
    preview = legend + "".join(render_example(ex, pattern) for ex in shown)
    status = message("ok", f"ok: {len(built.examples)} rows ready to train ({built.format}, template "
                           f"{built.template.name})")
    return status, summary + "".join(notes), preview


def build(gr) -> SimpleNamespace:
    ui = SimpleNamespace()
    gr.Markdown("### Model")
    with gr.Row():
        ui.alias = gr.Dropdown(alias_choices(), value=RunConfig.model, label="built-in model", elem_id="model-alias",
                               scale=2)
        ui.custom = gr.Textbox(label="or a local folder / hub id (wins over the alias)", elem_id="model-custom",
                               placeholder="e.g. ~/models/my-llama or unsloth/Llama-3.2-1B-Instruct", scale=3)
    with gr.Accordion("built-in models", open=False):
        gr.HTML(models_table)
    gr.Markdown("### Data")
    with gr.Row():
        ui.data = gr.Textbox(value=str(demo_dir() / "identity.jsonl"), label="data: file, folder, hub dataset id, or "
                             "dataset_info.json:name", elem_id="data-path", scale=3)
        ui.upload = gr.File(label="or upload a file", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                            type="filepath", elem_id="data-upload", scale=2, height=130)
    with gr.Row():
        ui.fmt = gr.Dropdown(FORMATS, value="auto", label="format", elem_id="data-format")
        ui.columns = gr.Textbox(label="columns", placeholder="user=Patient,assistant=Doctor", elem_id="data-columns")
        ui.template = gr.Dropdown([OWN_TEMPLATE, *names()], value=OWN_TEMPLATE, label="template", elem_id="data-template")
        ui.train_on = gr.Radio(["responses", "all"], value="responses", label="train on", elem_id="data-train-on")
        ui.drop_bad = gr.Checkbox(False, label="drop bad rows", elem_id="data-drop-bad")
        ui.seq_len = gr.Number(RunConfig.seq_len, precision=0, label="seq len", minimum=16, elem_id="seq-len")
        count = gr.Number(3, precision=0, label="rows to preview", minimum=1, maximum=20, elem_id="data-count")
    load = gr.Button("Load and check the data", variant="primary", elem_id="data-load")
    status = gr.HTML(elem_id="data-status")
    summary = gr.HTML(elem_id="data-summary")
    preview = gr.HTML(elem_id="data-preview")
    inputs = [ui.alias, ui.custom, ui.data, ui.fmt, ui.columns, ui.template, ui.train_on, ui.drop_bad, ui.seq_len, count]
    handler = guard(3, clear=True)(load_data)  # no stale preview under an error
    load.click(handler, inputs, [status, summary, preview])
    ui.data.submit(handler, inputs, [status, summary, preview])
    ui.upload.upload(lambda f: f or gr.skip(), ui.upload, ui.data).then(handler, inputs, [status, summary, preview])
    return ui
