"""The one seam between the recipe and the library that builds the trainable model.

`unsloth`: Unsloth's FastLanguageModel (fused kernels, 4-bit, its gradient checkpointing), CUDA GPUs only.
`peft`: vanilla transformers + PEFT (+ bitsandbytes nf4 on a GPU): runs everywhere, and is the benchmark baseline.
Both return a PEFT-wrapped model and its tokenizer; data, trainer and run files are shared. GPU-only packages are
imported inside the backend's `load`, never at import time."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

from speedtune.errors import UserError, install_hint
from speedtune.training.fit import MEMORY_LOSS_CHUNK_GB


def choose(requested: str, device: str) -> tuple[str, str]:
    """(backend, why) for `--backend auto|unsloth|peft` on this device."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "peft":
        return "peft", "asked for with --backend peft"
    if requested == "unsloth":
        if device != "cuda":
            raise UserError("--backend unsloth needs a CUDA GPU, and there is none here; use --backend peft or auto")
        if not has_unsloth:
            raise UserError(f"--backend unsloth needs Unsloth: {install_hint('gpu')}")
        return "unsloth", "asked for with --backend unsloth"
    if device == "cuda" and has_unsloth:
        return "unsloth", "a CUDA GPU and Unsloth are present"
    if device == "cuda":
        return "peft", f"a CUDA GPU but no Unsloth ({install_hint('gpu')} for its speed)"
    return "peft", "no CUDA GPU here: Unsloth needs one"


def prepare(backend: str, cfg) -> None:
    """Before anything imports transformers or TRL: Unsloth must be imported first so that its patches apply, and
    its loss-chunk setting is read at import."""
    if backend != "unsloth":
        return

    chunk = cfg.loss_chunk_gb or (MEMORY_LOSS_CHUNK_GB if cfg.fit == "memory" else None)
    if chunk:
        os.environ["UNSLOTH_CE_LOSS_TARGET_GB"] = str(chunk)
    from speedtune.training.backends.unsloth_import import import_unsloth

    import_unsloth(("sft",) if cfg.method == "sft" else ("sft", cfg.method))  # rewrites only the trainers used


def import_unsloth_first() -> bool:
    """Where a CUDA GPU and Unsloth are present, import Unsloth now, before anything imports transformers or TRL
    (its patches apply only then; a chat before training, as the quickstart's, would import transformers first).
    True if it did (the run will train on the Unsloth backend)."""
    if importlib.util.find_spec("unsloth") is None:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    from speedtune.training.backends.unsloth_import import import_unsloth

    import_unsloth(("sft",))  # a later run of another method patches its trainer then (backends.prepare)

    return True


_SET_HERE: dict[str, str] = {}  # the environment variables a run set for Unsloth in this process, and their values


def set_env(name: str, value: str) -> None:
    _SET_HERE[name] = os.environ[name] = value


def user_env(name: str) -> str | None:
    """An environment variable as the user set it: None where unset, or where an earlier run in this process set it."""
    value = os.environ.get(name)
    return None if value is None or _SET_HERE.get(name) == value else value


def load(plan, cfg, events):
    """(PEFT model, tokenizer) as the plan says: backend, precision, 4-bit, checkpointing, embedding offload. What
    the load settles otherwise (Unsloth's per-block graphs, an embedding table that can't move) goes to `events`
    (speedtune.training.events.Events)."""
    if plan.backend == "unsloth":
        from speedtune.training.backends.unsloth_backend import load as _load

        # read from the environment when Unsloth's block compiler loads (graphs) and at every block's forward (compile)
        set_env("UNSLOTH_BLOCK_CUDAGRAPHS", "1" if plan.cuda_graphs else "0")
        set_env("UNSLOTH_BLOCK_COMPILE", "1" if plan.block_compile else "0")
    else:
        from speedtune.training.backends.peft_backend import load as _load
    model, tokenizer = _load(plan, cfg)
    if plan.backend == "unsloth" and plan.cuda_graphs != graphs_on():
        if cfg.cuda_graphs is not None:  # asked for: it must be what runs
            raise UserError(f"--{'' if cfg.cuda_graphs else 'no-'}cuda-graphs: Unsloth runs with CUDA graphs "
                            f"{'on' if graphs_on() else 'off'} in this process (it was loaded earlier with the other "
                            "setting, or its per-block compile is off); train in a fresh process")
        events.record("block-graphs", f"CUDA graphs per block: {'on' if graphs_on() else 'off'}, as Unsloth loaded",
                      cuda_graphs=graphs_on())
    if plan.offload_embeddings and not offload_input_embeddings(model):
        events.record("offload-refused", "the input embedding table stays on the GPU (tied to the output layer, "
                      "trained, or already in CPU memory)", offload_embeddings=False)
    return model, tokenizer


def graphs_on() -> bool:
    """Whether Unsloth's block compiler, as loaded in this process, records CUDA graphs (its private
    `_block_compile._COMPILE_OPTIONS`, checked against unsloth 2026.10.9, the version the `gpu` extra pins)."""
    block = sys.modules.get("unsloth.models._block_compile")
    return bool(block and block._COMPILE_OPTIONS.get("triton.cudagraphs"))


def after_trainer(plan, model) -> None:
    """Undo what TRL's SFTTrainer does to a quantised PEFT model that fp16 can't train: it casts the trainable LoRA
    weights to bf16, and fp16's gradient scaler has no bf16 kernel (a T4 crashes on the first step). Mixed precision
    wants them in fp32. Unsloth manages its own adapters."""
    if plan.backend != "peft" or plan.dtype != "float16":
        return
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def offload_input_embeddings(model, force: bool = False) -> bool:
    """Keep a frozen, untied input embedding table in CPU memory: each forward looks the token ids up on the CPU and
    copies the rows (batch x seq x hidden) to the GPU. The numbers are the same; the GPU saves vocab x hidden
    weights (1 GB for Llama-3-8B in bf16). The module keeps its hooks (e.g. the one that makes its output require
    grad for gradient checkpointing). Returns False, changing nothing, where that would not be exact or would not
    help: a trained or tied table, or one already in CPU memory (`force` moves that one too: the tests' CPU case)."""
    import torch

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    w = emb.weight
    if w.requires_grad or (out is not None and out.weight is w) or (w.device.type == "cpu" and not force):
        return False
    # a plain attribute, not a parameter: `model.to(device)` (the Trainer calls it) must not move it back
    del emb._parameters["weight"]
    table = w.detach().to("cpu")
    emb.weight = table.pin_memory() if torch.cuda.is_available() else table
    del w
    emb.forward = types.MethodType(lookup_on_cpu, emb)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def lookup_on_cpu(self, input_ids):
    """An embedding's forward whose table lives in CPU memory: the rows come back on the ids' device."""
    import torch

    rows = torch.nn.functional.embedding(input_ids.to(self.weight.device), self.weight, getattr(self, "padding_idx", None))
    return rows.to(input_ids.device)
