"""Which layers get LoRA adapters: `all-linear` (every projection of a Llama block, the tutorials' choice) or a list."""

from __future__ import annotations

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def target_modules(spec: str) -> list[str]:
    if spec in ("all-linear", "all"):
        return LORA_TARGETS
    return [m.strip() for m in spec.split(",") if m.strip()]
