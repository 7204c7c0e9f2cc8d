"""Unsloth's FastLanguageModel: 4-bit loading, LoRA, and its gradient checkpointing (offloaded, or plain under pass
graphs; with `plan.checkpoint_keep_layers`, that many evenly spaced layers keep their activations instead: Unsloth's
`checkpoint_skip_layers`). CUDA only; imported only when chosen, and before transformers/TRL so that its patches
apply."""

from __future__ import annotations

from speedtune.training.backends.lora import target_modules
from speedtune.training.distributed import world
from speedtune.hardware import torch_dtype


def load(plan, cfg):
    from unsloth import FastLanguageModel  # imported first by backends.prepare (its patches, its loss-chunk setting)

    # data parallel (Unsloth's DDP guide): each rank loads its own copy on its own GPU
    w = world()
    placement = {"device_map": {"": w.local_rank}} if w.size > 1 else {}
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=plan.model_path, max_seq_length=cfg.seq_len, dtype=torch_dtype(plan.dtype),
        load_in_4bit=plan.load_in_4bit, **placement)
    keep = {"checkpoint_skip_layers": plan.checkpoint_keep_layers} if plan.checkpoint_keep_layers else {}
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=target_modules(cfg.target_modules), use_rslora=cfg.rslora, random_state=cfg.seed,
        use_gradient_checkpointing=checkpointing(plan), **keep)
    return model, tokenizer


def checkpointing(plan):
    """Unsloth's offloaded checkpointing ("unsloth": layer inputs kept in CPU memory), except under whole-pass CUDA
    graphs (speedtune.training.graphs), which can't hold its copies to the CPU: there the plain recomputation (True)."""
    if not plan.gradient_checkpointing:
        return False
    return True if plan.step_graphs else "unsloth"
