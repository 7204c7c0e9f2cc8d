"""The dispatcher's exit codes: a command's own code, one line for a user mistake, 130 for Ctrl-C; and what
`speedtune train` shows before it trains."""

import sys

import click
import pytest
import yaml
from conftest import cli as run_cli
from conftest import assert_user_error, cli_here

from speedtune import cli
from speedtune.paths import demo_dir


@click.command()
@click.option("--code", type=int, default=0)
@click.option("--interrupt", is_flag=True)
@click.option("--crash", is_flag=True)
@click.pass_context
def command(ctx, code, interrupt, crash):
    if interrupt:
        raise KeyboardInterrupt
    if crash:
        raise RuntimeError("a bug, not a user mistake")
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


@pytest.mark.parametrize("args", [
    ["data", "check", demo_dir() / "identity.jsonl", "--seq-len", "256"],  # a command that works
    ["data", "check", demo_dir() / "identity.jsonl", "--template", "nope"],  # a user mistake
    ["data", "check", "--seq-len", "x", demo_dir() / "identity.jsonl"],  # a bad flag
])
def test_in_process_runs_say_what_a_process_says(args, smollm2):
    """Most tests run short commands through `cli_here` (the entry point in the test's own process): the same exit
    code, output and one-line error as `speedtune ARGS` in a process of its own."""
    alone, here = run_cli(*args), cli_here(*args)
    assert (here.returncode, here.stdout, here.stderr) == (alone.returncode, alone.stdout, alone.stderr)


def test_in_process_runs_show_a_bug_as_its_traceback(probe):
    """An exception that escapes the entry point reaches `cli_here`'s stderr as the traceback a process would print,
    so the tests' "one line, no traceback" check fails on it."""
    r = cli_here("probe", "--crash")
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: a bug, not a user mistake" in r.stderr
    with pytest.raises(AssertionError):
        assert_user_error(r)
    assert cli_here("probe", "--code", "3").returncode == 3


def plan_lines(stderr: str) -> list[str]:
    """The lines `speedtune train` prints from its plan line up to its data line."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("plan: "))
    end = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    return lines[start:end]


@pytest.mark.slow
def test_the_plan_is_two_lines_and_verbose_says_why(tiny_model, tmp_path):
    args = ["train", "--model", tiny_model, "--data", demo_dir() / "identity.jsonl", "--max-steps", "1",
            "--seq-len", "128", "--save-steps", "1"]
    wide = {"COLUMNS": "200"}  # a terminal's width: rich wraps at 80 columns without one
    short = cli_here(*args, "--output", tmp_path / "short", env=wide)
    assert short.returncode == 0, short.stderr
    plan = yaml.safe_load((tmp_path / "short" / "run_config.yaml").read_text())["plan"]
    assert len(plan["reasons"]) >= 2 and plan["backend_why"] and plan["dtype_why"]  # kept in the run folder
    lines = plan_lines(short.stderr)
    dtype = {"bfloat16": "bf16", "float32": "fp32"}[plan["dtype"]]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"plan: peft on cpu ({plan['device_name']}), {dtype}, adamw_torch"), lines
    assert f"8 rows a step: micro-batches of at most {plan['token_budget']} tokens" in lines[1], lines
    assert "checkpointing off" in lines[1], lines
    flat = " ".join(short.stderr.split())
    for why in [plan["backend_why"], plan["dtype_why"], *plan["reasons"]]:
        assert " ".join(why.split()) not in flat, why

    verbose = cli_here(*args, "--output", tmp_path / "verbose", "--verbose", env=wide)
    assert verbose.returncode == 0, verbose.stderr
    lines = plan_lines(verbose.stderr)
    assert lines[:2] == plan_lines(short.stderr) and lines[2] == "why:", lines
    plan = yaml.safe_load((tmp_path / "verbose" / "run_config.yaml").read_text())["plan"]
    whys = [f"backend peft: {plan['backend_why']}", f"precision {plan['dtype']}: {plan['dtype_why']}", *plan["reasons"]]
    assert " ".join(" ".join(lines[3:]).split()) == " ".join(f"- {why}" for why in whys), lines  # one item a reason
