"""`speedtune models list` and `speedtune models pull`: the built-in aliases (speedtune.models.registry)."""

from __future__ import annotations

import click

from speedtune import paths
from speedtune.models.registry import ALIASES, model_status, pull_embedded, resolve_model


@click.group("models")
def command():
    """List and pull the built-in models."""


@command.command("list")
def list_cmd():
    """The built-in aliases and whether each is on this machine."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"built-in models (cache: {paths.models_dir()})")
    for col in ("alias", "hub id", "status", "about"):
        table.add_column(col)
    for a in ALIASES.values():
        table.add_row(a.name, a.hf_id, model_status(a), a.about)
    Console().print(table)


@command.command("pull")
@click.argument("name")
@click.option("--source", type=click.Choice(["hf", "modelscope"]), default=None,
              help="Where hub models come from (default hf; USE_MODELSCOPE_HUB=1 picks modelscope).")
@click.option("--force", is_flag=True, help="Materialise the embedded model again even if it is cached.")
def pull_cmd(name: str, source: str | None, force: bool):
    """Fetch a model into the local cache: an alias (the embedded one needs no network) or a hub id."""
    if name in ALIASES and ALIASES[name].embedded:
        path = pull_embedded(ALIASES[name], force=force)
    else:
        path = resolve_model(name, source)
    click.echo(str(path))
