"""The run folder: created (or resumed) before training, completed after it. It holds the PEFT adapter, the
tokenizer with the chat template used in training, a generation config that stops where training ends turns,
`run_config.yaml` (what was asked, and the resolved plan beside it), `metrics.json`, `train_log.jsonl`, `loss.png`
and `checkpoints/` for `--resume`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from speedtune.errors import UserError


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: a crash or kill while one was being written leaves a folder without
    trainer_state.json, which is skipped (and removed, since training will write that step again)."""
    found = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    for p in found:
        if p not in complete and (not complete or int(p.name.split("-")[-1]) > int(complete[-1].name.split("-")[-1])):
            shutil.rmtree(p, ignore_errors=True)
    return complete[-1] if complete else None


def prepare(out: Path, resume: bool, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    busy = out.is_dir() and any(out.iterdir())
    if resume:
        if last_checkpoint(out) is None:
            raise UserError(f"--resume: {out} has no checkpoint to resume from (checkpoints/checkpoint-N)")
    elif busy and not overwrite:
        raise UserError(f"--output {out} exists and is not empty; pick another folder, --resume it, or --overwrite")
    elif busy:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output {out}: can't write there ({e.strerror}); pick a folder you can write to") from None
    return out


def write_yaml(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def save_config(out: Path, asked: dict, plan: dict) -> None:
    """`run_config.yaml`: `asked` is the config as the user gave it (YAML + flags; `speedtune train run_config.yaml`
    repeats the run), `plan` how it ran here."""
    write_yaml(out / "run_config.yaml", {"asked": asked, "plan": plan})


def save_model_files(out: Path, model, tokenizer, template, model_path: str, console) -> None:
    """Adapter, tokenizer (+ the training template) and a generation config that stops on the end-of-turn token."""
    from transformers import GenerationConfig

    from speedtune.data.dataset import stop_check

    model.save_pretrained(out)
    if template.name not in ("model", "text"):
        tokenizer.chat_template = template.jinja
    tokenizer.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen = GenerationConfig()
    stops, warning = stop_check(template, tokenizer, gen)
    if warning:
        console.print(f"[yellow]note[/]: {warning}")
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    gen.save_pretrained(out)
