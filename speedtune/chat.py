"""`speedtune chat TARGET`: one-shot answers (`--prompt`, prints only the answer) or an interactive streaming chat
with history, against a model, a run folder, a merged folder, a GGUF or an OpenAI-compatible URL."""

from __future__ import annotations

import sys

import click

from speedtune.inference import Sampling, load_engine

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
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=0.9, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def command(target, url, prompt, system, max_new_tokens, temperature, top_p, device):
    """Chat with TARGET: a model alias or folder, a run folder, a merged folder, a .gguf, or --url."""
    if not target and not url:
        raise click.UsageError("give a TARGET (model, run folder, .gguf) or --url")
    engine = load_engine(url or target, None if device == "auto" else device)
    sampling = Sampling(max_new_tokens, temperature, top_p)
    if prompt is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        click.echo(engine.answer(messages, sampling))
        return
    repl(engine, sampling, system)
