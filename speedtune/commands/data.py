"""`speedtune data preview` and `speedtune data check`: the dataset as the model will see it."""

from __future__ import annotations

from collections import Counter

import click

from speedtune.checks import Number
from speedtune.data.dataset import DataOptions, for_model, stop_check
from speedtune.data.render import show_preview
from speedtune.commands.options import data_options


@click.group("data")
def command():
    """Preview and check a dataset as the model will see it."""


@command.command("preview")
@click.argument("data")
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Model whose tokenizer and template to use.")
@data_options
@click.option("--seq-len", type=Number(int, 16), default=2048, show_default=True)
@click.option("-n", "count", type=Number(int, 1), default=3, show_default=True, help="How many examples.")
def preview(data, model, format, columns, template, train_on, drop_bad, seq_len, count):
    """Show formatted examples: special tokens in magenta, the trained part in green, token counts."""
    opts = DataOptions(data, format, columns, template, train_on or "responses", bool(drop_bad))
    built, tokenizer, _ = for_model(model, opts, seq_len=seq_len, limit=count)
    show_preview(built, tokenizer, count)


@command.command("check")
@click.argument("data")
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Model whose tokenizer and template to use.")
@data_options
@click.option("--seq-len", type=Number(int, 16), default=2048, show_default=True)
def check(data, model, format, columns, template, train_on, drop_bad, seq_len):
    """Validate every row; exit 1 naming file and row on the first problem (or drop bad rows with --drop-bad)."""
    from rich.console import Console
    from rich.table import Table

    opts = DataOptions(data, format, columns, template, train_on or "responses", bool(drop_bad))
    built, tokenizer, gen = for_model(model, opts, seq_len=seq_len)
    lengths = [e.length for e in built.examples]  # a pair's: its longer sequence
    table = Table(title=f"data check: {built.label}", show_header=False)
    rows = [("rows", str(built.rows)), ("usable", str(len(built.examples))), ("dropped", str(len(built.dropped))),
            ("format", built.format), ("template", built.template.name), ("end of turn", built.template.eot),
            ("tokens", f"{built.tokens} ({built.trained_tokens} trained)"),
            ("length", f"min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} "
                       f"(--seq-len {seq_len})")]
    if built.tool_counts:
        rows.append(("tool calling", ", ".join(f"{n} {k}" for k, n in built.tool_counts.items())))
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
    ready = "preference pairs ready for --method dpo or orpo" if getattr(built, "pairs", False) else \
        "rows ready to train"
    console.print(f"[green]ok[/]: {len(built.examples)} {ready}")
