"""What a `speedtune bench` suite is: the recipe every run shares (model or random shape, data, sequence length,
rows per step, LoRA, steps), its runs, and the checks. Read from a YAML file (the suite's keys) with flags on top.

A run is one of these kinds:
- `speedtune` (the default): the real `speedtune train` code path (speedtune.benchmarking.worker) with the run's own
  settings (any `speedtune train` setting: backend, fit, gradient_checkpointing, padding_free, precision, seed...).
  `backend: peft` with `fit: "off"` is vanilla transformers + PEFT as the tutorials set it.
- `unsloth-tutorial`: Unsloth's tutorial code as users copy it, run by Unsloth itself (speedtune.benchmarking.baselines):
  FastLanguageModel + its LoRA with offloaded checkpointing, TRL's SFTTrainer with Unsloth's patches and its own
  collator, 2 x 4, `padding_free` left to Unsloth, 8-bit AdamW.
- `unsloth-tuned`: the same library path with the run's batch_size, grad_accum, gradient_checkpointing (false, true
  or "unsloth") and padding_free.
- `trl`: TRL's SFTTrainer + PEFT without Unsloth, the same worker code as the Unsloth baselines (runs on a CPU).

`repeat_of: REF` marks a run as the reference run again: with another `seed` it measures the seed-to-seed spread of
the final eval loss; with the same seed and an equivalent layout (e.g. 2 x 4 instead of 8 x 1) it measures the
per-step numerical noise the loss check's tolerance is taken from (speedtune.benchmarking.check)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speedtune.errors import UserError
from speedtune.models.registry import resolve_model
from speedtune.training.config import FIELDS

# Real configurations; speed and memory do not depend on the weights' values, so random weights of these shapes
# stand in where the real models can't be downloaded.
SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
}

KINDS = ("speedtune", "unsloth-tutorial", "unsloth-tuned", "trl")
BASELINE_KINDS = KINDS[1:]  # run by their own libraries (speedtune.benchmarking.baselines)
# the run-spec keys of the harness itself; every other key is a `speedtune train` setting (speedtune.training.config)
RUN_KEYS = ("name", "kind", "label", "processes", "env", "repeat_of")
NOT_PER_RUN = ("model", "data", "output", "max_steps", "eval_split", "method")  # the suite's, the same for every run

TUTORIAL_RUNS = [
    {"name": "peft", "backend": "peft", "fit": "off", "gradient_checkpointing": True,
     "label": "vanilla transformers + PEFT as the tutorials set it (checkpointing on), through speedtune train"},
    {"name": "unsloth-tutorial", "kind": "unsloth-tutorial"},
    {"name": "speedtune", "backend": "unsloth", "fit": "auto", "label": "speedtune train, the default"},
]


@dataclass
class Suite:
    shape: str = "llama-3-8b"
    model: str | None = None  # a real model folder/alias instead of a random shape
    data: str | None = None  # a data file (any format speedtune train reads)
    format: str | None = None  # the data options of `speedtune train`, for `data`
    columns: str | None = None
    template: str | None = None
    drop_bad: bool = False
    eval_data: str | None = None  # a held-out data file: every run's eval loss on it (speedtune.benchmarking.timing)
    eval_steps: int = 20
    method: str = "sft"  # or dpo / orpo on preference pairs (`data`), for every run (speedtune.benchmarking.preference)
    lengths: str = "alpaca"  # a length profile: alpaca (shipped), a file of token counts, or dense (all seq_len)
    rows: int = 999  # rows drawn from the profile
    seq_len: int = 2048
    batch_size: int = 2
    grad_accum: int = 4
    lora_r: int = 16
    lora_alpha: int = 16
    load_in_4bit: bool = True
    steps: int = 60
    warmup_steps: int = 5  # the first steps (compilation, allocator warm-up) are not timed
    seed: int = 3407
    optim: str | None = None  # one optimizer for every run (default: each run's own)
    runs: list = field(default_factory=lambda: [dict(r) for r in TUTORIAL_RUNS])
    reference: str = "peft"  # the run whose per-step losses and gradient norms the others must match
    headline: str = "speedtune"  # the run the top-level ratios are of
    memory_cap_gb: float | None = None  # reserved GPU memory cap, e.g. 15 with precision fp16: the T4 proxy
    precision: str = "auto"
    device: str = "auto"
    longest: bool = False  # search the longest sequence each run trains at (dense rows, batch 1)
    max_seq_len: int = 32768
    profile: bool = False  # also on a CPU: profile the last steps (speedtune.benchmarking.profiling; always on a GPU)
    profile_steps: int = 3  # the last steps, profiled (GPU-kernel seconds per 1,000 real tokens), not timed
    cold_start: bool = False  # drop the model's weights from the page cache before each run: each reads its disk
    workdir: str = field(default_factory=lambda: os.environ.get("SPEEDTUNE_BENCH_WORKDIR", "/tmp/speedtune-bench"))
    results: str = "benchmarks/results"

    def t4_proxy(self) -> bool:
        """fp16 under a reserved-memory cap a T4 has (16 GB card, 15 usable): the T4 proxy's ratios apply."""
        return self.precision == "fp16" and bool(self.memory_cap_gb) and self.memory_cap_gb <= 16


