"""Exporting a run (`speedtune export`, speedtune.commands.export): merged 16-bit (transformers/vLLM), merged 4-bit
(bitsandbytes, GPU), GGUF in several quants at once, each GGUF verified against the merged model, plus Ollama / LM
Studio / Jan / GPT4All files.

Everything is checked before anything heavy starts, then written into a temporary folder beside the output and renamed
into place at the end: a failure leaves no partial files, and an existing output is never replaced unless asked.
`export_run` goes in five steps, one function each, by what they write: the merged model for the converter
(`_write_merged`), the GGUF files (`speedtune.exporting.gguf`), the merged 16/4-bit folders asked for (`_write_16bit`),
the deploy files (`_write_deploy`), the report (`_write_report`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from speedtune import hardware
from speedtune.exporting import gguf_tools as gt
from speedtune.errors import UserError
from speedtune.exporting.behaviour import run_template
from speedtune.exporting.deploy import lmstudio_layout, modelfile, notes, tools_gap
from speedtune.exporting.gguf import print_report, write_gguf
from speedtune.inference.loader import check_run_folder, is_run_folder, run_base_model
from speedtune.models.registry import resolve_model
from speedtune.paths import staging


def _source(path: Path):
    """('run', base spec) for a run folder, ('merged', None) for a merged folder."""
    if is_run_folder(path):
        check_run_folder(path)
        return "run", run_base_model(path)
    if path.is_file():
        raise UserError(f"{path} is a file; export takes a run folder of speedtune train (or a merged model folder)")
    if path.is_dir() and (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return "merged", None
    raise UserError(f"{path} is not a run folder of speedtune train (no adapter_config.json) nor a merged model "
                    "folder (config.json + safetensors)")


def default_quants(n_params: int) -> list[str]:
    # measured here: SmolLM2-135M answers garbage at 4 bits; small models keep q8_0
    return ["q4_k_m"] if n_params >= 1e9 else ["q8_0"]


@dataclass
class ExportPlan:
    """What an export was asked for, resolved and checked before anything is written."""

    source: Path
    kind: str  # "run" or "merged"
    base_dir: Path | None
    output: Path
    name: str
    merged: str | None
    gguf: list[str] | None
    ollama: bool
    lmstudio: bool
    push_to_hub: str | None
    token: str | None


def plan_export(source: Path, output: Path | None, *, merged: str | None, gguf: list[str] | None, ollama: bool,
                lmstudio: bool, push_to_hub: str | None, overwrite: bool, base: str | None,
                name: str | None) -> ExportPlan:
    source = Path(source).expanduser()
    if not source.exists():
        raise UserError(f"{source}: no such run folder")
    kind, base_spec = _source(source)
    output = Path(output).expanduser() if output else source / "export"
    name = name or (source.parent.name if source.name in ("export", "merged-16bit") else source.name)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"--name {name!r}: a model name is a plain file name (no slashes, not starting with a dot)")
    if merged and kind == "merged":
        raise UserError(f"{source} is merged already; --merged takes a run folder")
    if merged not in (None, "16bit", "4bit"):
        raise UserError(f"--merged: '{merged}' is not 16bit or 4bit")
    if merged == "4bit" and hardware.detect().device != "cuda":
        raise UserError("--merged 4bit needs a CUDA GPU (bitsandbytes quantises on the GPU); use --merged 16bit here")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if push_to_hub and not token:
        raise UserError("--push-to-hub needs a token in the HF_TOKEN environment variable (never written to disk)")
    check_output(output, overwrite)
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
    return ExportPlan(source, kind, base_dir, output, name, merged, gguf, ollama, lmstudio, push_to_hub, token)


def check_output(output: Path, overwrite: bool) -> None:
    """The output folder can be written (tried, not guessed: root ignores permission bits) and holds nothing that
    would be lost."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output {output} exists and is not empty; pick another folder or pass --overwrite")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output {output}: {parent} is a file, so no folder can be made under it")
    try:
        tempfile.TemporaryDirectory(prefix=".speedtune-write-check-", dir=parent).cleanup()
    except OSError as e:
        raise UserError(f"--output {output}: can't write in {parent} ({e.strerror}); pick a folder you can write "
                        "to") from None


