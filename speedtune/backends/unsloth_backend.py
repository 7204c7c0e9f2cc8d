"""Unsloth's FastLanguageModel: 4-bit loading, LoRA, and its offloaded gradient checkpointing. CUDA only; imported
only when chosen, and before transformers/TRL so that its patches apply."""

from __future__ import annotations

from speedtune.backends import target_modules
from speedtune.hardware import torch_dtype


def load(cfg, hw):
    import os

    if cfg.loss_chunk_gb:  # read when Unsloth is imported
        os.environ["UNSLOTH_CE_LOSS_TARGET_GB"] = str(cfg.loss_chunk_gb)
    import unsloth  # noqa: F401  (must come first: it patches transformers and TRL)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.model_path, max_seq_length=cfg.seq_len, dtype=torch_dtype(hw.dtype),
        load_in_4bit=bool(cfg.load_in_4bit))
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=target_modules(cfg.target_modules), use_rslora=cfg.rslora, random_state=cfg.seed,
        use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False)
    return model, tokenizer
