"""`speedtune bench`: the flags of `speedtune.benchmarking.runner.run_suite`."""

from __future__ import annotations

import click

from speedtune.benchmarking.runner import run_suite
from speedtune.benchmarking.suite import SHAPES
from speedtune.checks import Choice, Number
from speedtune.commands.options import Finite


@click.command("bench")
@click.argument("suite_file", required=False, type=click.Path(dir_okay=False))
@click.option("--shape", help=f"Model shape: {', '.join(SHAPES)}.")
@click.option("--model", help="A real model (alias or folder) instead of a random shape.")
@click.option("--data", help="A data file to train on, any format speedtune train reads (default: rows drawn from "
              "the suite's length profile).")
@click.option("--eval-data", help="Held-out rows: every run's eval loss on them, curves side by side.")
@click.option("--eval-steps", type=Number(int, 1), help="The held-out loss every N steps (20) and at the end.")
@click.option("--method", type=Choice(["sft", "dpo", "orpo"]), help="sft, or dpo / orpo on preference pairs (--data).")
@click.option("--drop-bad", is_flag=True, default=None, help="Drop bad rows of --data instead of failing.")
@click.option("--lengths", help="A length profile (one token count per line), or 'dense'.")
@click.option("--seq-len", type=Number(int, 16))
@click.option("--batch-size", type=Number(int, 1))
@click.option("--grad-accum", type=Number(int, 1))
@click.option("--steps", type=Number(int, 3), help="Steps per run (60).")
@click.option("--results", help="Folder for the reports (benchmarks/results).")
@click.option("--memory-cap-gb", type=Finite(0.5), help="Cap reserved GPU memory (15 with --precision fp16: the T4 "
              "proxy).")
@click.option("--precision", type=Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--longest", is_flag=True, default=None, help="Search the longest sequence each run trains at.")
@click.option("--max-seq-len", type=Number(int, 512), help="Upper bound of the --longest search (32768).")
@click.option("--profile", is_flag=True, default=None, help="Also on a CPU, profile the last steps of each run "
              "(torch.profiler: device-busy share, kernels per step, top ops; written to the workdir). Always on a "
              "GPU, for the GPU-kernel time per token.")
@click.option("--cold-start", is_flag=True, default=None, help="Drop the model's weight files from the page cache "
              "before each run, so that each reads them from the disk (a first run of the day).")
@click.option("--runs", "only", help="Run only these runs of the suite (comma list of names).")
@click.option("--processes", type=Number(int, 2), help="Also run each run data-parallel on N processes (one per "
              "GPU, under torchrun; on a CPU, gloo) and report the scaling against one.")
@click.option("--resume", is_flag=True, help="Reuse finished results of this suite's other runs from the workdir.")
@click.option("--report-only", is_flag=True, help="Run nothing: write the report from the finished results in the "
              "workdir (runs made in several calls).")
@click.option("--smoke", is_flag=True, help="CPU smoke run on the tiny shape: proves the harness, not the numbers.")
def command(suite_file, smoke, only, resume, processes, report_only, **over):
    """Benchmark speedtune against Unsloth run by its own trainer and vanilla PEFT on one recipe (SUITE_FILE: a YAML
    of the suite's keys; flags override it)."""
    run_suite(suite_file, smoke=smoke, only=[n.strip() for n in only.split(",") if n.strip()] if only else None,
              resume=resume, processes=processes, report_only=report_only, **over)
