"""`speedtune train`: LoRA/QLoRA fine-tuning with TRL's SFTTrainer, through the backend chosen in one place.

The run folder holds the adapter in PEFT format, the tokenizer (with the chat template used in training), the
generation config (stopping where training ends turns), `run_config.yaml`, `metrics.json`, `loss.png`, and
`checkpoints/` for `--resume`."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import click

from speedtune import config as config_mod
from speedtune.data.cli import data_options
from speedtune.errors import UserError


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: a crash or kill while one was being written leaves a folder without
    trainer_state.json, which is skipped (and removed, since training will write that step again)."""
    found = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    for p in found:
        if p not in complete and (not complete or int(p.name.split("-")[-1]) > int(complete[-1].name.split("-")[-1])):
            shutil.rmtree(p, ignore_errors=True)
    return complete[-1] if complete else None


def prepare_output(cfg, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.output).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    busy = out.is_dir() and any(out.iterdir())
    if resume:
        if last_checkpoint(out) is None:
            raise UserError(f"--resume: {out} has no checkpoint to resume from (checkpoints/checkpoint-N)")
    elif busy and not overwrite:
        raise UserError(f"--output {out} exists and is not empty; pick another folder, --resume it, or --overwrite")
    elif busy:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def apply_hardware_options(cfg, hw):
    """--precision and --memory-cap-gb: the same code path on a big GPU made to behave like a small one."""
    import dataclasses

    if cfg.precision != "auto":
        names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        hw = dataclasses.replace(hw, dtype=names[cfg.precision], why=f"--precision {cfg.precision}")
    if cfg.memory_cap_gb and hw.device == "cuda":
        import torch

        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_cap_gb / hw.memory_gb))
        hw = dataclasses.replace(hw, memory_gb=min(hw.memory_gb, cfg.memory_cap_gb))
    return hw


def apply_fit(cfg, hw, console=None, backend: str = "unsloth") -> dict | None:
    """On a GPU, choose micro-batch x accumulation and checkpointing for the recipe (speedtune.fit)."""
    from speedtune import fit

    if hw.device != "cuda":
        return None
    mode = cfg.fit
    if mode == "auto" and cfg.gradient_checkpointing is not None:
        mode = "off"  # the user decided checkpointing: keep their batch too
    note = None
    if mode == "auto" and backend != "unsloth":
        mode, note = "off", ("the PEFT backend runs the recipe as given: the fit's memory model is calibrated on "
                             "Unsloth's kernels (pip install 'speedtune[gpu]')")
    effective = cfg.batch_size * cfg.grad_accum
    p = fit.plan("speed" if mode == "auto" else mode, cfg.model_path, effective, cfg.batch_size, cfg.seq_len,
                 cfg.lora_r, bool(cfg.load_in_4bit), hw.memory_gb, 2 if hw.dtype != "float32" else 4)
    if note:
        p.reasons = [note]
    elif backend == "unsloth":
        p.reasons.append("Unsloth keeps its fused LoRA kernels, chunked cross-entropy, padding-free batching and "
                         "per-block torch.compile")
    cfg.batch_size, cfg.grad_accum = p.micro_batch, p.grad_accum
    if cfg.gradient_checkpointing is None or mode != "off":
        cfg.gradient_checkpointing = p.gradient_checkpointing
    if cfg.offload_embeddings is None:
        cfg.offload_embeddings = p.offload_embeddings
    if cfg.loss_chunk_gb is None:
        cfg.loss_chunk_gb = p.loss_chunk_gb
    if console:
        console.print(f"fit ({p.mode}): micro-batch {p.micro_batch} x accumulation {p.grad_accum}, gradient "
                      f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
                      + (", input embeddings in CPU memory" if cfg.offload_embeddings else "")
                      + f", ~{p.estimated_gb:.1f} GB; "
                      + "; ".join(p.reasons))
    return p.as_dict()


def resolve_defaults(cfg, hw) -> None:
    if cfg.load_in_4bit is None:
        cfg.load_in_4bit = hw.device == "cuda"
    if cfg.load_in_4bit and hw.device != "cuda":
        raise UserError("--4bit needs a CUDA GPU (bitsandbytes); on a CPU train with --no-4bit")
    if cfg.optim is None:
        cfg.optim = "adamw_8bit" if hw.device == "cuda" else "adamw_torch"
    if cfg.gradient_checkpointing is None:  # the fit decides on a GPU; this is the default elsewhere
        cfg.gradient_checkpointing = hw.device == "cuda"


