"""The automatic fit: keep the user's recipe (effective batch, sequence length, learning rate, steps) and choose how
to run it on the device at hand: micro-batch against accumulation, and gradient checkpointing only when memory needs
it. Unsloth already brings fused kernels, a chunked cross-entropy, padding-free batching and compiled blocks; what
its defaults leave on the table on a large GPU is the recomputation that checkpointing costs (29% of the
step). `--fit memory` does the opposite for small GPUs: micro-batch 1, offloaded checkpointing, and the input
embedding table kept in CPU memory (a frozen lookup: the same numbers, about 1 GB less GPU memory for a 128k vocab),
and the chunked cross-entropy held to 0.5 GB of working memory (Unsloth lets it take up to 4 GB on a big GPU: more
chunks, the same sum).

Memory is estimated from the model's configuration: the quantised or 16-bit weights, the LoRA weights with their
AdamW state, and the activations kept per token and layer (5 x hidden + 3 x intermediate values without
checkpointing, the layer input alone with it), with a 10% margin. Calibrated on the measured peaks of
benchmarks/results/2026-11-23-nvidia-h200-llama-3-8b-seq{2048,4096}.json (Unsloth, Llama-3-8B nf4): the estimate sits
above every measured peak (24.1 vs 20.9 GB without checkpointing at 4096 tokens; 8.8 vs 6.7 GB with it; 6.7 vs
5.4 GB for the memory profile)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

HEADROOM = 0.80  # use at most this share of the device's memory
MEMORY_LOSS_CHUNK_GB = 0.5  # the memory profile's cap on the chunked cross-entropy's working memory
MAX_MICRO_TOKENS = 4096  # beyond this a bigger micro-batch no longer raises a GPU's throughput, only its memory


@dataclass
class Plan:
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    estimated_gb: float
    capacity_gb: float | None
    mode: str
    reasons: list[str] = field(default_factory=list)
    offload_embeddings: bool = False
    loss_chunk_gb: float | None = None  # cap on the chunked cross-entropy's working memory (None: the library's own)

    def as_dict(self) -> dict:
        return asdict(self)


def shape(model_path: str) -> dict:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    h = cfg["hidden_size"]
    return {"hidden": h, "inter": cfg.get("intermediate_size", 4 * h), "layers": cfg["num_hidden_layers"],
            "vocab": cfg["vocab_size"], "kv": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
            "heads": cfg.get("num_attention_heads"), "tied": cfg.get("tie_word_embeddings", False)}


def estimate_gb(s: dict, micro_batch: int, seq_len: int, lora_r: int, four_bit: bool, checkpointing: bool,
                act_bytes: int = 2, offload_embeddings: bool = False) -> float:
    h, i, L, V = s["hidden"], s["inter"], s["layers"], s["vocab"]
    kv_dim = h * s["kv"] // s["heads"] if s["heads"] else h
    block = L * (2 * h * h + 2 * h * kv_dim + 3 * h * i)
    embed = V * h * (1 if s["tied"] or offload_embeddings else 2)
    weights = block * (0.56 if four_bit else 2) + embed * 2
    lora = L * lora_r * (2 * h + (h + kv_dim) * 2 + 2 * (h + i) + (i + h)) * (2 + 4 + 8)  # weights, grads, AdamW
    tokens = micro_batch * seq_len
    per_token_layer = (5 * h + 3 * i) if not checkpointing else h
    acts = tokens * L * per_token_layer * act_bytes
    if checkpointing:
        acts += tokens * (5 * h + 3 * i) * act_bytes  # one layer recomputed at a time
    logits = tokens * V * 4 / 8  # chunked cross-entropy keeps a slice of the fp32 logits
    return (weights + lora + acts + logits) * 1.10 / 2**30


def plan(mode: str, model_path: str, effective_batch: int, micro_batch: int, seq_len: int, lora_r: int,
         four_bit: bool, capacity_gb: float | None, act_bytes: int = 2) -> Plan:
    s = shape(model_path)
    est = lambda b, ck: estimate_gb(s, b, seq_len, lora_r, four_bit, ck, act_bytes)  # noqa: E731
    if mode == "off" or capacity_gb is None:
        why = "--fit off: the recipe runs as given" if mode == "off" else "no GPU: nothing to fit"
        return Plan(micro_batch, effective_batch // micro_batch, True if mode == "off" else False,
                    est(micro_batch, True), capacity_gb, "off", [why])
    budget = capacity_gb * HEADROOM
    if mode == "memory":
        off = not s["tied"]  # a tied table is also the output layer: it has to stay on the GPU
        return Plan(1, effective_batch, True, estimate_gb(s, 1, seq_len, lora_r, four_bit, True, act_bytes, off),
                    capacity_gb, "memory",
                    ["memory profile: micro-batch 1 with offloaded gradient checkpointing, the smallest footprint"] +
                    (["the input embedding table stays in CPU memory (a lookup; its output is copied to the GPU)"]
                     if off else []) +
                    [f"the chunked cross-entropy works in at most {MEMORY_LOSS_CHUNK_GB} GB (Unsloth allows up to 4 GB)"],
                    offload_embeddings=off, loss_chunk_gb=MEMORY_LOSS_CHUNK_GB)
    divisors = [b for b in range(effective_batch, 0, -1)
                if effective_batch % b == 0 and (b == 1 or b * seq_len <= MAX_MICRO_TOKENS)]
    for b in divisors:
        if est(b, False) <= budget:
            return Plan(b, effective_batch // b, False, est(b, False), capacity_gb, "speed", [
                f"micro-batch {b} x accumulation {effective_batch // b} keeps the effective batch {effective_batch}",
                f"no gradient checkpointing: about {est(b, False):.1f} GB fits in {budget:.0f} GB "
                f"({HEADROOM:.0%} of {capacity_gb:.0f} GB), and skipping the recomputation saves about 30% "
                "of each step"])
    for b in divisors:
        if est(b, True) <= budget:
            return Plan(b, effective_batch // b, True, est(b, True), capacity_gb, "speed", [
                f"without checkpointing even micro-batch 1 needs about {est(1, False):.1f} GB of {budget:.0f} GB: "
                f"gradient checkpointing on, micro-batch {b}"])
    low = plan("memory", model_path, effective_batch, micro_batch, seq_len, lora_r, four_bit, capacity_gb, act_bytes)
    low.reasons.insert(0, f"even micro-batch 1 with checkpointing is estimated at {est(1, True):.1f} GB of "
                          f"{budget:.0f} GB: trying the smallest footprint")
    return low
