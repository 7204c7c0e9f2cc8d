"""A dataset example as the model sees it, for a terminal or a notebook: special tokens in magenta, the trained
part green, the rest dim. `data preview` and `speedtune.preview` print it."""

from __future__ import annotations

import re


def shown(ex, tokenizer):
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


def show_preview(built, tokenizer, count: int, console=None) -> None:
    """The first `count` examples, rendered: what `data preview` and `speedtune.preview` print."""
    from rich.console import Console
    from rich.panel import Panel

    console = console or Console()
    console.print(f"format [bold]{built.format}[/], template [bold]{built.template.name}[/], end of turn "
                  f"[magenta]{built.template.eot}[/]")
    if getattr(built, "pairs", False):  # preference pairs: prompt, chosen and rejected
        return show_pairs(built, tokenizer, count, console)
    for ex in built.examples[:count]:
        title = f"{ex.where} — {len(ex.input_ids)} tokens, {ex.n_trained} trained"
        console.print(Panel(shown(ex, tokenizer), title=title, title_align="left"))


def show_pairs(built, tokenizer, count: int, console) -> None:
    """`data preview` for pairs: the prompt dim, each answer green (the part scored), special tokens magenta."""
    from types import SimpleNamespace

    from rich.panel import Panel
    from rich.text import Text

    for ex in built.examples[:count]:
        body = shown(SimpleNamespace(text=ex.prompt_text, spans=[]), tokenizer)
        for name, text, ids in (("chosen", ex.chosen_text, ex.chosen_ids), ("rejected", ex.rejected_text,
                                                                           ex.rejected_ids)):
            body.append(Text(f"\n── {name} ({len(ids)} tokens) ──\n", style="bold"))
            body.append(shown(SimpleNamespace(text=text, spans=[(0, len(text))]), tokenizer))
        title = f"{ex.where} — prompt {len(ex.prompt_ids)} tokens, chosen {len(ex.chosen_ids)}, rejected " \
                f"{len(ex.rejected_ids)}"
        console.print(Panel(body, title=title, title_align="left"))
