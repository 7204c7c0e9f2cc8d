"""Click flags derived from the config's typed fields (speedtune.config.RunConfig): a flag's type, choices and help
come from its field, and every flag defaults to None so that a YAML value stands unless the flag is given."""

from __future__ import annotations

import click

from speedtune.config import FIELDS, base_type, flag

DATA_FIELDS = ("format", "columns", "template", "train_on", "drop_bad")
TRAIN_FIELDS = tuple(n for n in FIELDS if n not in DATA_FIELDS)


def option(name: str, show_default: bool = True):
    f = FIELDS[name]
    meta, kind = f.metadata, base_type(f)
    long = flag(name)
    decls = [long] + ([meta["short"]] if meta.get("short") else [])
    text = meta.get("help", "")
    if show_default and f.default is not None and kind is not bool:
        text += f" [default: {f.default}]"
    if kind is bool:
        return click.option(f"{long}/--no-{long[2:]}", name, default=None, help=text)
    ptype = click.Choice(meta["choices"]) if meta.get("choices") else kind
    return click.option(*decls, name, type=ptype, default=None, help=text)


def options(names):
    def wrap(fn):
        for name in reversed(names):
            fn = option(name)(fn)
        return fn
    return wrap


data_options = options(DATA_FIELDS)
train_options = options(TRAIN_FIELDS)
