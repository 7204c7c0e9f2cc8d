"""speedtune: fine-tune Llama-3-class models with LoRA/QLoRA and ship them as local models."""

__version__ = "0.1.0"
