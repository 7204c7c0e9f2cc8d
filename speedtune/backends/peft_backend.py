"""transformers + PEFT: nf4 through bitsandbytes on a GPU (QLoRA), full precision on a CPU."""

from __future__ import annotations

from speedtune.backends import target_modules
from speedtune.hardware import torch_dtype


def load(cfg, hw):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(hw.dtype)
    kwargs = {"dtype": dtype}
    if hw.device == "cuda":
        kwargs["device_map"] = {"": 0}
        kwargs["attn_implementation"] = "sdpa"
    if cfg.load_in_4bit:
        import importlib.util

        from transformers import BitsAndBytesConfig

        from speedtune.errors import UserError

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--4bit needs bitsandbytes: pip install 'speedtune[gpu]' (or train with --no-4bit)")

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    model.config.use_cache = False
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=target_modules(cfg.target_modules), use_rslora=cfg.rslora, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer
