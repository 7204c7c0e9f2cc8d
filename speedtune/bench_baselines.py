"""The baselines run by their own libraries, in their own process: nothing of speedtune's trainer, collator or model
loading. `unsloth-tutorial` is Unsloth's tutorial code as users copy it (FastLanguageModel.from_pretrained, its
get_peft_model with use_gradient_checkpointing="unsloth", TRL's SFTTrainer with Unsloth's patches and its own
collator, 2 x 4, `padding_free` left for Unsloth to choose, 8-bit AdamW, lr 2e-4, 5 warm-up steps, linear decay);
`unsloth-tuned` is the same code with the run's batch size, accumulation, checkpointing and padding_free;
`trl` is TRL's SFTTrainer over transformers + PEFT (no Unsloth; it runs on a CPU).

They train the rows the `speedtune train` runs train, in the same order: speedtune's data path tokenised them once
(speedtune.bench_data), and the dataset given to SFTTrainer is those token ids with the trained positions as
`assistant_masks` (both TRL and Unsloth turn them into labels, and neither re-tokenises a tokenised dataset). The
Trainer draws each step's rows from a permutation seeded by the seed, whatever the micro-batch size, so 2 x 4 here
and one batch of 8 in speedtune's trainer are the same 8 rows. The timing and the result fields are the harness's
(speedtune.bench_timing). Unsloth and TRL are imported only here, Unsloth first (its patches)."""

from __future__ import annotations

import sys
from pathlib import Path

from speedtune.backends.lora import LORA_TARGETS
from speedtune.errors import UserError

# Unsloth's tutorial notebooks (Llama-3 Alpaca), the values users copy
TUTORIAL = dict(batch_size=2, grad_accum=4, gradient_checkpointing="unsloth", padding_free=None, optim="adamw_8bit",
                lr=2e-4, warmup_steps=5, scheduler="linear", weight_decay=0.01, lora_dropout=0.0)
TUNABLE = ("batch_size", "grad_accum", "gradient_checkpointing", "padding_free", "optim")
FIXED_ON_ALL = ("seed",)  # also allowed on the tutorial run: the reference's seed repeats


def recipe(kind: str, suite: dict, run: dict, cuda: bool) -> dict:
    """The baseline's settings: the tutorial's, the suite's recipe (rows per step, LoRA rank, steps, sequence length,
    precision) and, for the tuned runs, the run's own. A pure function (tested without Unsloth)."""
    own = {k: v for k, v in run.items() if k not in ("name", "kind", "label", "env", "repeat_of")}
    allowed = FIXED_ON_ALL + (TUNABLE if kind != "unsloth-tutorial" else ())
    bad = [k for k in own if k not in allowed]
    if bad:
        hint = "; use kind unsloth-tuned to change them" if kind == "unsloth-tutorial" else ""
        raise UserError(f"run {run['name']} ({kind}): can't set {', '.join(bad)} (it takes {', '.join(allowed)}){hint}")
    r = {**TUTORIAL, "batch_size": suite["batch_size"], "grad_accum": suite["grad_accum"]}
    if kind == "trl":
        r.update(gradient_checkpointing=False, optim="adamw_8bit" if cuda else "adamw_torch")
    if suite.get("optim") and kind != "unsloth-tutorial":
        r["optim"] = suite["optim"]
    r.update(own)
    rows = suite["batch_size"] * suite["grad_accum"]
    if r["batch_size"] * r["grad_accum"] != rows:
        raise UserError(f"run {run['name']}: {r['batch_size']} x {r['grad_accum']} rows a step, the suite's recipe is "
                        f"{rows}; a baseline trains the same rows per step")
    ck = r["gradient_checkpointing"]
    if ck not in (True, False, "unsloth") or (kind == "trl" and ck == "unsloth"):
        raise UserError(f"run {run['name']}: gradient_checkpointing must be true, false" +
                        (' or "unsloth"' if kind != "trl" else "") + f" (got {ck!r})")
    precision = suite.get("precision", "auto")
    if not cuda:
        precision = "fp32"
    r.update(seed=int(run.get("seed", suite.get("seed", 3407))), precision=precision, kind=kind)
    return r


def trainer_arguments(r: dict, suite: dict, output: str, cuda: bool, bf16_ok: bool) -> dict:
    """SFTConfig's arguments for a recipe (see `recipe`): bf16 where the GPU has it, else fp16 (the tutorial's
    `is_bfloat16_supported()`), unless the suite asks for a precision. `padding_free` is passed only when the run sets
    it, and `gradient_checkpointing` only for TRL (Unsloth takes it from get_peft_model and keeps TRL's default config
    value from turning it back on)."""
    p = r["precision"]
    half = None if p == "fp32" or not cuda else "bf16" if p == "bf16" or (p == "auto" and bf16_ok) else "fp16"
    args = dict(per_device_train_batch_size=r["batch_size"], gradient_accumulation_steps=r["grad_accum"],
                warmup_steps=r["warmup_steps"], max_steps=suite["steps"], learning_rate=r["lr"], logging_steps=1,
                optim=r["optim"], weight_decay=r["weight_decay"], lr_scheduler_type=r["scheduler"], seed=r["seed"],
                output_dir=str(Path(output) / "checkpoints"), report_to="none", max_length=suite["seq_len"],
                packing=False, save_strategy="no", bf16=half == "bf16", fp16=half == "fp16", use_cpu=not cuda,
                disable_tqdm=True)
    if r["padding_free"] is not None:
        args["padding_free"] = bool(r["padding_free"])
    if r["kind"] == "trl":
        args["gradient_checkpointing"] = bool(r["gradient_checkpointing"])
    return args


