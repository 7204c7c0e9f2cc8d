"""The Export tab: GGUF quants (verified against the merged model), merged 16-bit, Ollama and LM Studio files, through
`speedtune.exporting.export.export_run` in a worker thread (the page stays responsive and shows how far it is)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from speedtune.errors import UserError
from speedtune.exporting.behaviour import MAX_NEW_TOKENS
from speedtune.exporting.gguf import PROMPT_CHECK
from speedtune.exporting.gguf_tools import human_size
from speedtune.ui.common import esc, guard, message

QUANTS = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]
_busy = threading.Lock()


def verification_table(report: dict) -> str:
    rows, drifts = [], []
    for g in report["gguf"]:
        ok = "st-good" if g["quality_ok"] else "st-bad"
        stops, b = g["chat"]["stops_on_eos"], g.get("behaviour")
        quality = "ok" if g["quality_ok"] else "drifts" if g.get("drifted") else "too lossy"
        same = f"{b['matches']}/{b['prompts']}" if b else "-"
        ends = f"{b['merged_stops'] - len(g['drifted'])}/{b['merged_stops']}" if b else "-"
        rows.append(f'<tr><td>{esc(g["name"])}</td><td>{esc(human_size(g["size_bytes"]))}</td>'
                    f'<td class="{ok}">{g["top1_agreement"]:.1%}</td><td>{g["mean_kl"]:.4f}</td>'
                    f'<td class="{"st-good" if stops else "st-bad"}">{"yes" if stops else "NO"}</td>'
                    f'<td>{same}</td><td class="{"st-bad" if g.get("drifted") else "st-good"}">{ends}</td>'
                    f'<td class="{ok}">{quality}</td><td>{esc(g["chat"]["answer"][:160])}</td></tr>')
        drifts += [f'<li><b>{esc(g["name"])}</b>, asked {esc(d["prompt"][-200:])}<br>merged model '
                   f'({d["merged_tokens"]} tokens, ends): {esc(d["merged"][:300])}<br>GGUF (runs past '
                   f'{d["gguf_tokens"]} tokens): {esc(d["gguf"][:300])}</li>' for d in g.get("drifted") or []]
    return ('<table class="st-table" id="st-export-table"><caption>GGUF verification against the merged model '
            f'(answer: to &quot;{esc(PROMPT_CHECK)}&quot;, greedy, in llama.cpp; same answers: greedy answers equal to '
            f'the merged model&#x27;s; ends: answers that end where its answers end, at most {MAX_NEW_TOKENS} '
            'tokens)</caption><tr><th>file</th><th>size</th><th>top-1 agreement</th><th>mean KL</th>'
            '<th>stops on EOS</th><th>same answers</th><th>ends like merged</th><th>quality</th><th>answer</th></tr>'
            + "".join(rows) + "</table>"
            + (f'<ul class="st-ex-text" id="st-export-drift">{"".join(drifts)}</ul>' if drifts else ""))


def where(report: dict) -> str:
    out = Path(report["output"])
    lines = [f"folder: {out}"] + [f"GGUF: {g['file']}" for g in report["gguf"]]
    if (out / "merged-16bit").is_dir():
        lines.append(f"merged 16-bit (transformers, vLLM): {out / 'merged-16bit'}")
    if report.get("ollama_create"):
        lines.append(f"Ollama: {report['ollama_create']}")
    if report.get("lmstudio"):
        lines.append(f"LM Studio: {report['lmstudio']}")
    if (out / "README.md").is_file():
        lines.append(f"how to load it (Jan, GPT4All, ...): {out / 'README.md'}")
    return '<pre class="st-ex-text" id="st-export-files">' + esc("\n".join(lines)) + "</pre>"


def export(source, quants, merged16, ollama, lmstudio, output, overwrite):
    """Streams (status, table, files) while export_run works in its own thread."""
    from rich.console import Console

    from speedtune.exporting.export import export_run

    source = (source or "").strip()
    if not source:
        raise UserError("nothing to export: give a run folder (train one on the Train tab)")
    if not quants and not merged16:
        raise UserError("pick at least one GGUF type or merged 16-bit")
    if not _busy.acquire(blocking=False):
        raise UserError("an export is already running; wait for it to end")
    buf = io.StringIO()
    result: dict = {}

    def work():  # holds the lock until the export ends, even if the page that started it goes away
        try:
            result["report"] = export_run(Path(source), Path(output.strip()) if (output or "").strip() else None,
                                          gguf=list(quants), ollama=bool(ollama), lmstudio=bool(lmstudio),
                                          merged="16bit" if merged16 else None, overwrite=bool(overwrite),
                                          console=Console(file=buf, width=140, force_terminal=False))
        except BaseException as e:  # noqa: BLE001 - handed to the page as one line
            result["error"] = e
        finally:
            _busy.release()

    t0 = time.time()
    thread = threading.Thread(target=work, daemon=True, name="speedtune-ui-export")
    try:
        thread.start()
    except BaseException:
        _busy.release()
        raise
    while thread.is_alive():
        thread.join(1.0)
        last = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-1:]
        yield message("info", f"exporting {source} ({time.time() - t0:.0f} s){': ' + last[0] if last else ''}"), "", ""
    if "error" in result:
        raise result["error"]
    report = result["report"]
    warn = [f"{g['name']} {g['verdict']}" for g in report["gguf"] if not g["quality_ok"]]
    status = message("warn", f"exported, but {'; '.join(warn)}; use a larger type (q8_0 or f16)") if warn else \
        message("ok", f"exported to {report['output']} in {time.time() - t0:.0f} s")
    yield status, verification_table(report) if report["gguf"] else "", where(report)


def build(gr, train: SimpleNamespace) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row():
        ui.source = gr.Textbox(label="run folder to export", elem_id="export-source", scale=3)
        output = gr.Textbox(label="output folder (default: RUN/export)", elem_id="export-output", scale=3)
        overwrite = gr.Checkbox(False, label="replace a non-empty output", elem_id="export-overwrite")
    with gr.Row():
        quants = gr.CheckboxGroup(QUANTS, value=["q8_0"], label="GGUF types (q8_0 for models under 1B: 4-bit breaks "
                                  "them; q4_k_m from 1B up)", elem_id="export-quants", scale=3)
        merged16 = gr.Checkbox(False, label="merged 16-bit", elem_id="export-merged")
        ollama = gr.Checkbox(True, label="Ollama Modelfile", elem_id="export-ollama")
        lmstudio = gr.Checkbox(False, label="LM Studio layout", elem_id="export-lmstudio")
    go = gr.Button("Export and verify", variant="primary", elem_id="export-start")
    status = gr.HTML(elem_id="export-status")
    table = gr.HTML(elem_id="export-table")
    files = gr.HTML(elem_id="export-files")
    go.click(guard(3)(export), [ui.source, quants, merged16, ollama, lmstudio, output, overwrite],
             [status, table, files])
    train.started_run.change(lambda run: run, train.started_run, ui.source)
    return ui
