"""`train()`: the one function that trains (`speedtune train` is speedtune.commands.train). The CLI, the quickstart, the
benchmark, the web page and the Python API all call it.

The order: check what was asked (RunConfig) -> the machine (precision, memory cap) and the backend -> the data,
tokenised with the model's tokenizer before the slow model load, so a bad row fails in seconds -> the plan (how the run
is laid out here, with reasons: speedtune.training.plan) -> the run folder -> the model -> TRL's trainer with
speedtune's step layout (speedtune.training.trainer) -> the run folder's files (speedtune.runs). With `--method
dpo|orpo` the data are preference pairs (speedtune.data.pairs) and the trainer TRL's DPO or ORPO trainer
(speedtune.training.preference)."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import dataclasses

from speedtune import hardware
from speedtune.data import ahead as data_ahead
from speedtune.data.dataset import DataOptions, build, source, split_eval, stop_check
from speedtune.errors import UserError
from speedtune.models import prefetch
from speedtune.models.registry import check_model, resolve_model
from speedtune.runs import RunFolder
from speedtune.training import backends, distributed, plan as plan_mod, preference as pref
from speedtune.training.events import Events
from speedtune.training.runlog import RECORDED, Phases, RunLog, loss_plot, peak_memory_gb


def train(cfg, *, resume: bool = False, overwrite: bool = False, console=None, show_progress: bool = True,
          listeners: tuple = (), verbose: bool = False, phases=None) -> Path:
    """Train one run as `cfg` asks; returns the run folder. `listeners`: plain objects that get the Trainer's
    on_train_begin / on_step_end / on_log / on_train_end events (e.g. a benchmark's timer). Under torchrun or accelerate
    launch every rank runs this; rank 0 alone prints and writes the run folder (speedtune.training.distributed).
    `verbose`: print the plan's reasons under its two-line summary (they are in run_config.yaml either way). `phases`: a
    speedtune.training.runlog.Phases already timing this run (the CLI's, from the process's start)."""
    from rich.console import Console

    ph = phases or Phases()  # metrics.json's `phases`: where the time to a saved adapter goes
    w = distributed.world()
    console = (console or Console(stderr=True)) if w.main else Console(quiet=True)
    asked = cfg.validate().as_dict()
    data_opts = DataOptions(cfg.data, cfg.format, cfg.columns, cfg.template, cfg.train_on, cfg.drop_bad)
    src = source(data_opts)  # a file that can't be read or mapped fails here, before torch and the model load
    local = check_model(cfg.model)  # so does a model that can't be one
    ahead, ahead_why = prefetch.plan(prefetch.local_folder(cfg.model, local), prefetch.available_bytes())
    prefetch.start(ahead)  # the weights come off the disk while the imports run
    preference = cfg.method != "sft"  # dpo or orpo: speedtune.training.preference
    if preference:
        pref.check(cfg)
    allocator = hardware.configure_allocator() if cfg.device != "cpu" else None  # before CUDA starts
    hw = plan_mod.hardware_for(cfg)
    distributed.init(w, hw.device)
    backend = backends.choose(cfg.backend, hw.device)
    side = data_ahead.start(data_opts, cfg.model, cfg.seq_len) if data_ahead.wanted(backend[0]) else None
    backends.prepare(backend[0], cfg)  # Unsloth before transformers; meanwhile the side process tokenises the data
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    quiet_libraries()
    ph.mark("imports")
    model_path = resolve_model(cfg.model)
    built = (side and side.built()) or build(data_opts, AutoTokenizer.from_pretrained(model_path), cfg.seq_len, src=src)
    check_method(cfg, built)
    if built.dropped:
        console.print(f"[yellow]dropped {len(built.dropped)} bad rows[/] (first: {built.dropped[0][0]}: "
                      f"{built.dropped[0][1]}); `speedtune data check` lists them")
    train_ex, eval_ex = split_eval(built.examples, cfg.eval_split, cfg.seed)
    ph.mark("data")
    lengths = sorted(e.length for e in train_ex)
    data = {"method": cfg.method, "format": built.format, "template": built.template.name,
            "eot": built.template.eot, "train_rows": len(train_ex), "eval_rows": len(eval_ex),
            "dropped_rows": len(built.dropped), "tokens": sum(lengths), "length_min": lengths[0],
            "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1]}
    output = distributed.share(plan_mod.output_for(cfg), w)  # the default name has the time in it
    plan = plan_mod.resolve(pref.plan_config(cfg) if preference else cfg, hw, model_path,
                            [e.length for e in train_ex], backend, world_size=w.size, output=output, data=data,
                            allocator=allocator)
    if preference:  # TRL lays out the steps; the plan says so, and where DPO's reference log-probs come from
        plan = dataclasses.replace(plan, reasons=(*plan.reasons, pref.plan_note(cfg),
                                                  pref.reference_note(cfg, plan, len(train_ex))))
    out = Path(plan.output)
    run = RunFolder(out)
    events = Events()
    if w.main:
        run.prepare(resume, overwrite)
    distributed.barrier(w)  # the other ranks wait for the folder
    console.print(plan.summary(), highlight=False)
    if verbose:
        console.print(plan.explain(), markup=False, highlight=False)
    console.print(f"data: {len(train_ex)} train / {len(eval_ex)} eval rows, format {built.format}, template "
                  f"{built.template.name}, end of turn {built.template.eot!r}; run folder {out}")
    if plan.device == "cuda" and cfg.memory_cap_gb:
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_cap_gb / total_gb), w.local_rank)
    if w.main:
        run.write_config(asked, plan.as_dict())  # once, before the model loads

    ph.mark("plan")  # the folder and the printed plan included
    t_load = time.perf_counter()
    model, tokenizer = backends.load(plan, cfg, events)  # Unsloth first: it patches transformers and TRL
    load_s = time.perf_counter() - t_load
    ph.mark("load")
    from speedtune.training import trainer as trainer_mod

    to_ds = lambda xs: Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in xs])  # noqa: E731
    log = RunLog(console, show_progress and w.main, run.train_log if w.main else None)
    if preference:  # TRL's DPO or ORPO trainer on the pairs
        trainer = pref.build(model, tokenizer, plan, cfg, pref.dataset(train_ex, cfg.method),
                             pref.dataset(eval_ex, cfg.method) if eval_ex else None, [log, *listeners],
                             str(run.checkpoints))
    else:
        trainer = trainer_mod.build(model, tokenizer, plan, cfg, to_ds(train_ex), to_ds(eval_ex) if eval_ex else None,
                                    [log, *listeners], str(run.checkpoints), events)
    backends.after_trainer(plan, model)
    actual_ck = trainer_mod.checkpointing_on(model)
    if plan.backend == "peft" and actual_ck != plan.gradient_checkpointing:
        raise RuntimeError(f"gradient checkpointing is {actual_ck} but the plan says {plan.gradient_checkpointing}")
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    checkpoint = distributed.share(str(run.last_checkpoint()) if resume and w.main else None, w)
    ph.mark("trainer")
    t0 = time.perf_counter()
    try:
        trainer_mod.run(trainer, checkpoint)
    except KeyboardInterrupt:
        log.close()
        trainer._save_checkpoint(trainer.model, None)  # transformers' private API, checked against 5.17
        if w.main:
            run.write_events(list(events))
        console.print(f"[yellow]interrupted[/] at step {trainer.state.global_step}: checkpoint saved; continue with "
                      f"speedtune train ... --output {out} --resume")
        raise
    wall = time.perf_counter() - t0
    graphs = trainer.pass_graphs_summary()
    ph.mark("train")
    if graphs and graphs["capture_s"]:  # recorded inside the first steps: booked apart
        ph.move(graphs["capture_s"], "train", "capture")
    if not w.main:
        distributed.finish(w)
        return out

    run.write_events(list(events))  # what ran otherwise than planned (a CUDA-graph recording can fail mid-run)
    run.save_model(model, tokenizer, None if built.template.name in ("model", "text") else built.template.jinja,
                   generation_config(built.template, tokenizer, plan.model_path, console))
    if not log.steps:  # resumed from the finished run's last checkpoint: its losses are in the trainer state
        log.steps = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"),
                      **{k: h[k] for k in RECORDED if k in h}} for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "backend": plan.backend, "device": plan.device_name, "dtype": plan.dtype, "steps": trainer.state.global_step,
        "train_rows": len(train_ex), "eval_rows": len(eval_ex), "dropped_rows": len(built.dropped),
        "wall_s": wall, "load_s": load_s, "prefetch": ahead_why, "tokens_per_s": log.tokens_per_s(),
        "real_tokens": trainer.real_tokens, "padded_tokens": trainer.padded_tokens, "passes": trainer.passes,
        "sum_sq_lengths": trainer.sum_sq_lengths,
        "gradient_checkpointing": actual_ck, "processes": w.size, "step_graphs": graphs,
        "first_loss": log.steps[0]["loss"] if log.steps else None, "last_loss": log.steps[-1]["loss"] if log.steps else None,
        "eval": log.evals, "loss": log.steps, **peak_memory_gb(plan.device), "versions": versions(plan.backend),
    }
    if preference:  # the reward margin's (DPO) or log-odds ratio's (ORPO) first, last and late mean
        metrics.update(method=cfg.method, preference=pref.summary(log.steps))
    if log.steps:
        plot = pref.loss_plot if preference else loss_plot
        plot(log.steps, log.evals, run.loss_plot, f"{Path(cfg.model).name} · {cfg.method} · {plan.backend} · "
                                                  f"{plan.device_name}")
    ph.mark("save")
    metrics["phases"] = ph.as_dict()  # total_s: the time to this folder's adapter
    run.write_metrics(metrics)
    tps = f"{metrics['tokens_per_s']:.0f} tok/s" if metrics["tokens_per_s"] else ""
    console.print(f"[green]done[/]: {trainer.state.global_step} steps in {wall:.0f} s {tps}; loss "
                  f"{metrics['first_loss']} -> {metrics['last_loss']}; run folder {out}")
    for key, seen in metrics.get("preference", {}).items():
        if key in ("rewards/margins", "rewards/accuracies", "log_odds_ratio"):
            console.print(f"  {key}: {seen['first']:.4f} -> {seen['last']:.4f} (mean of the last quarter "
                          f"{seen['last_quarter_mean']:.4f})", highlight=False)
    distributed.finish(w)
    return out


def generation_config(template, tokenizer, model_path: str, console):
    """The base model's generation config, stopping where training ends a turn."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen = GenerationConfig()
    stops, warning = stop_check(template, tokenizer, gen)
    if warning:
        console.print(f"[yellow]note[/]: {warning}")
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    return gen


def check_method(cfg, built) -> None:
    """The data fits the method: chosen/rejected pairs for dpo and orpo, conversations for sft."""
    pairs = getattr(built, "pairs", False)
    if cfg.method == "sft" and pairs:
        raise UserError(f"{cfg.data}: preference data (chosen/rejected pairs); train it with --method dpo or orpo")
    if cfg.method != "sft" and not pairs:
        raise UserError(f"--method {cfg.method} trains on preference pairs, and {cfg.data} has none: give rows with "
                        "'chosen' and 'rejected' answers (and a prompt: 'prompt', 'conversations' or 'messages'), or "
                        "a dataset_info.json entry with ranking: true")


def quiet_libraries() -> None:
    """Our progress bar is the one to watch: silence the per-library bars and advisory warnings."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def versions(backend: str) -> dict:
    names = ["speedtune", "torch", "transformers", "trl", "peft", "datasets", "accelerate"]
    names += ["unsloth", "unsloth_zoo", "bitsandbytes"] if backend == "unsloth" else ["bitsandbytes"]
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out
