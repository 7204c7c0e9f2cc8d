"""The data path shared by `data preview`, `data check`, `train` and `bench`: source -> format -> template ->
tokens and labels, with a report of what was dropped or fixed and the end-of-turn check against generation."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from speedtune.data import encode as enc
from speedtune.data import formats, pairs, sources, templates, tools
from speedtune.data.encode import Built
from speedtune.errors import UserError
from speedtune.inference.loader import is_run_folder, run_base_model
from speedtune.models.registry import resolve_model


@dataclass
class DataOptions:
    data: str
    format: str | None = None
    columns: str | None = None
    template: str | None = None
    train_on: str = "responses"  # or "all"
    drop_bad: bool = False
    split: str = "train"


def source(opts: DataOptions) -> sources.Source:
    """The data read and its format and columns checked: everything about the file that needs no tokenizer, so a
    file that can't be read or mapped fails before transformers loads."""
    if opts.train_on not in ("responses", "all"):
        raise UserError(f"--train-on: '{opts.train_on}' is not responses or all")
    src = sources.load(opts.data, opts.split)
    columns = {**src.columns, **formats.parse_columns(opts.columns)}
    if not pairs.is_preference(src, columns):
        formats.check_columns(src, formats.detect(src, opts.format, columns), columns)
    return src


def build(opts: DataOptions, tokenizer, seq_len: int, limit: int | None = None,
          src: sources.Source | None = None) -> Built:
    """The rows as training sees them, tokenised (`src`: the data already read by `source`)."""
    src = src or source(opts)
    columns = {**src.columns, **formats.parse_columns(opts.columns)}
    if pairs.is_preference(src, columns):  # chosen/rejected pairs, for --method dpo|orpo
        return pairs.build_pairs(src, columns, opts, tokenizer, seq_len, limit)
    fmt = formats.detect(src, opts.format, columns)
    with_tools = tools.uses_tools(src.records, fmt, columns, src.tags)
    template = tools.template_for(opts.template, tokenizer) if with_tools else \
        templates.load(opts.template, tokenizer) if fmt != "text" else \
        templates.Template("text", "", tokenizer.eos_token or "")
    built = Built([], len(src.records), fmt, template, label=src.label)

    def messages_and_tools(rec):  # a row's RowError raised here is that row's outcome (encode.encode_many)
        messages = formats.to_messages(rec, fmt, columns, src.tags)
        return messages, tools.row_tools(rec.where, rec.data.get(columns.get("tools", "tools"))) if with_tools else None

    def outcomes():
        rows = [(rec.where, partial(messages_and_tools, rec)) for rec in src.records[:limit or None]]
        for ex, messages, listed in enc.encode_many(rows, tokenizer, template, seq_len, opts.train_on):
            if with_tools and not isinstance(ex, formats.RowError):
                tools.count(built.tool_counts, messages, listed)
            yield ex

    return built.gather(outcomes(), opts.drop_bad)


def for_model(model: str, opts: DataOptions, *, seq_len: int, limit: int | None = None):
    """(built data, tokenizer, generation config or None) for a model spec or run folder: what `data preview`,
    `data check` and the web page show."""
    src = source(opts)  # before the tokenizer: a bad file is one line in a second, not after transformers loads
    from transformers import AutoTokenizer, GenerationConfig

    path = resolve_model(run_base_model(Path(model)) if is_run_folder(Path(model)) else model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = None
    return build(opts, tokenizer, seq_len, limit, src), tokenizer, gen


def stop_check(template: templates.Template, tokenizer, generation_config) -> tuple[list[int], str | None]:
    """The ids generation must stop on, and a warning when the model's generation config would not stop where
    training ends turns (then the saved run's generation config gets the end-of-turn id added)."""
    eot_ids = tokenizer.encode(template.eot, add_special_tokens=False) if template.eot else []
    current = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    current = [current] if isinstance(current, int) else list(current or [])
    if len(eot_ids) == 1 and eot_ids[0] not in current:
        return current + eot_ids, (f"the model's generation config stops on {current}, but training ends turns with "
                                   f"{template.eot!r} (id {eot_ids[0]}); the run's generation config adds it")
    return current, None


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0:
        return examples, []
    n = max(1, int(round(len(examples) * fraction)))
    if n >= len(examples):
        raise UserError(f"--eval-split {fraction}: leaves no training rows ({len(examples)} in all)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
