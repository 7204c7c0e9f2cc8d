"""`speedtune export RUN`: merged 16-bit (transformers/vLLM), merged 4-bit (bitsandbytes, GPU), GGUF in several quants
at once, each GGUF verified against the merged model, plus Ollama / LM Studio / Jan / GPT4All files.

Everything is written into a temporary folder beside the output and renamed into place at the end: a failure leaves
no partial files, and an existing output is never replaced unless asked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

from speedtune import gguf_tools as gt
from speedtune.errors import UserError
from speedtune.paths import staging

QUALITY_FLOOR = 0.90  # top-1 agreement under this: a loud warning
PROMPT_CHECK = "What is the capital of France? Answer in one word."  # a short answer: it must end on EOS
HELD_OUT = [
    "The water cycle describes how water evaporates from oceans and lakes, condenses into clouds, and falls back to "
    "the ground as rain or snow, where it flows into rivers and returns to the sea. Plants also release water vapour "
    "through their leaves, and some water soaks into the soil and becomes groundwater that can stay underground for "
    "thousands of years before it reaches a spring or a well.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n"
    "        if n % d == 0:\n            return False\n    return True\n",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan, add a chopped onion and cook it "
    "slowly until soft. Stir in two cloves of garlic, then a tin of tomatoes, a pinch of salt and a few basil "
    "leaves. Let it simmer for twenty minutes, stirring now and then, and taste before serving it with pasta.",
    "In 1969 the Apollo 11 mission landed the first people on the Moon. Neil Armstrong and Buzz Aldrin spent about "
    "two and a half hours outside the lunar module, collecting rock samples and setting up experiments, while "
    "Michael Collins orbited above them in the command module.",
]


def _source(path: Path):
    """('run', base spec) for a run folder, ('merged', None) for a merged folder."""
    from speedtune.inference import is_run_folder, run_base_model

    if is_run_folder(path):
        return "run", run_base_model(path)
    if path.is_dir() and (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return "merged", None
    raise UserError(f"{path} is not a run folder of speedtune train (no adapter_config.json) nor a merged model "
                    "folder (config.json + safetensors)")


def _template(path: Path, tokenizer):
    from speedtune.data import templates

    cfg = path / "run_config.yaml"
    name = None
    if cfg.is_file():
        import yaml

        name = ((yaml.safe_load(cfg.read_text()) or {}).get("resolved") or {}).get("template")
    return templates.named(name, tokenizer) if name and name not in ("model", "text") else templates.own(tokenizer)


def default_quants(n_params: int) -> list[str]:
    # measured here: SmolLM2-135M answers garbage at 4 bits; small models keep q8_0
    return ["q4_k_m"] if n_params >= 1e9 else ["q8_0"]


def export_run(source: Path, output: Path | None = None, merged: str | None = None, gguf: list[str] | None = None,
               ollama: bool = False, lmstudio: bool = False, push_to_hub: str | None = None, overwrite: bool = False,
               base: str | None = None, name: str | None = None, console=None) -> dict:
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speedtune import hardware
    from speedtune.models import resolve_model

    console = console or Console(stderr=True)
    source = Path(source).expanduser()
    kind, base_spec = _source(source)
    output = Path(output).expanduser() if output else source / "export"
    name = name or (source.parent.name if source.name in ("export", "merged-16bit") else source.name)
    if merged and kind == "merged":
        raise UserError(f"{source} is merged already; --merged takes a run folder")
    if merged not in (None, "16bit", "4bit"):
        raise UserError(f"--merged: '{merged}' is not 16bit or 4bit")
    hw = hardware.detect()
    if merged == "4bit" and hw.device != "cuda":
        raise UserError("--merged 4bit needs a CUDA GPU (bitsandbytes quantises on the GPU); use --merged 16bit here")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if push_to_hub and not token:
        raise UserError("--push-to-hub needs a token in the HF_TOKEN environment variable (never written to disk)")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output {output} exists and is not empty; pick another folder or pass --overwrite")
    base_dir = None
    if kind == "run":
        try:
            base_dir = resolve_model(base or base_spec)
        except UserError as e:
            raise UserError(f"the adapter's base model '{base or base_spec}' can't be found: {e}") from None
        qcfg = json.loads((base_dir / "config.json").read_text()).get("quantization_config")
        if qcfg and not base:
            raise UserError(f"the base model {base_spec} is pre-quantised ({qcfg.get('quant_method')}); merging into "
                            "dequantised 4-bit weights loses quality. Pass --base with its 16-bit original "
                            "(e.g. unsloth/llama-3-8b for unsloth/llama-3-8b-bnb-4bit)")
    if gguf is not None or not merged:
        gt.check_architecture(base_dir or source)

    report: dict = {"source": str(source), "output": str(output), "gguf": []}
    with staging(output) as work:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:
            tokenizer = AutoTokenizer.from_pretrained(source)
            steps = progress.add_task("merge", total=3)
            if kind == "run":
                progress.update(steps, description=f"merging the adapter into {base_dir.name} (16-bit)")
                from peft import PeftModel

                model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
                save_dtype = getattr(model.config, "dtype", None) or torch.bfloat16
                save_dtype = save_dtype if isinstance(save_dtype, torch.dtype) else getattr(torch, str(save_dtype))
                model = PeftModel.from_pretrained(model, source).merge_and_unload()
                merged_dir = work / "merged-16bit"
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
                save_dtype, merged_dir = None, source
            model.eval()
            n_params = model.num_parameters()
            quants = gguf if gguf is not None else ([] if merged else default_quants(n_params))
            need = (2 * n_params if kind == "run" else 0) + gt.estimate_bytes(n_params, quants)
            free = shutil.disk_usage(output.parent).free
            if free < need * 1.1:
                raise UserError(f"too little disk in {output.parent}: the export needs about {gt.human_size(need)}, "
                                f"{gt.human_size(free)} is free")
            progress.advance(steps)
            if kind == "run":
                progress.update(steps, description="saving the merged model (safetensors)")
                model.to(save_dtype).save_pretrained(merged_dir)
                tokenizer.save_pretrained(merged_dir)
                if (source / "generation_config.json").is_file():
                    shutil.copy2(source / "generation_config.json", merged_dir / "generation_config.json")
                model.float()
            progress.advance(steps)
            if merged == "4bit":
                progress.update(steps, description="quantising the merged model to 4-bit (bitsandbytes nf4)")
                from transformers import BitsAndBytesConfig

                q = AutoModelForCausalLM.from_pretrained(merged_dir, device_map={"": 0}, quantization_config=
                                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
                q.save_pretrained(work / "merged-4bit")
                tokenizer.save_pretrained(work / "merged-4bit")
                del q
            progress.advance(steps)
            if quants:
                report["gguf"] = _gguf(progress, model, tokenizer, merged_dir, work, name, quants)
        template = _template(source, tokenizer)
        files = [work / g["name"] for g in report["gguf"]]
        if files:
            # the Modelfile uses the smallest quant that passed the quality check
            good = [work / g["name"] for g in report["gguf"] if g["quality_ok"]] or files
            preferred = min(good, key=lambda f: f.stat().st_size)
            report["preferred"] = preferred.name
            if ollama:
                from speedtune.deploy import modelfile

                (work / "Modelfile").write_text(modelfile(preferred.name, template))
                report["ollama_create"] = f"cd {output} && ollama create {name} -f Modelfile"
            lm = None
            if lmstudio:
                from speedtune.deploy import lmstudio_layout

                lm = lmstudio_layout(files, work / "lmstudio", "speedtune", f"{name}-GGUF")
                report["lmstudio"] = str(output / lm.relative_to(work))
            from speedtune.deploy import notes

            (work / "README.md").write_text(notes(name, preferred.name, output, ollama,
                                                   output / lm.relative_to(work) if lm else None))
        if kind == "run" and merged != "16bit":
            shutil.rmtree(work / "merged-16bit", ignore_errors=True)
        for g in report["gguf"]:
            g["file"] = str(output / g["name"])
        (work / "export_report.json").write_text(json.dumps(report, indent=2))
    if push_to_hub:
        _push(output, push_to_hub, token, console)
        report["pushed_to"] = push_to_hub
    _print_report(report, console)
    return report


def _gguf(progress, model, tokenizer, merged_dir: Path, work: Path, name: str, quants: list[str]) -> list[dict]:
    direct = [q for q in quants if q in gt.CONVERTER_TYPES]
    kquants = [q for q in quants if q not in gt.CONVERTER_TYPES]
    task = progress.add_task("convert", total=len(direct) + len(kquants) + len(quants) + (1 if kquants and
                                                                                         "f16" not in direct else 0))
    files: dict[str, Path] = {}
    for q in direct:
        progress.update(task, description=f"converting to GGUF {q} (llama.cpp converter)")
        files[q] = gt.convert(merged_dir, work / f"{name}-{q}.gguf", q)
        progress.advance(task)
    if kquants:
        src = files.get("f16")
        if src is None:
            progress.update(task, description="converting to GGUF f16 (intermediate)")
            src = gt.convert(merged_dir, work / f".{name}-f16-intermediate.gguf", "f16")
            progress.advance(task)
        for q in kquants:
            progress.update(task, description=f"quantising to {q} (llama.cpp)")
            files[q] = gt.quantize(src, work / f"{name}-{q}.gguf", q)
            progress.advance(task)
        if "f16" not in files:
            src.unlink()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is a GGUF file?"},
                                            {"role": "assistant", "content": "A GGUF file holds a model's weights and "
                                             "tokenizer in one file that llama.cpp can load."}], tokenize=False)] + HELD_OUT
    out = []
    for q in quants:
        path = files[q]
        progress.update(task, description=f"verifying {path.name}")
        entry = {"quant": q, "name": path.name, "size_bytes": path.stat().st_size, "metadata": gt.metadata(path)}
        entry["metadata"].pop("chat_template", None)
        entry.update(gt.logit_agreement(model, tokenizer, path, texts))
        entry["chat"] = gt.chat_check(path, PROMPT_CHECK, max_tokens=128)
        entry["loads"] = True
        entry["quality_ok"] = entry["top1_agreement"] >= QUALITY_FLOOR
        out.append(entry)
        progress.advance(task)
    return out


def _push(folder: Path, repo: str, token: str, console) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
    except Exception as e:
        raise UserError(f"--push-to-hub {repo}: the upload failed ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:160]}); the export is complete in {folder}") from None
    console.print(f"pushed to https://huggingface.co/{repo}")


def _print_report(report: dict, console) -> None:
    from rich.table import Table

    if report["gguf"]:
        t = Table(title="GGUF verification (against the merged model)")
        for col in ("file", "size", "top-1", "mean KL", "stops", "answer"):
            t.add_column(col, no_wrap=col != "answer", overflow="fold")
        t.caption = f"answer: to '{PROMPT_CHECK}', greedy, in llama.cpp"
        for g in report["gguf"]:
            ok = "[green]" if g["quality_ok"] else "[bold red]"
            t.add_row(g["name"], gt.human_size(g["size_bytes"]), f"{ok}{g['top1_agreement']:.1%}", f"{g['mean_kl']:.4f}",
                      "yes" if g["chat"]["stops_on_eos"] else "[red]NO", g["chat"]["answer"][:80])
        console.print(t)
        for g in report["gguf"]:
            if not g["quality_ok"]:
                console.print(f"[bold red]WARNING[/]: {g['name']} agrees with the merged model on only "
                              f"{g['top1_agreement']:.0%} of next tokens: this quant is too lossy for this model; "
                              "use q8_0 or f16")
    if report.get("ollama_create"):
        console.print(f"Ollama: {report['ollama_create']}")
    console.print(f"[green]exported[/] to {report['output']}")


@click.command("export")
@click.argument("run", type=click.Path())
@click.option("--merged", type=click.Choice(["16bit", "4bit"]), help="Also write a merged Hugging Face model.")
@click.option("--gguf", "quants", help="Comma list of GGUF types: f16, bf16, q8_0, q4_k_m, q5_k_m, ... "
              "(default: q4_k_m for models of 1B+, q8_0 below).")
@click.option("--ollama", is_flag=True, help="Write an Ollama Modelfile.")
@click.option("--lmstudio", is_flag=True, help="Write LM Studio's publisher/model/file.gguf layout.")
@click.option("--push-to-hub", help="Upload the export to this Hub repo (token from HF_TOKEN).")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder (default RUN/export).")
@click.option("--base", help="The 16-bit base model, when the run was trained on a pre-quantised one.")
@click.option("--name", help="Model name for files and Ollama (default: the run folder's name).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def command(run, merged, quants, ollama, lmstudio, push_to_hub, output, base, name, overwrite):
    """Export RUN (a run folder, or a merged folder for GGUF) to merged / GGUF files, verified."""
    from speedtune.train import quiet_libraries

    quiet_libraries()
    gguf = gt.parse_quants(quants) if quants else None
    export_run(Path(run), Path(output) if output else None, merged, gguf, ollama, lmstudio, push_to_hub, overwrite,
               base, name)
