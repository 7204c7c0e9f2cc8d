"""`speedtune chat TARGET`: one-shot answers (`--prompt`, prints only the answer) or an interactive streaming chat
with history, against a model, a run folder, a merged folder, a GGUF or an OpenAI-compatible URL."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from speedtune.checks import Choice, Number, check_range
from speedtune.inference.engine import Sampling
from speedtune.errors import UserError
from speedtune.inference.loader import load_engine
from speedtune.commands.options import Finite

HELP = "commands: /reset (forget the history), /system TEXT (set the system prompt), /exit"


def repl(engine, sampling: Sampling, system: str | None, inp=None, out=None) -> None:
    inp = inp or sys.stdin
    out = out or sys.stdout
    history: list[dict] = []
    out.write(f"chatting with {engine.name}. {HELP}\n")
    while True:
        out.write(">>> ")
        out.flush()
        line = inp.readline()
        if not line:
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return
        if line == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            out.write(f"(system prompt {'set' if system else 'removed'}; history cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        parts = []
        for piece in engine.stream(messages, sampling):
            parts.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(parts).strip()})


@click.command("chat")
@click.argument("target", required=False)
@click.option("--url", help="An OpenAI-compatible endpoint instead of TARGET, e.g. http://127.0.0.1:8000/v1.")
@click.option("--prompt", "-p", help="Answer this once and print only the answer.")
@click.option("--system", help="A system prompt.")
@click.option("--max-new-tokens", type=Number(int, 1), default=256, show_default=True)
@click.option("--temperature", type=Finite(0, 100), default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=Finite(0, 1), default=0.9, show_default=True)
@click.option("--device", type=Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def command(target, url, prompt, system, max_new_tokens, temperature, top_p, device):
    """Chat with TARGET: a model alias or folder, a run folder, a merged folder, a .gguf, or --url."""
    if not target and not url:
        raise UserError("give a TARGET (model, run folder, .gguf) or --url")
    if target and url:
        raise UserError(f"give a TARGET or --url, not both ({target} and {url})")
    gguf = bool(target) and target.endswith(".gguf")
    if gguf:  # the context is opened to fit the answer, up to what the model was trained for
        from speedtune.exporting.gguf_tools import context_length
        from speedtune.inference.llamacpp import check_gguf

        trained = context_length(check_gguf(Path(target))) or 2048
        check_range("--max-new-tokens", max_new_tokens, 1, trained - 1, f" (the model's context is {trained})")
    engine = load_engine(target, None if device == "auto" else device, url=url,
                         n_ctx=min(trained, max(2048, max_new_tokens + 512)) if gguf else 2048)
    limit = getattr(engine, "context_length", None)
    if limit:
        check_range("--max-new-tokens", max_new_tokens, 1, limit - 1, f" (the model's context is {limit})")
    sampling = Sampling(max_new_tokens, temperature, top_p)
    if prompt is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        click.echo(engine.answer(messages, sampling))
        return
    repl(engine, sampling, system)
