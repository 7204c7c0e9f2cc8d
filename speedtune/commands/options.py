"""Click flags derived from the config's typed fields (speedtune.training.config.RunConfig): a flag's type, choices and
help come from its field, and every flag defaults to None so that a YAML value stands unless the flag is given.
`Finite`: the float type for the other verbs' flags (a RunConfig field's value is checked in speedtune.training.config)."""

from __future__ import annotations

import click

from speedtune.checks import Number
from speedtune.training.config import FIELDS, base_type, check_finite, flag

DATA_FIELDS = ("format", "columns", "template", "train_on", "drop_bad")
TRAIN_FIELDS = tuple(n for n in FIELDS if n not in DATA_FIELDS)


class Finite(Number):
    """A float flag that must be a finite number (not nan, inf or -inf), within optional bounds: a bad value is
    one `error:` line naming the flag."""

    def __init__(self, min: float | None = None, max: float | None = None):
        super().__init__(float, min, max)

    def convert(self, value, param, ctx):
        flag_name = param.opts[0] if param is not None and param.opts else "value"
        try:
            number = float(str(value).strip()) if not isinstance(value, float) else value
        except ValueError:
            return super().convert(value, param, ctx)  # its "not a number" line
        check_finite(flag_name, number, fix="a number" + bounds(self.min, self.max))
        return super().convert(number, param, ctx)


def bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo:g} to {hi:g}"
    return f" of at least {lo:g}" if lo is not None else f" of at most {hi:g}" if hi is not None else ""


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
    # floats are parsed by click and checked in speedtune.training.config (finite, in range): one check for flags, YAML
    # and API
    ptype = click.Choice(meta["choices"]) if meta.get("choices") else Number(int) if kind is int else kind
    return click.option(*decls, name, type=ptype, default=None, help=text)


def options(names):
    def wrap(fn):
        for name in reversed(names):
            fn = option(name)(fn)
        return fn
    return wrap


data_options = options(DATA_FIELDS)
train_options = options(TRAIN_FIELDS)