def export_run(source: Path, output: Path | None = None, *, merged: str | None = None, gguf: list[str] | None = None,
               ollama: bool = False, lmstudio: bool = False, push_to_hub: str | None = None, overwrite: bool = False,
               base: str | None = None, name: str | None = None, console=None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    plan = plan_export(source, output, merged=merged, gguf=gguf, ollama=ollama, lmstudio=lmstudio,
                       push_to_hub=push_to_hub, overwrite=overwrite, base=base, name=name)
    report: dict = {"source": str(plan.source), "output": str(plan.output), "gguf": []}
    with staging(plan.output) as work:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:
            model, tokenizer, merged_dir, quants = _write_merged(plan, work, progress)
            if quants:
                report["gguf"], rejected = write_gguf(progress, model, tokenizer, merged_dir, work, plan.name, quants,
                                                      plan.source, plan.kind == "run")
                if quants == ["auto"]:
                    report["auto"] = {"picked": report["gguf"][0]["quant"], "rejected": rejected}
            _write_16bit(plan, work, model, tokenizer, progress)
        _write_deploy(plan, work, report, tokenizer)
        _write_report(plan, work, report)
    if plan.push_to_hub:
        _push(plan.output, plan.push_to_hub, plan.token, console)
        report["pushed_to"] = plan.push_to_hub
    print_report(report, console)
    return report


def _write_merged(plan: ExportPlan, work: Path, progress):
    """The merged model, in memory in fp32 for verification and, for the GGUF converter, saved in f16 (`.merged-f16`:
    8 times finer steps than bf16, so the f16 GGUF stays next to the fp32 merge). Returns (model, tokenizer, the folder
    the GGUFs are converted from, the GGUF quants to write)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.source)
    steps = progress.add_task("merge", total=2)
    if plan.kind == "run":
        progress.update(steps, description=f"merging the adapter into {plan.base_dir.name}")
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, plan.source).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(plan.source, dtype=torch.float32)
    model.eval()
    n_params = model.num_parameters()
    quants = plan.gguf if plan.gguf is not None else ([] if plan.merged else default_quants(n_params))
    need = (2 * n_params if plan.kind == "run" and quants else 0) + (2 * n_params if plan.merged else 0)
    need += gt.estimate_bytes(n_params, quants)
    free = shutil.disk_usage(plan.output.parent).free
    if free < need * 1.1:
        raise UserError(f"too little disk in {plan.output.parent}: the export needs about {gt.human_size(need)}, "
                        f"{gt.human_size(free)} is free")
    progress.advance(steps)
    merged_dir = plan.source
    if plan.kind == "run" and quants:
        progress.update(steps, description="saving the merged model for the GGUF converter (f16 safetensors)")
        merged_dir = _save(plan, model, tokenizer, work / ".merged-f16", torch.float16)
    progress.advance(steps)
    return model, tokenizer, merged_dir, quants


def _save(plan: ExportPlan, model, tokenizer, folder: Path, dtype) -> Path:
    """The merged model in `dtype` with the run's tokenizer and generation config; the model in memory goes back to
    fp32 (rounded to `dtype`: f16 rounding moves its logits by a KL of about 1e-5)."""
    model.to(dtype).save_pretrained(folder)
    model.float()
    tokenizer.save_pretrained(folder)
    if (plan.source / "generation_config.json").is_file():
        shutil.copy2(plan.source / "generation_config.json", folder / "generation_config.json")
    return folder


def _write_16bit(plan: ExportPlan, work: Path, model, tokenizer, progress) -> None:
    """merged-16bit/ (and merged-4bit/ from it) when asked: in the dtype the base ships in (bf16 unless it is f16),
    written after the GGUFs were verified because the bf16 rounding stays in the model in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    if plan.kind != "run" or not plan.merged:
        return
    steps = progress.add_task("saving the merged model (16-bit safetensors)", total=1)
    cfg = json.loads((plan.base_dir / "config.json").read_text())
    _save(plan, model, tokenizer, work / "merged-16bit",
          torch.float16 if (cfg.get("dtype") or cfg.get("torch_dtype")) == "float16" else torch.bfloat16)
    if plan.merged == "4bit":
        progress.update(steps, description="quantising the merged model to 4-bit (bitsandbytes nf4)")
        from transformers import BitsAndBytesConfig

        q = AutoModelForCausalLM.from_pretrained(work / "merged-16bit", device_map={"": 0}, quantization_config=
                                                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
        q.save_pretrained(work / "merged-4bit")
        tokenizer.save_pretrained(work / "merged-4bit")
        del q
    progress.advance(steps)


def _write_deploy(plan: ExportPlan, work: Path, report: dict, tokenizer) -> None:
    """Modelfile (Ollama), the LM Studio layout and README.md, for the GGUF files written."""
    files = [work / g["name"] for g in report["gguf"]]
    if not files:
        return
    # the Modelfile uses the smallest quant that passed the quality check
    good = [work / g["name"] for g in report["gguf"] if g["quality_ok"]] or files
    preferred = min(good, key=lambda f: f.stat().st_size)
    report["preferred"] = preferred.name
    if plan.ollama:
        template = run_template(plan.source, tokenizer)
        (work / "Modelfile").write_text(modelfile(preferred.name, template))
        report["ollama_tools"] = tools_gap(template, tokenizer)
        report["ollama_create"] = f"cd {plan.output} && ollama create {plan.name} -f Modelfile"
    lm = None
    if plan.lmstudio:
        lm = lmstudio_layout(files, work / "lmstudio", "speedtune", f"{plan.name}-GGUF")
        report["lmstudio"] = str(plan.output / lm.relative_to(work))
    (work / "README.md").write_text(notes(plan.name, preferred.name, plan.output, plan.ollama,
                                          plan.output / lm.relative_to(work) if lm else None))


def _write_report(plan: ExportPlan, work: Path, report: dict) -> None:
    """export_report.json; the merged folder goes unless --merged 16bit asked to keep it."""
    shutil.rmtree(work / ".merged-f16", ignore_errors=True)
    if plan.kind == "run" and plan.merged != "16bit":
        shutil.rmtree(work / "merged-16bit", ignore_errors=True)
    for g in report["gguf"]:
        g["file"] = str(plan.output / g["name"])
    if (work / "quantize.log").is_file():
        report["log"] = str(plan.output / "quantize.log")
    (work / "export_report.json").write_text(json.dumps(report, indent=2))


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