def load_suite(path: str | None, overrides: dict) -> Suite:
    data = {}
    if path:
        from speedtune.training.config import read_yaml

        data = read_yaml(path)
        unknown = set(data) - set(Suite.__dataclass_fields__)
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(Suite.__dataclass_fields__)}")
    unknown = {k for k, v in overrides.items() if v is not None} - set(Suite.__dataclass_fields__)
    if unknown:
        raise UserError(f"bench: unknown setting(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(Suite.__dataclass_fields__)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        suite = Suite(**data)
    except TypeError as e:
        raise UserError(f"{path or 'suite'}: {e}") from None
    check_numbers(suite, path or "suite")
    if not suite.model and suite.shape not in SHAPES:
        raise UserError(f"unknown shape '{suite.shape}' (known: {', '.join(SHAPES)})")
    if suite.warmup_steps >= suite.steps - 1:
        raise UserError(f"steps ({suite.steps}) must exceed warmup_steps ({suite.warmup_steps}) by at least 2")
    check_runs(suite, path or "suite")
    if suite.method not in ("sft", "dpo", "orpo"):
        raise UserError(f"{path or 'suite'}: method '{suite.method}' is not one of sft, dpo, orpo")
    if suite.method != "sft" and (suite.eval_data or not suite.data):
        raise UserError(f"{path or 'suite'}: method {suite.method} needs `data` (preference pairs) and no `eval_data` "
                        "(the held-out loss is SFT's cross-entropy)")
    return suite


def check_numbers(suite: Suite, where: str) -> None:
    """The suite's numbers from YAML or flags: whole numbers in range, a finite positive memory cap."""
    for name, lo in (("seq_len", 16), ("batch_size", 1), ("grad_accum", 1), ("lora_r", 1), ("lora_alpha", 1),
                     ("steps", 3), ("warmup_steps", 0), ("rows", 1), ("eval_steps", 1), ("profile_steps", 1),
                     ("seed", 0), ("max_seq_len", 512)):
        v = getattr(suite, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"{where}: {name} must be a whole number of at least {lo} (got {v!r})")
    for name in ("drop_bad", "load_in_4bit", "longest", "profile", "cold_start"):
        if not isinstance(getattr(suite, name), bool):
            raise UserError(f"{where}: {name} must be true or false (got {getattr(suite, name)!r})")
    cap = suite.memory_cap_gb
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)
                            or cap <= 0):
        raise UserError(f"{where}: memory_cap_gb must be a finite number of GB above 0 (got {cap!r})")


def check_runs(suite: Suite, where: str) -> None:
    """Every run a unique name, a known kind and only known settings, so a typo fails before anything runs."""
    if not isinstance(suite.runs, list) or not all(isinstance(r, dict) for r in suite.runs):
        raise UserError(f"{where}: runs must be a list of mappings (name: ..., kind or backend: ...)")
    names = [r.get("name") for r in suite.runs]
    if len(set(names)) != len(names) or None in names:
        raise UserError(f"{where}: every run needs a unique name (got {names})")
    for r in suite.runs:
        kind = r.get("kind", "speedtune")
        if kind not in KINDS:
            raise UserError(f"{where}: run {r['name']}: kind '{kind}' is not one of {', '.join(KINDS)}")
        bad = [k for k in r if k not in RUN_KEYS and (k not in FIELDS or k in NOT_PER_RUN)]
        if bad:
            raise UserError(f"{where}: run {r['name']}: unknown or suite-wide setting(s) {', '.join(bad)}")
        if r.get("repeat_of") and r["repeat_of"] not in names:
            raise UserError(f"{where}: run {r['name']}: repeat_of names no run ({r['repeat_of']})")


