"""`speedtune quickstart`: the whole path on the embedded default, offline: SmolLM2-135M-Instruct and the bundled
identity dataset, 60 steps on whatever hardware is here, "Who are you?" asked before and after, then a verified GGUF
export that answers too."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import click
from rich.markup import escape

from speedtune import api, paths
from speedtune.checks import Number
from speedtune.errors import install_hint
from speedtune.runs import RunFolder
from speedtune.training import backends

QUESTION = "Who are you?"


def quickstart(output: Path, max_steps: int = 60, export: bool = True, console=None, backend: str = "auto",
               verbose: bool = False) -> dict:
    """The README's main command, through the Python API (speedtune.api): what a notebook user runs too."""
    from rich.console import Console
    from rich.panel import Panel

    # the chat below imports transformers; where Unsloth trains, it must come first
    unsloth = backend == "unsloth" and backends.import_unsloth_first()
    console = console or Console()
    RunFolder(output).prepare(resume=False, overwrite=False)  # a bad --output fails now, not after the first answer
    greedy = dict(temperature=0, max_new_tokens=40)
    console.rule("[bold]1. the base model")
    before = api.generate("smollm2-135m", QUESTION, **greedy)
    console.print(Panel(before, title=f"before: {QUESTION}", title_align="left"))

    console.rule(f"[bold]2. fine-tune {max_steps} steps on the bundled identity dataset")
    # 56 short rows: 4 rows a step, no accumulation, and a higher learning rate than the 2e-4 default, so 60 steps
    # (about 4 epochs) teach the new identity. 16-bit even on a GPU: a 135M model is too small for a 4-bit base. On a
    # GPU the transformers + PEFT backend with each pass replayed as a CUDA graph (speedtune.training.graphs) unless
    # --backend unsloth, whose import and block compiling cost more than 60 steps save; with Unsloth, padding-free:
    # 60 steps are too few to repay compiling its blocks. The timings behind it: docs/design/training.md.
    t0 = time.perf_counter()
    run = api.train(model="smollm2-135m", data=str(paths.demo_dir() / "identity.jsonl"), output=str(output),
                    batch_size=4, grad_accum=1, lr=5e-4, max_steps=max_steps, save_steps=max_steps,
                    load_in_4bit=False, padding_free=True if unsloth else None,
                    backend="peft" if backend == "auto" and gpu() else backend, console=console, verbose=verbose)
    train_s = time.perf_counter() - t0

    console.rule("[bold]3. the fine-tuned model")
    after = api.generate(run, QUESTION, **greedy)
    console.print(Panel(after, title=f"after: {QUESTION}", title_align="left"))
    result = {"before": before, "after": after, "run": str(run), "train_s": train_s}

    if export and importlib.util.find_spec("llama_cpp"):
        console.rule("[bold]4. export to GGUF (q8_0: a 135M model is too small for 4-bit) and ask llama.cpp")
        report = api.export(run, run.path / "export", gguf=["q8_0"], ollama=True, console=console)
        gguf_file = Path(report["gguf"][0]["file"])
        gguf_answer = api.generate(gguf_file, QUESTION, **greedy)
        console.print(Panel(gguf_answer, title=f"GGUF ({gguf_file.name}): {QUESTION}", title_align="left"))
        g = report["gguf"][0]
        b = g["behaviour"]
        console.print(f"GGUF check: {g['verdict']}; {b['matches']}/{b['prompts']} greedy answers equal to the merged "
                      f"model's, {b['merged_stops'] - len(g['drifted'])}/{b['merged_stops']} end where its answers "
                      f"end (export_report.json has them)", markup=False, style=None if g["quality_ok"] else "bold red")
        result["gguf"], result["gguf_answer"], result["gguf_verdict"] = str(gguf_file), gguf_answer, g["verdict"]
    elif export:
        console.print("[yellow]GGUF export skipped[/]: llama-cpp-python is not installed "
                      f"({escape(install_hint('gguf'))})")
    console.rule("[bold green]done")
    console.print(f"run folder: {run}\nchat with it: speedtune chat {run}")
    return result


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@click.command("quickstart")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Run folder (default: a new runs/quickstart-TIME).")
@click.option("--max-steps", type=Number(int, 1), default=60, show_default=True)
@click.option("--no-export", is_flag=True, help="Stop after training.")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "peft"]), default="auto", show_default=True,
              help="The training backend (auto: transformers + PEFT, with CUDA graphs on a GPU).")
@click.option("--verbose", "-v", is_flag=True, help="Also print why the training plan chose each setting.")
def command(output, max_steps, no_export, backend, verbose):
    """Fine-tune the embedded SmolLM2-135M on a new identity, offline, and show before/after answers."""
    out = Path(output) if output else Path("runs") / time.strftime("quickstart-%Y%m%d-%H%M%S")
    quickstart(out, max_steps, export=not no_export, backend=backend, verbose=verbose)
