"""`speedtune data preview` and `speedtune data check`: the dataset as the model will see it."""

from __future__ import annotations

import re
from collections import Counter

import click

from speedtune.data.dataset import DataOptions, build, stop_check


def data_options(f):
    """The data flags, shared with `speedtune train`."""
    for opt in reversed([
        click.option("--format", "fmt", type=click.Choice(["alpaca", "chat", "sharegpt", "text", "pair"]),
                     help="Data format (detected when left out)."),
        click.option("--columns", help="Map fields to your columns, e.g. user=Patient,assistant=Doctor or "
                                       "instruction=question,output=answer."),
        click.option("--template", help="A named chat template (alpaca, chatml, llama-3, zephyr, mistral); default: "
                                        "the model's own."),
        click.option("--train-on", type=click.Choice(["responses", "all"]), default="responses", show_default=True,
                     help="Train on the assistant turns only, or on every token."),
        click.option("--drop-bad", is_flag=True, help="Drop bad rows (and say how many and why) instead of failing."),
    ]):
        f = opt(f)
    return f


def _load(model, data, fmt, columns, template, train_on, drop_bad, seq_len, limit=None):
    from transformers import AutoTokenizer, GenerationConfig

    from speedtune.inference import is_run_folder, run_base_model
    from speedtune.models import resolve_model
    from pathlib import Path

    path = resolve_model(run_base_model(Path(model)) if is_run_folder(Path(model)) else model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = None
    built = build(DataOptions(data, fmt, columns, template, train_on, drop_bad), tokenizer, seq_len, limit)
    return built, tokenizer, gen


def _shown(ex, tokenizer):
    from rich.text import Text

    specials = sorted({*tokenizer.all_special_tokens, *map(str, tokenizer.get_added_vocab())}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    out = Text()
    cuts = sorted({0, len(ex.text), *[p for span in ex.spans for p in span]})
    for a, b in zip(cuts, cuts[1:]):
        trained = any(s <= a and b <= e for s, e in ex.spans)
        style = "green" if trained else "dim"
        chunk = ex.text[a:b]
        last = 0
        for m in pattern.finditer(chunk) if pattern else []:
            out.append(chunk[last:m.start()], style=style)
            out.append(m.group(0), style="bold magenta" + (" underline" if trained else ""))
            last = m.end()
        out.append(chunk[last:], style=style)
    return out


@click.group("data")
def command():
    """Preview and check a dataset as the model will see it."""


@command.command("preview")
@click.argument("data")
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Model whose tokenizer and template to use.")
@data_options
@click.option("--seq-len", type=click.IntRange(16), default=2048, show_default=True)
@click.option("-n", "count", type=click.IntRange(1), default=3, show_default=True, help="How many examples.")
def preview(data, model, fmt, columns, template, train_on, drop_bad, seq_len, count):
    """Show formatted examples: special tokens in magenta, the trained part in green, token counts."""
    from rich.console import Console
    from rich.panel import Panel

    built, tokenizer, _ = _load(model, data, fmt, columns, template, train_on, drop_bad, seq_len, limit=count)
    console = Console()
    console.print(f"format [bold]{built.format}[/], template [bold]{built.template.name}[/], end of turn "
                  f"[magenta]{built.template.eot}[/]")
    for ex in built.examples[:count]:
        title = f"{ex.where} — {len(ex.input_ids)} tokens, {ex.n_trained} trained"
        console.print(Panel(_shown(ex, tokenizer), title=title, title_align="left"))


@command.command("check")
@click.argument("data")
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Model whose tokenizer and template to use.")
@data_options
@click.option("--seq-len", type=click.IntRange(16), default=2048, show_default=True)
def check(data, model, fmt, columns, template, train_on, drop_bad, seq_len):
    """Validate every row; exit 1 naming file and row on the first problem (or drop bad rows with --drop-bad)."""
    from rich.console import Console
    from rich.table import Table

    built, tokenizer, gen = _load(model, data, fmt, columns, template, train_on, drop_bad, seq_len)
    lengths = [len(e.input_ids) for e in built.examples]
    table = Table(title=f"data check: {built.label}", show_header=False)
    rows = [("rows", str(built.rows)), ("usable", str(len(built.examples))), ("dropped", str(len(built.dropped))),
            ("format", built.format), ("template", built.template.name), ("end of turn", built.template.eot),
            ("tokens", f"{built.tokens} ({built.trained_tokens} trained)"),
            ("length", f"min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} "
                       f"(--seq-len {seq_len})")]
    rows += [(f"fixed ({n})", f) for f, n in built.fixed.items()]
    for k, v in rows:
        table.add_row(k, v)
    console = Console()
    console.print(table)
    _, warning = stop_check(built.template, tokenizer, gen)
    if warning:
        console.print(f"[yellow]warning[/]: {warning}")
    if built.dropped:
        reasons = Counter(r for _, r in built.dropped)
        console.print(f"[yellow]dropped {len(built.dropped)} of {built.rows} rows[/]:")
        for reason, n in reasons.most_common():
            first = next(w for w, r in built.dropped if r == reason)
            console.print(f"  {n} × {reason} (first: {first})")
    console.print(f"[green]ok[/]: {len(built.examples)} rows ready to train")
