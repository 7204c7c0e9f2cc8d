"""The dispatcher's exit codes: a command's own code, one line for a user mistake, 130 for Ctrl-C."""

import sys

import click
import pytest

from speedtune import cli


@click.command()
@click.option("--code", type=int, default=0)
@click.option("--interrupt", is_flag=True)
@click.pass_context
def command(ctx, code, interrupt):
    if interrupt:
        raise KeyboardInterrupt
    ctx.exit(code)


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(cli.VERBS, "probe", (__name__, "a test verb"))
    sys.modules.setdefault(__name__, sys.modules[__name__])


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def test_a_commands_exit_code_is_kept(probe):
    assert exit_code(["probe", "--code", "3"]) == 3
    assert exit_code(["probe"]) == 0


def test_ctrl_c_anywhere_is_130_and_one_line(probe, capsys):
    assert exit_code(["probe", "--interrupt"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_usage_mistakes_are_one_line(probe, capsys):
    assert exit_code(["probe", "--code", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "probe --help" in err
    assert exit_code(["nope"]) == 2
    assert "No such command 'nope'" in capsys.readouterr().err


def test_every_listed_verb_loads():
    for verb in cli.VERBS:
        assert isinstance(cli.group.get_command(None, verb), click.Command), verb
