"""The one seam between the recipe and the library that builds the trainable model.

`unsloth`: Unsloth's FastLanguageModel (fused kernels, 4-bit, its gradient checkpointing), CUDA GPUs only.
`peft`: vanilla transformers + PEFT (+ bitsandbytes nf4 on a GPU): runs everywhere, and is the benchmark baseline.
Both return a PEFT-wrapped model and its tokenizer; data, trainer and run files are shared. GPU-only packages are
imported inside the backend's `load`, never at import time."""

from __future__ import annotations

import importlib.util

from speedtune.errors import UserError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def choose(requested: str, device: str) -> tuple[str, str]:
    """(backend, why) for `--backend auto|unsloth|peft` on this device."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "peft":
        return "peft", "asked for with --backend peft"
    if requested == "unsloth":
        if device != "cuda":
            raise UserError("--backend unsloth needs a CUDA GPU, and there is none here; use --backend peft or auto")
        if not has_unsloth:
            raise UserError("--backend unsloth needs Unsloth: pip install 'speedtune[gpu]'")
        return "unsloth", "asked for with --backend unsloth"
    if device == "cuda" and has_unsloth:
        return "unsloth", "a CUDA GPU and Unsloth are present"
    if device == "cuda":
        return "peft", "a CUDA GPU but no Unsloth (pip install 'speedtune[gpu]' for its speed)"
    return "peft", "no CUDA GPU here: Unsloth needs one"


def target_modules(spec: str) -> list[str] | str:
    if spec in ("all-linear", "all"):
        return LORA_TARGETS
    return [m.strip() for m in spec.split(",") if m.strip()]


def load(backend: str, cfg, hw):
    if backend == "unsloth":
        from speedtune.backends.unsloth_backend import load as _load
    else:
        from speedtune.backends.peft_backend import load as _load
    return _load(cfg, hw)
