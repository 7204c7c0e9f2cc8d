"""What the user asked for: one typed dataclass that a YAML file fills, flags override, and `validate` checks.

Each field carries its flag's help and, where it has them, its choices: the CLI flags (speedtune.commands.options), the
YAML parsing and the validation are all derived from these fields, so there is one place to add a setting. How a run was
actually set up on the hardware at hand is a separate object, `speedtune.training.plan.Plan`, saved beside it."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from speedtune.errors import UserError, install_hint


def opt(default, help: str = "", choices: tuple | None = None, flag: str | None = None, short: str | None = None):
    """A config field with its flag's help text, allowed values and (rarely) a flag name other than --the-field."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "short": short})


@dataclass
class RunConfig:
    model: str = opt("smollm2-135m", "Alias, local folder or hub id.", short="-m")
    data: str | None = opt(None, "Data file, folder, hub dataset or dataset_info.json:name.", short="-d")
    output: str | None = opt(None, "Run folder to write (default: a new runs/<model>-<time>).", short="-o")
    method: str = opt("sft", "sft: supervised on answers; dpo or orpo: preference training on chosen/rejected pairs.",
                      ("sft", "dpo", "orpo"))
    # data
    format: str | None = opt(None, "Data format (detected when left out).",
                             ("alpaca", "chat", "sharegpt", "text", "pair"))
    columns: str | None = opt(None, "Map fields to your columns, e.g. user=Patient,assistant=Doctor.")
    template: str | None = opt(None, "A named chat template (alpaca, chatml, llama-3, zephyr, mistral); default: the "
                                     "model's own.")
    train_on: str = opt("responses", "Train on the assistant turns only, or on every token.", ("responses", "all"))
    drop_bad: bool = opt(False, "Drop bad rows (and say how many and why) instead of failing.")
    seq_len: int = opt(2048, "Longest example in tokens; longer rows are an error (or dropped with --drop-bad).")
    eval_split: float = opt(0.0, "Fraction of rows held out for evaluation.")
    eval_steps: int = opt(20, "Evaluate every N steps.")
    # LoRA
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    target_modules: str = opt("all-linear", "all-linear, or a comma list such as q_proj,v_proj.")
    rslora: bool = opt(False, "Rank-stabilised LoRA.")
    load_in_4bit: bool | None = opt(None, "QLoRA: a 4-bit base (default: on a GPU).", flag="4bit")
    # recipe
    batch_size: int = opt(2, "Rows per micro-batch; rows per optimizer step = batch size x grad accum.")
    grad_accum: int = opt(4, "Micro-batches per optimizer step.")
    lr: float = opt(2e-4, "Learning rate.")
    beta: float | None = opt(None, "--method dpo/orpo: DPO's beta (how far from the reference), ORPO's lambda (weight "
                                   "of the odds-ratio term). Default: TRL's, 0.1.")
    scheduler: str = opt("linear", "Learning-rate schedule.", ("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = opt(5, "Warm-up steps.")
    weight_decay: float = opt(0.01, "Weight decay.")
    max_steps: int | None = opt(60, "Optimizer steps.")
    epochs: float | None = opt(None, "Train for epochs instead of --max-steps.")
    seed: int = opt(3407, "Random seed.")
    optim: str | None = opt(None, "Optimizer (default adamw_8bit on a GPU, adamw_torch on a CPU).")
    gradient_checkpointing: bool | None = opt(None, "Recompute activations (default: the fit decides on a GPU; off on "
                                                    "a CPU).")
    fit: str = opt("auto", "auto: lay each step out for the data and the GPU, fastest; lean: padding-free with "
                           "checkpointing, less memory than Unsloth's defaults; memory: the smallest footprint; off: "
                           "the recipe as given.",
                   ("auto", "lean", "memory", "off"))
    cuda_graphs: bool | None = opt(None, "Replay each transformer block as CUDA graphs (Unsloth on a GPU; rows are "
                                         "padded to a few widths). Default: off.")
    step_graphs: bool | None = opt(None, "Record each micro-batch shape's forward and backward pass once as a CUDA "
                                         "graph and replay it (one process on a GPU; rows are padded to a few widths). "
                                         "Default: on with --fit auto on a GPU in bf16 or fp32, unless "
                                         "--padding-free (with both, each pass's packed rows are padded to a few "
                                         "widths and replayed).")
    padding_free: bool | None = opt(None, "Run each micro-batch's rows as one sequence, without padding (attention "
                                          "stays within each row). Default: the fit decides.")
    offload_embeddings: bool | None = opt(None, "Keep the input embedding table in CPU memory (default: only under "
                                                "--fit memory).")
    loss_chunk_gb: float | None = opt(None, "Unsloth's chunked loss may use at most this much GPU memory.")
    memory_cap_gb: float | None = opt(None, "Use at most this much GPU memory (e.g. 15: a T4 profile).")
    precision: str = opt("auto", "auto (from the hardware), bf16, fp16 or fp32.", ("auto", "bf16", "fp16", "fp32"))
    save_steps: int = opt(20, "Checkpoint every N steps (for --resume).")
    report_to: str = opt("none", "Logger.", ("none", "wandb", "tensorboard"))
    backend: str = opt("auto", "Unsloth on a CUDA GPU, transformers+PEFT elsewhere.", ("auto", "unsloth", "peft"))
    device: str = opt("auto", "Device.", ("auto", "cpu", "cuda"))

    def validate(self) -> "RunConfig":
        if not self.data:
            raise UserError("no data: pass --data FILE (or data: in the YAML file)")
        for name in FIELDS:  # a RunConfig built directly (the benchmark's worker) skips `coerce`'s check
            check_finite(flag(name), getattr(self, name), name)
        for name in ("seq_len", "batch_size", "grad_accum", "lora_r", "lora_alpha", "save_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be at least 1 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive (got {self.epochs})")
        for name in ("lr", "memory_cap_gb", "loss_chunk_gb", "beta"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{flag(name)} must be positive (got {getattr(self, name)})")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise UserError("--weight-decay and --warmup-steps can't be negative")
        for name in ("eval_split", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be in [0, 1) (got {getattr(self, name)})")
        for f in dataclasses.fields(self):
            ok = f.metadata.get("choices")
            value = getattr(self, f.name)
            if ok and value is not None and value not in ok:
                raise UserError(f"{flag(f.name)}: '{value}' is not one of {', '.join(ok)}")
        if self.beta is not None and self.method == "sft":
            raise UserError("--beta is for preference training: add --method dpo or orpo, or leave --beta out")
        if self.report_to != "none":
            import importlib.util

            if importlib.util.find_spec(self.report_to) is None:
                raise UserError(f"--report-to {self.report_to} needs the {self.report_to} package: "
                                f"{install_hint(self.report_to)}")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def flag(name: str) -> str:
    return "--" + (FIELDS[name].metadata.get("flag") or name.replace("_", "-"))


def base_type(f: dataclasses.Field) -> type:
    """int, float, bool or str: the field's type without its `| None`."""
    hint = typing.get_type_hints(RunConfig)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def check_finite(label: str, value, name: str | None = None, fix: str | None = None):
    """`value`, or a one-line error when it is a float that is not finite (nan, inf, -inf: YAML's .nan and .inf,
    a flag's "nan", float("inf") from the API). `label` names it (--lr, or run.yaml: lr); `fix` says what to give
    instead (default: a RunConfig field `name`'s default)."""
    if isinstance(value, float) and not math.isfinite(value):
        if fix is None:
            default = FIELDS[name].default if name in FIELDS else None
            fix = (f"a number such as {default}, or leave it out for the default" if default is not None else
                   "a number, or leave it out")
        raise UserError(f"{label} must be a finite number, got {value}; give {fix}")
    return value


def coerce(name: str, value, where: str):
    """A YAML or API value -> the field's type, or a one-line error naming the key."""
    if value is None:
        return None
    want = base_type(FIELDS[name])
    if want is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("true", "yes", "on", "1"):
            return True
        if str(value).strip().lower() in ("false", "no", "off", "0"):
            return False
        raise UserError(f"{where}: {name} must be true or false (got {value!r})")
    if want in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{where}: {name} must be a number (got {value!r})")
        try:
            number = float(value) if want is float else int(str(value).strip())
        except ValueError:
            if want is int:
                try:
                    number = float(value)
                except ValueError:
                    number = None
                if number is not None and number.is_integer():
                    return int(number)
            raise UserError(f"{where}: {name} must be {'an integer' if want is int else 'a number'} "
                            f"(got {value!r})") from None
        return check_finite(where if where.startswith("--") else f"{where}: {name}", number, name)
    return str(value)


def read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a config is a YAML file of key: value lines") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected key: value pairs")
    return data


def load(yaml_path: str | None, overrides: dict) -> RunConfig:
    """YAML keys are the flag names (dashes or underscores); every flag given on the command line (not None)
    overrides its key. A run's saved run_config.yaml loads the same way."""
    values: dict = {}
    if yaml_path:
        data = read_yaml(yaml_path)
        data = data.get("asked", data) if isinstance(data.get("asked"), dict) else data  # a saved run_config.yaml
        for key, value in data.items():
            name = str(key).replace("-", "_")
            name = {"4bit": "load_in_4bit"}.get(name, name)
            if name not in FIELDS:
                close = [f for f in FIELDS if f.split("_")[0] == name.split("_")[0]]
                raise UserError(f"{yaml_path}: unknown key '{key}'" + (f" (did you mean {close[0]}?)" if close else
                                f"; known keys: {', '.join(FIELDS)}"))
            values[name] = coerce(name, value, yaml_path)
    for name, value in overrides.items():
        if value is not None:
            values[name] = coerce(name, value, flag(name))
    return RunConfig(**values)