def train(cfg, resume: bool = False, overwrite: bool = False, console=None, show_progress: bool = True) -> Path:
    """Train one run; returns the run folder."""
    from rich.console import Console

    from speedtune import backends, hardware
    from speedtune.models import resolve_model

    console = console or Console(stderr=True)
    quiet_libraries()
    cfg.validate()
    hw = apply_hardware_options(cfg, hardware.detect(None if cfg.device == "auto" else cfg.device))
    backend, why = backends.choose(cfg.backend, hw.device)
    cfg.model_path = str(resolve_model(cfg.model))
    out = prepare_output(cfg, resume, overwrite)
    if cfg.load_in_4bit is None:
        cfg.load_in_4bit = hw.device == "cuda"
    fitted = apply_fit(cfg, hw, console, backend)
    resolve_defaults(cfg, hw)
    console.print(f"backend [bold]{backend}[/] ({why}); {hw.device} {hw.name}; precision [bold]{hw.dtype}[/] "
                  f"({hw.why}); 4-bit {'on' if cfg.load_in_4bit else 'off'}")
    t_load = time.perf_counter()
    model, tokenizer = backends.load(backend, cfg, hw)  # unsloth first: it patches transformers and TRL
    load_s = time.perf_counter() - t_load
    return _run(cfg, hw, backend, why, model, tokenizer, out, resume, console, show_progress, load_s, fitted)


def _run(cfg, hw, backend, why, model, tokenizer, out, resume, console, show_progress, load_s, fitted):
    import torch
    from datasets import Dataset
    from transformers import GenerationConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from speedtune.data.dataset import DataOptions, build, split_eval, stop_check
    from speedtune.runlog import RunLog, loss_plot, peak_memory_gb, write_json

    built = build(DataOptions(cfg.data, cfg.format, cfg.columns, cfg.template, cfg.train_on, cfg.drop_bad),
                  tokenizer, cfg.seq_len)
    if built.dropped:
        console.print(f"[yellow]dropped {len(built.dropped)} bad rows[/] (first: {built.dropped[0][0]}: "
                      f"{built.dropped[0][1]}); `speedtune data check` lists them")
    train_ex, eval_ex = split_eval(built.examples, cfg.eval_split, cfg.seed)
    to_ds = lambda xs: Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in xs])  # noqa: E731
    console.print(f"data: {len(train_ex)} train / {len(eval_ex)} eval rows, format {built.format}, template "
                  f"{built.template.name}, end of turn {built.template.eot!r}")
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps if cfg.max_steps else -1, num_train_epochs=cfg.epochs or 1, seed=cfg.seed,
        optim=cfg.optim, bf16=hw.dtype == "bfloat16", fp16=hw.dtype == "float16", use_cpu=hw.device == "cpu",
        logging_steps=1, save_steps=cfg.save_steps, save_total_limit=2, report_to=cfg.report_to,
        max_length=cfg.seq_len, packing=False, disable_tqdm=True, gradient_checkpointing=False,
        eval_strategy="steps" if eval_ex else "no", eval_steps=cfg.eval_steps, per_device_eval_batch_size=cfg.batch_size,
        dataloader_num_workers=0, dataset_num_proc=None, save_only_model=False, log_level="warning")
    log = RunLog(console, show_progress)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_ds(train_ex),
                         eval_dataset=to_ds(eval_ex) if eval_ex else None, processing_class=tokenizer, callbacks=[log])
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss; no dict per step
    from speedtune.backends import after_trainer

    after_trainer(backend, model, hw)
    if hw.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(last_checkpoint(out)) if resume else None)
    except KeyboardInterrupt:
        log.close()
        trainer._save_checkpoint(trainer.model, None)
        console.print(f"[yellow]interrupted[/] at step {trainer.state.global_step}: checkpoint saved; continue with "
                      f"speedtune train ... --output {out} --resume")
        raise
    wall = time.perf_counter() - t0

    # the run folder: adapter, tokenizer + template, generation config, config, metrics, loss curve
    model.save_pretrained(out)
    if built.template.name not in ("model", "text"):
        tokenizer.chat_template = built.template.jinja
    tokenizer.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(cfg.model_path)
    except OSError:
        gen = GenerationConfig()
    stops, warning = stop_check(built.template, tokenizer, gen)
    if warning:
        console.print(f"[yellow]note[/]: {warning}")
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    gen.save_pretrained(out)
    cfg.resolved = {"backend": backend, "backend_why": why, "device": hw.device, "device_name": hw.name,
                    "dtype": hw.dtype, "dtype_why": hw.why, "template": built.template.name, "eot": built.template.eot,
                    "fit": fitted, "padding_free": bool(getattr(trainer.args, "padding_free", False))}
    cfg.save(out / "run_config.yaml")
    metrics = {
        "backend": backend, "device": hw.name, "dtype": hw.dtype, "steps": trainer.state.global_step,
        "train_rows": len(train_ex), "eval_rows": len(eval_ex), "dropped_rows": len(built.dropped),
        "wall_s": wall, "load_s": load_s,
        "tokens_per_s": log.tokens_per_s(built.tokens / len(built.examples) * cfg.batch_size * cfg.grad_accum),
        "first_loss": log.steps[0]["loss"] if log.steps else None, "last_loss": log.steps[-1]["loss"] if log.steps else None,
        "eval": log.evals, "loss": log.steps, **peak_memory_gb(hw.device), "versions": versions(backend),
    }
    write_json(out / "metrics.json", metrics)
    if log.steps:
        loss_plot(log.steps, log.evals, out / "loss.png", f"{Path(cfg.model).name} · {backend} · {hw.name}")
    tps = f"{metrics['tokens_per_s']:.0f} tok/s" if metrics["tokens_per_s"] else ""
    console.print(f"[green]done[/]: {trainer.state.global_step} steps in {wall:.0f} s {tps}; loss "
                  f"{metrics['first_loss']} -> {metrics['last_loss']}; run folder {out}")
    return out


