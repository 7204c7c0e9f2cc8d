"""The run folder, owned here: `speedtune train` writes it through `RunFolder`, and every reader (chat, serve,
export, the Python API, the benchmark worker, `--resume`, the web page) reads it through `RunFolder` too.

Format 1 (FORMAT, this version):
- `run_config.yaml`: `format`, `asked` (the config as the user gave it: YAML + flags; `speedtune train
  run_config.yaml` repeats the run) and `plan` (speedtune.training.plan.Plan as resolved), written once, before
  the model loads;
- `events.jsonl`: what happened at run time that the plan did not decide (a CUDA-graph recording that failed, an
  embedding offload the model refused), one JSON object a line (`event`, `reason`, `changes`: the plan's fields as
  they ran), written at the end;
- `metrics.json`, `train_log.jsonl` (written as the run goes, for watchers), `loss.png`, the PEFT adapter, the
  tokenizer with the training template, `generation_config.json`, `checkpoints/` (for `--resume`).
Format 0 (folders written before the format had a number): no `format` key and no `events.jsonl`; its plan was
rewritten as the run went, so it already is the plan as it ran. Both load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from speedtune.errors import UserError

FORMAT = 1
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def write_yaml(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.config_file = self.path / "run_config.yaml"
        self.events_file = self.path / "events.jsonl"
        self.metrics_file = self.path / "metrics.json"
        self.train_log = self.path / "train_log.jsonl"
        self.loss_plot = self.path / "loss.png"
        self.checkpoints = self.path / "checkpoints"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # reading
    def is_run(self) -> bool:
        """A run folder of `speedtune train` (its adapter config is there; the weights may not be)."""
        return self.path.is_dir() and (self.path / "adapter_config.json").is_file()

    def has_weights(self) -> bool:
        return any((self.path / name).is_file() for name in ADAPTER_WEIGHTS)

    def saved(self) -> dict:
        """run_config.yaml as saved, {} where there is none."""
        return (yaml.safe_load(self.config_file.read_text()) or {}) if self.config_file.is_file() else {}

    @property
    def format(self) -> int:
        return int(self.saved().get("format", 0))

    @property
    def asked(self) -> dict:
        """What the user asked for (format 0's very first folders saved the bare config)."""
        saved = self.saved()
        return saved["asked"] if isinstance(saved.get("asked"), dict) else saved

    @property
    def plan(self) -> dict:
        """The plan as resolved before training (format 0: as it ran)."""
        saved = self.saved()
        return saved.get("plan") or saved.get("resolved") or {}

    @property
    def events(self) -> list[dict]:
        if not self.events_file.is_file():
            return []
        return [json.loads(line) for line in self.events_file.read_text().splitlines() if line.strip()]

    def plan_as_run(self) -> dict:
        """The plan with the run's events applied: each event's `changes` over the plan's fields, its reason added
        to the plan's reasons (what format 0 saved in place)."""
        plan = dict(self.plan)
        plan["reasons"] = list(plan.get("reasons") or [])
        for e in self.events:
            plan.update(e.get("changes") or {})
            plan["reasons"].append(e["reason"])
        return plan

    @property
    def template(self) -> str | None:
        """The chat template the run trained with: `plan.data.template` (`plan.template` in no saved format)."""
        plan = self.plan
        return (plan.get("data") or {}).get("template") or plan.get("template")

    def base_model(self) -> str:
        """The base model the run was trained from: its plan's or config's model folder where that still exists,
        else the model it asked for, else the adapter's own record."""
        plan, asked = self.plan, self.asked
        for path in (plan.get("model_path"), asked.get("model_path")):
            if path and Path(path).is_dir():
                return path
        if asked.get("model"):
            return asked["model"]
        return json.loads((self.path / "adapter_config.json").read_text())["base_model_name_or_path"]

    def metrics(self) -> dict | None:
        return json.loads(self.metrics_file.read_text()) if self.metrics_file.is_file() else None

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint: a crash or kill while one was being written leaves a folder without
        trainer_state.json, which is skipped (and removed, since training will write that step again)."""
        found = sorted(self.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        complete = [p for p in found if (p / "trainer_state.json").is_file()]
        step = lambda p: int(p.name.split("-")[-1])  # noqa: E731
        for p in found:
            if p not in complete and (not complete or step(p) > step(complete[-1])):
                shutil.rmtree(p, ignore_errors=True)
        return complete[-1] if complete else None

    # writing (speedtune.training.train, rank 0)
    def prepare(self, resume: bool, overwrite: bool) -> Path:
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"--output {out} is a file, not a folder")
        busy = out.is_dir() and any(out.iterdir())
        if resume:
            if self.last_checkpoint() is None:
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
            raise UserError(f"--output {out}: can't write there ({e.strerror}); pick a folder you can write "
                            "to") from None
        return out

    def write_config(self, asked: dict, plan: dict) -> None:
        write_yaml(self.config_file, {"format": FORMAT, "asked": asked, "plan": plan})

    def write_events(self, events: list[dict]) -> None:
        """The run's events (a resumed run's replace the earlier segment's); no file when there were none."""
        self.events_file.unlink(missing_ok=True)
        if events:
            tmp = self.events_file.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in events))
            tmp.replace(self.events_file)

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics_file, metrics)

    def save_model(self, model, tokenizer, chat_template: str | None, generation_config) -> None:
        """The PEFT adapter, the tokenizer (with the template training used, where it has its own) and the
        generation config."""
        model.save_pretrained(self.path)
        if chat_template:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(self.path)
        generation_config.save_pretrained(self.path)