def run_kind(run_spec: dict) -> str:
    return run_spec.get("kind", "speedtune")


def run_backend(run_spec: dict) -> str:
    """The library a run needs: Unsloth for the Unsloth baselines, PEFT for `trl`, the run's backend otherwise."""
    kind = run_kind(run_spec)
    if kind == "trl":
        return "peft"
    return "unsloth" if kind.startswith("unsloth") else run_spec.get("backend", "auto")


def run_seed(suite: Suite, run_spec: dict) -> int:
    return int(run_spec.get("seed", suite.seed))


def label(run_spec: dict, method: str = "sft") -> str:
    """What the run is, in words: its `label`, or one made from its kind and settings (and the suite's method)."""
    if run_spec.get("label"):
        return run_spec["label"]
    kind = run_kind(run_spec)
    trainer = f"{method.upper() if method != 'sft' else 'SFT'}Trainer"
    if kind == "unsloth-tutorial":
        return (f"Unsloth's tutorial code: FastLanguageModel + TRL {trainer} with Unsloth's patches and collator, "
                "the recipe's rows a step (2 x 4 in the tutorial), offloaded checkpointing, padding_free unset")
    settings = ", ".join(f"{k} {v}" for k, v in run_spec.items() if k not in RUN_KEYS)
    if kind == "unsloth-tuned":
        return f"Unsloth's own trainer and collator, tuned: {settings}"
    if kind == "trl":
        return f"TRL {trainer} + PEFT (no speedtune, no Unsloth){': ' + settings if settings else ''}"
    return f"speedtune train{' --method ' + method if method != 'sft' else ''}: {settings or 'the default'}"


def suite_key(suite: Suite, run_spec: dict) -> str:
    """What makes two results of a run comparable: the suite's recipe and data, and the run's settings."""
    same = {k: v for k, v in asdict(suite).items() if k not in ("runs", "results", "workdir", "reference", "headline")}
    return hashlib.sha1(json.dumps([same, run_spec], sort_keys=True).encode()).hexdigest()[:16]


def build_shape(suite: Suite, device: str) -> Path:
    """A random-initialised model of a real configuration, built on the device and saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(suite.workdir) / suite.shape
    if (out / "config.json").is_file():
        return out
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **SHAPES[suite.shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: an 8B model in fp32 would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp)
    del model
    tmp.rename(out)
    return out


SMOKE = dict(shape="tiny", seq_len=256, batch_size=2, grad_accum=2, rows=64, steps=4, warmup_steps=1, device="cpu",
             eval_steps=2,
             load_in_4bit=False, reference="peft", precision="fp32",  # not bf16 on an AMX CPU: the same math everywhere
             runs=[{"name": "peft", "backend": "peft", "fit": "off", "gradient_checkpointing": True},
                   {"name": "speedtune", "backend": "peft", "fit": "auto"},
                   {"name": "trl", "kind": "trl"}])


def with_processes(runs: list[dict], n: int) -> list[dict]:
    """Each speedtune run, then the same run data-parallel on `n` processes (named RUN-xN), for the scaling report."""
    return [r for run in runs for r in ((run, {**run, "name": f"{run['name']}-x{n}", "processes": n})
                                        if run_kind(run) == "speedtune" else (run,))]


def with_smoke(overrides: dict) -> dict:
    """The CPU smoke suite (a tiny shape, 4 steps: it proves the harness, not the numbers), `overrides` on top."""
    return {**SMOKE, **{k: v for k, v in overrides.items() if v is not None}}


def replace(suite: Suite, **changes) -> Suite:
    return dataclasses.replace(suite, **changes)
