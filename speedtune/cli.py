"""The `speedtune` command: a tiny dispatcher. Each verb lives in `speedtune/commands/<verb>.py` and is imported only
when it runs, so `speedtune --help` is instant and GPU-only packages are never imported on a CPU machine."""

from __future__ import annotations

import importlib
import os
import sys

import click

from speedtune.errors import UserError
from speedtune.training.distributed import world

# verb -> (module, short help). Only verbs that work are listed.
VERBS: dict[str, tuple[str, str]] = {
    "quickstart": ("speedtune.commands.quickstart", "The whole path offline on the embedded default: train 60 steps, compare answers, export."),
    "models": ("speedtune.commands.models", "List and pull the built-in models (the embedded default works offline)."),
    "data": ("speedtune.commands.data", "Preview and check a dataset as the model will see it."),
    "train": ("speedtune.commands.train", "Fine-tune with LoRA/QLoRA (Unsloth on a CUDA GPU, transformers+PEFT elsewhere)."),
    "chat": ("speedtune.commands.chat", "Chat with a model, run folder, merged folder, GGUF or OpenAI-compatible URL."),
    "export": ("speedtune.commands.export", "Merge and convert a run to 16-bit, 4-bit or GGUF, verified, with Ollama/LM Studio files."),
    "serve": ("speedtune.commands.serve", "Serve a model behind an OpenAI-compatible API."),
    "bench": ("speedtune.commands.bench", "Benchmark Unsloth against vanilla PEFT: throughput and memory, side by side."),
    "ui": ("speedtune.commands.ui", "A local web page for the whole path: data preview, training with a live loss curve, chat, export."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(VERBS)

    def get_command(self, ctx, name):
        if name not in VERBS:
            return None
        return importlib.import_module(VERBS[name][0]).command

    def format_commands(self, ctx, formatter):
        rows = [(v, VERBS[v][1]) for v in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="speedtune")
def group():
    """speedtune: fine-tune Llama-3-class models with LoRA/QLoRA and run them locally."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with its code: 0, a command's own `ctx.exit(n)`, 2 (or the error's code) for a user
    mistake shown as one line, 130 for Ctrl-C."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        code = group.main(args=argv, prog_name="speedtune", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        code = 130
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:  # a bad flag or value: one line, like every other user mistake
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see {e.ctx.command_path} --help)"
        click.secho(f"error: {e.format_message()}{hint}", fg="red", err=True)
        code = e.exit_code
    except UserError as e:
        if world().main:  # under torchrun every rank meets the same mistake: say it once
            click.secho(f"error: {e}", fg="red", err=True)
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
