"""`speedtune train`: the flags and YAML file become a RunConfig, then `speedtune.training.train.train` runs it
(or, with --gpus N, this process re-launches itself under torchrun)."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console

from speedtune.checks import Number
from speedtune.commands.options import data_options, train_options
from speedtune.runs import RunFolder
from speedtune.training import config as config_mod
from speedtune.training import distributed
from speedtune.training.runlog import Phases
from speedtune.training.train import train


@click.command("train")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@train_options
@data_options
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
@click.option("--gpus", type=Number(int, 1), default=None,
              help="Train data-parallel on this many GPUs (re-launches itself under torchrun).")
@click.option("--verbose", "-v", is_flag=True, help="Also print why the plan chose each setting (saved in "
                                                    "run_config.yaml either way).")
def command(config_file, resume, overwrite, gpus, verbose, **flags):
    """Fine-tune with LoRA. CONFIG_FILE is an optional YAML of flag names; every flag given overrides it. Several
    GPUs: --gpus N, or torchrun --nproc_per_node N -m speedtune train ... (or accelerate launch)."""
    if resume and not config_file and flags.get("output"):
        saved = RunFolder(flags["output"]).config_file
        if saved.is_file():
            config_file = str(saved)  # resume the run as it was asked (config.load reads its `asked`)
    cfg = config_mod.load(config_file, flags)
    if cfg.epochs and flags.get("max_steps") is None:
        cfg.max_steps = None
    os.environ.setdefault("WANDB_SILENT", "true")
    if gpus and gpus > 1 and "WORLD_SIZE" not in os.environ:
        cfg.validate()
        code = distributed.relaunch(gpus, ["train", *distributed.strip_gpus(sys.argv[2:])], Console(stderr=True))
        raise click.exceptions.Exit(code)
    interruptible()
    train(cfg, resume=resume, overwrite=overwrite, verbose=verbose, phases=Phases(from_process_start=True))


def interruptible() -> None:
    """Ctrl-C (SIGINT) ends a run with a checkpoint to resume from, and the web page's Stop sends it. A process started
    in the background of a script (`speedtune train ... &`, or a `speedtune ui` started so) inherits SIGINT ignored,
    which would make both do nothing: the run takes Python's own handler back. Only in the main thread, where signal
    handlers are set."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