def quiet_libraries() -> None:
    """Our progress bar is the one to watch: silence the per-library bars and advisory warnings."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def versions(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ["speedtune", "torch", "transformers", "trl", "peft", "datasets", "accelerate"]
    names += ["unsloth", "unsloth_zoo", "bitsandbytes"] if backend == "unsloth" else ["bitsandbytes"]
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def train_options(f):
    opts = [
        click.option("--model", "-m", help="Alias, local folder or hub id (default smollm2-135m)."),
        click.option("--data", "-d", help="Data file, folder, hub dataset or dataset_info.json:name."),
        click.option("--output", "-o", help="Run folder to write."),
        click.option("--seq-len", type=int), click.option("--eval-split", type=float, help="Fraction held out."),
        click.option("--eval-steps", type=int),
        click.option("--lora-r", type=int, help="LoRA rank (16)."), click.option("--lora-alpha", type=int),
        click.option("--lora-dropout", type=float),
        click.option("--target-modules", help="all-linear (default) or a comma list, e.g. q_proj,v_proj."),
        click.option("--rslora/--no-rslora", default=None),
        click.option("--4bit/--no-4bit", "load_in_4bit", default=None, help="QLoRA 4-bit base (default: on a GPU)."),
        click.option("--batch-size", type=int), click.option("--grad-accum", type=int),
        click.option("--lr", type=float, help="Learning rate (2e-4)."),
        click.option("--scheduler"), click.option("--warmup-steps", type=int), click.option("--weight-decay", type=float),
        click.option("--max-steps", type=int, help="Optimizer steps (60)."),
        click.option("--epochs", type=float, help="Train for epochs instead of --max-steps."),
        click.option("--seed", type=int), click.option("--optim", help="Default adamw_8bit on a GPU, adamw_torch on a CPU."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None),
        click.option("--offload-embeddings/--no-offload-embeddings", default=None,
                     help="Keep the input embedding table in CPU memory (default: only under --fit memory)."),
        click.option("--loss-chunk-gb", type=float,
                     help="Unsloth's chunked loss may use at most this much GPU memory (default: its own, up to 4)."),
        click.option("--save-steps", type=int, help="Checkpoint every N steps (for --resume)."),
        click.option("--fit", help="auto (default: micro-batch and checkpointing chosen for the GPU), off, memory."),
        click.option("--memory-cap-gb", type=float, help="Use at most this much GPU memory (e.g. 15: a T4 profile)."),
        click.option("--precision", help="auto (from the hardware), bf16, fp16 or fp32."),
        click.option("--report-to"), click.option("--backend"), click.option("--device"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command("train")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@train_options
@data_options
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
def command(config_file, resume, overwrite, fmt, **flags):
    """Fine-tune with LoRA. CONFIG_FILE is an optional YAML of flag names; flags override it."""
    flags["format"] = fmt
    if not flags.get("drop_bad"):
        flags["drop_bad"] = None
    if flags.get("train_on") == "responses":
        flags["train_on"] = None  # the default: let the YAML decide
    if resume and not config_file and flags.get("output"):
        saved = Path(flags["output"]) / "run_config.yaml"
        partial = Path(flags["output"]) / "checkpoints"
        if saved.is_file() and not partial.is_dir():
            config_file = str(saved)
    cfg = config_mod.load(config_file, flags)
    if cfg.epochs and flags.get("max_steps") is None:
        cfg.max_steps = None
    os.environ.setdefault("WANDB_SILENT", "true")
    train(cfg, resume=resume, overwrite=overwrite)
