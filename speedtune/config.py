"""The run config: one typed dataclass that a YAML file fills, flags override, `validate` checks, and every run saves
(`run_config.yaml`) so that a run can be repeated, resumed and exported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from speedtune.errors import UserError


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    data: str | None = None
    output: str | None = None
    # data
    format: str | None = None
    columns: str | None = None
    template: str | None = None
    train_on: str = "responses"
    drop_bad: bool = False
    seq_len: int = 2048
    eval_split: float = 0.0
    eval_steps: int = 20
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    rslora: bool = False
    load_in_4bit: bool | None = None  # None: on a GPU yes, on a CPU no
    # recipe
    batch_size: int = 2
    grad_accum: int = 4
    lr: float = 2e-4
    scheduler: str = "linear"
    warmup_steps: int = 5
    weight_decay: float = 0.01
    max_steps: int | None = 60
    epochs: float | None = None
    seed: int = 3407
    optim: str | None = None  # None: adamw_8bit on a GPU, adamw_torch on a CPU
    gradient_checkpointing: bool | None = None  # None: on a GPU yes, on a CPU no
    fit: str = "auto"  # auto: choose micro-batch and checkpointing for the GPU; off; memory (smallest footprint)
    offload_embeddings: bool | None = None  # None: the fit decides (the memory profile keeps them in CPU memory)
    loss_chunk_gb: float | None = None  # Unsloth's chunked loss: at most this much working memory (None: its own)
    memory_cap_gb: float | None = None  # pretend the GPU has this much memory (e.g. 15 for a T4 profile)
    precision: str = "auto"  # auto (from the hardware), bf16, fp16, fp32
    save_steps: int = 20
    report_to: str = "none"
    backend: str = "auto"
    device: str = "auto"
    # filled in by the run
    model_path: str | None = None
    resolved: dict = field(default_factory=dict)

    def validate(self) -> "RunConfig":
        if not self.data:
            raise UserError("no data: pass --data FILE (or data: in the YAML file)")
        if not self.output:
            raise UserError("no output folder: pass --output DIR (or output: in the YAML file)")
        for name in ("seq_len", "batch_size", "grad_accum", "lora_r", "lora_alpha", "save_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive (got {self.lr})")
        for name in ("memory_cap_gb", "loss_chunk_gb"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)}); leave it out "
                                "for the default")
        if not 0 <= self.eval_split < 1:
            raise UserError(f"--eval-split must be in [0, 1) (got {self.eval_split})")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        choices = {"backend": ("auto", "unsloth", "peft"), "report_to": ("none", "wandb", "tensorboard"),
                   "train_on": ("responses", "all"), "device": ("auto", "cpu", "cuda"),
                   "fit": ("auto", "off", "memory"), "precision": ("auto", "bf16", "fp16", "fp32"),
                   "scheduler": ("linear", "cosine", "constant", "constant_with_warmup")}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise UserError(f"--{name.replace('_', '-')}: '{getattr(self, name)}' is not one of {', '.join(ok)}")
        if self.report_to != "none":
            import importlib.util

            if importlib.util.find_spec(self.report_to) is None:
                raise UserError(f"--report-to {self.report_to} needs the {self.report_to} package: "
                                f"pip install 'speedtune[{self.report_to}]'")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    def save(self, path: Path) -> None:
        path.write_text(self.to_yaml())


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in ("model_path", "resolved")}


def load(yaml_path: str | None, overrides: dict) -> RunConfig:
    """YAML keys are the flag names (dashes or underscores); flags given on the command line override them."""
    values: dict = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise UserError(f"config file not found: {yaml_path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{yaml_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{yaml_path}: expected key: value pairs")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                close = [f for f in FIELDS if f.split("_")[0] == name.split("_")[0]]
                raise UserError(f"{yaml_path}: unknown key '{key}'" + (f" (did you mean {close[0]}?)" if close else
                                f"; known keys: {', '.join(FIELDS)}"))
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = RunConfig(**values)
    except TypeError as e:
        raise UserError(f"bad config: {e}") from None
    for name, f in FIELDS.items():  # YAML gives strings for numbers like 2e-4
        v = getattr(cfg, name)
        if isinstance(v, str) and name in ("lr", "eval_split", "lora_dropout", "weight_decay", "epochs", "memory_cap_gb",
                                                  "loss_chunk_gb"):
            try:
                setattr(cfg, name, float(v))
            except ValueError:
                raise UserError(f"{name}: '{v}' is not a number") from None
    return cfg
