"""transformers + PEFT: nf4 through bitsandbytes on a GPU (QLoRA), full precision on a CPU."""

from __future__ import annotations

import importlib.util

from speedtune.training.backends.lora import target_modules
from speedtune.training.distributed import world
from speedtune.errors import UserError, install_hint
from speedtune.hardware import torch_dtype


def load(plan, cfg):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    dtype = torch_dtype(plan.dtype)
    kwargs = {"dtype": dtype}
    if plan.device == "cuda":
        kwargs["device_map"] = {"": world().local_rank}  # each data-parallel rank on its own GPU
        kwargs["attn_implementation"] = "sdpa"
    if plan.load_in_4bit:
        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"--4bit needs bitsandbytes: {install_hint('gpu')} (or train with --no-4bit)")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(plan.model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
    model.config.use_cache = False
    if plan.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=target_modules(cfg.target_modules), use_rslora=cfg.rslora, task_type="CAUSAL_LM")
    set_seed(cfg.seed)  # LoRA's A matrices start random: the same seed, the same run (Unsloth's random_state does this)
    return get_peft_model(model, lora), tokenizer
