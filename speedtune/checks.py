"""Numbers from the command line, checked the way every speedtune mistake is reported: one `error: ...` line naming
the flag, its value and what is allowed (click's own range errors print a usage block instead)."""

from __future__ import annotations

import click

from speedtune.errors import UserError


class Number(click.ParamType):
    """An int or float flag with optional bounds; a bad value is a UserError naming the flag."""

    def __init__(self, kind: type = int, min: float | None = None, max: float | None = None):
        self.kind, self.min, self.max = kind, min, max
        self.name = "integer" if kind is int else "number"

    def convert(self, value, param, ctx):
        flag = param.opts[0] if param is not None and param.opts else "value"
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                raise UserError(f"{flag} {value!r}: not a {'whole number' if self.kind is int else 'number'}") \
                    from None
        return check_range(flag, number, self.min, self.max)


def check_range(flag: str, number, lo=None, hi=None, why: str = ""):
    if number != number or (lo is not None and number < lo) or (hi is not None and number > hi):
        allowed = (f"from {_show(lo)} to {_show(hi)}" if lo is not None and hi is not None else
                   f"at least {_show(lo)}" if lo is not None else f"at most {_show(hi)}")
        raise UserError(f"{flag} {_show(number)}: out of range, use a value {allowed}{why}")
    return number


def _show(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


class Choice(click.Choice):
    """click.Choice whose mistakes are one `error: ...` line naming the flag and the choices."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            flag = param.opts[0] if param is not None and param.opts else "value"
            raise UserError(f"{flag} {value!r}: not one of {', '.join(self.choices)}") from None