def lora_arguments(r: dict, suite: dict) -> dict:
    """The adapters, as the tutorial sets them (Unsloth's get_peft_model; PEFT's LoraConfig takes the same)."""
    return dict(r=suite["lora_r"], lora_alpha=suite["lora_alpha"], lora_dropout=r["lora_dropout"], bias="none",
                target_modules=list(LORA_TARGETS))


def load_unsloth(r: dict, suite: dict, model_path: str):
    from unsloth import FastLanguageModel

    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(r["precision"])  # None: Unsloth's own choice
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_path, max_seq_length=suite["seq_len"],
                                                         dtype=dtype, load_in_4bit=suite["load_in_4bit"])
    model = FastLanguageModel.get_peft_model(model, **lora_arguments(r, suite), random_state=r["seed"],
                                             use_gradient_checkpointing=r["gradient_checkpointing"], use_rslora=False,
                                             loftq_config=None)
    return model, tokenizer


def load_peft(r: dict, suite: dict, model_path: str, cuda: bool):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed

    p = r["precision"]
    dtype = torch.float32 if p == "fp32" or not cuda else torch.float16 if p == "fp16" or (
        p == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    kwargs = {"dtype": dtype}
    if cuda:
        kwargs["device_map"] = {"": 0}
        if suite["load_in_4bit"]:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_use_double_quant=True,
                                                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if cuda and suite["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(r["gradient_checkpointing"]))
    set_seed(r["seed"])  # LoRA's A matrices: the same init as speedtune's PEFT backend for the same seed
    return get_peft_model(model, LoraConfig(**lora_arguments(r, suite), task_type="CAUSAL_LM")), \
        AutoTokenizer.from_pretrained(model_path)


def checkpointing_as_run(model, trainer) -> object:
    """What recomputes: Unsloth's record of what it set (False, True or "unsloth"), else the model's own flag."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for m in (model, base):
        if hasattr(m, "_unsloth_gradient_checkpointing"):
            return m._unsloth_gradient_checkpointing
    return bool(getattr(base, "is_gradient_checkpointing", False)) or bool(trainer.args.gradient_checkpointing)


def measure(spec: dict) -> dict:
    suite, run, cuda = spec["suite"], spec["run"], spec["cuda"]
    kind = run["kind"]
    r = recipe(kind, suite, run, cuda)
    if kind.startswith("unsloth"):
        import unsloth  # noqa: F401 - first: its patches apply to transformers and TRL imported after it
    import torch

    if cuda and suite.get("memory_cap_gb"):  # the caching allocator's cap: reserved memory stays under it
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, suite["memory_cap_gb"] / total))
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from speedtune.bench_data import read_examples
    from speedtune.bench_timing import (TokenCount, listeners_callback, listeners_for, memory_fields, mfu_fields,
                                        ordered, timed_fields)

    model, tokenizer = load_unsloth(r, suite, spec["model_path"]) if kind.startswith("unsloth") else \
        load_peft(r, suite, spec["model_path"], cuda)
    rows = [{"input_ids": e["input_ids"], "assistant_masks": [int(x != -100) for x in e["labels"]]}
            for e in read_examples(spec["examples_path"])]
    args = SFTConfig(**trainer_arguments(r, suite, spec["output"], cuda, cuda and torch.cuda.is_bf16_supported()))
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    timer, profiler, held, end = listeners_for(spec, cuda, dtype)
    counter = TokenCount(model)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=args,
                         callbacks=[listeners_callback([counter, *ordered(timer, profiler, held)])])
    ran = {"padding_free": bool(getattr(trainer.args, "padding_free", False)),
           "gradient_checkpointing": checkpointing_as_run(model, trainer),
           "micro_batch": trainer.args.per_device_train_batch_size,
           "grad_accum": trainer.args.gradient_accumulation_steps}
    for key, want in (("padding_free", r["padding_free"]), ("gradient_checkpointing", r["gradient_checkpointing"]),
                      ("micro_batch", r["batch_size"]), ("grad_accum", r["grad_accum"])):
        if want is not None and ran[key] != want and not (key == "gradient_checkpointing" and bool(ran[key]) == want):
            raise UserError(f"run {run['name']}: {key} {want!r} was asked for, but {ran[key]!r} ran")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    model.save_pretrained(spec["output"])
    adapter = next(Path(spec["output"]).glob("adapter_model.*"))
    result = {"name": run["name"], "kind": kind, "backend": "unsloth" if kind.startswith("unsloth") else "peft",
              "fit": "off", "layout": "rows", **ran, "optim": r["optim"], "seed": r["seed"],
              "dtype": str(dtype or torch.float32).replace("torch.", ""),
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": spec["rows"],
              "time_to_adapter_s": adapter.stat().st_mtime - spec["spawned_at"], "processes": 1,
              "versions": _versions(kind), **memory_fields(cuda),
              **timed_fields(timer, suite["warmup_steps"], end, profiler, held)}
    result["passes_per_step"] = r["grad_accum"]
    result["real_tokens_per_s_per_process"] = result["real_tokens_per_s"]
    result.update(mfu_fields(spec["model_path"], result["real_tokens_per_s"], spec["tokens"], spec["sum_sq_lengths"],
                             cuda))
    return result


def _versions(kind: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in ["torch", "transformers", "trl", "peft", "bitsandbytes"] + (["unsloth", "unsloth_zoo"] if
                                                                        kind.startswith("unsloth") else []):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    from speedtune.bench_worker import main

    sys.exit(main(sys.argv[1], sys.argv[2], measure))
