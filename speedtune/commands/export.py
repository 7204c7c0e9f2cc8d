"""`speedtune export RUN`: the flags of `speedtune.exporting.export.export_run`."""

from __future__ import annotations

from pathlib import Path

import click

from speedtune.checks import Choice
from speedtune.exporting import gguf_tools as gt
from speedtune.exporting.export import export_run
from speedtune.training.train import quiet_libraries


@click.command("export")
@click.argument("run", type=click.Path())
@click.option("--merged", type=Choice(["16bit", "4bit"]), help="Also write a merged Hugging Face model.")
@click.option("--gguf", "quants", is_flag=False, flag_value="auto", help="Comma list of GGUF types: f16, bf16, "
              "q8_0, q4_k_m, q5_k_m, ...; auto (or --gguf alone): the smallest that passes the verification "
              "(default: q4_k_m for models of 1B+, q8_0 below).")
@click.option("--ollama", is_flag=True, help="Write an Ollama Modelfile.")
@click.option("--lmstudio", is_flag=True, help="Write LM Studio's publisher/model/file.gguf layout.")
@click.option("--push-to-hub", help="Upload the export to this Hub repo (token from HF_TOKEN).")
@click.option("--output", "-o", help="Output folder (default RUN/export).")
@click.option("--base", help="The 16-bit base model, when the run was trained on a pre-quantised one.")
@click.option("--name", help="Model name for files and Ollama (default: the run folder's name).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def command(run, merged, quants, ollama, lmstudio, push_to_hub, output, base, name, overwrite):
    """Export RUN (a run folder, or a merged folder for GGUF) to merged / GGUF files, verified."""
    quiet_libraries()
    gguf = gt.parse_quants(quants) if quants else None
    export_run(Path(run), Path(output) if output else None, merged=merged, gguf=gguf, ollama=ollama,
               lmstudio=lmstudio, push_to_hub=push_to_hub, overwrite=overwrite, base=base, name=name)
