"""What a run records while it trains: a rich progress bar with ETA and live loss, per-step metrics, peak memory,
and the loss-curve picture written at the end. `RunLog` is a plain listener (no transformers import here):
speedtune.training.trainer forwards the Trainer's events to it."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), so a run's time counts Python's start and its imports."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): start time after boot
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return None


class CountedLog:
    """A Trainer mixin: each logged step carries the real (`num_tokens`: the progress and tokens/s read it) and
    padded token counts the subclass keeps (speedtune.training.trainer's and speedtune.training.preference's)."""

    real_tokens = padded_tokens = 0

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs["num_tokens"] = float(self.real_tokens)
            logs["padded_tokens"] = float(self.padded_tokens)
        super().log(logs, start_time)


class Phases:
    """Where a run's wall time goes (metrics.json `phases`): `mark(name)` closes the phase that ran since the last
    mark as `<name>_s`. With `from_process_start` (the CLI: the process is the run) the first phase counts from the
    process's start, Python's own start and imports included; else (a run started from Python) from here."""

    def __init__(self, from_process_start: bool = False):
        age = (process_age_s() or 0.0) if from_process_start else 0.0
        self.start = self.last = time.perf_counter() - age
        self.s: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        key = f"{name}_s"
        self.s[key] = self.s.get(key, 0.0) + now - self.last
        self.last = now

    def move(self, seconds: float, src: str, dst: str) -> None:
        """Book `seconds` of phase `src` under `dst` (pass-graph recording happens inside the training steps)."""
        seconds = min(seconds, self.s.get(f"{src}_s", 0.0))
        self.s[f"{src}_s"] = self.s.get(f"{src}_s", 0.0) - seconds
        self.s[f"{dst}_s"] = self.s.get(f"{dst}_s", 0.0) + seconds

    def as_dict(self) -> dict:
        return {**{k: round(v, 3) for k, v in self.s.items()}, "total_s": round(self.last - self.start, 3)}


def peak_memory_gb(device: str) -> dict:
    if device == "cuda":
        import torch

        return {"peak_alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# what a step's record keeps beside the loss where the trainer logs it: preference training's reward margins and
# accuracies (DPO) or log-odds (ORPO), TRL's names (speedtune.training.preference)
RECORDED = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected", "log_odds_ratio", "log_odds_chosen", "nll_loss")


class RunLog:
    """Collects loss, eval loss, learning rate and tokens/s per step; shows a progress bar; appends each record to
    `train_log.jsonl` in the run folder as it happens (what `speedtune ui` and other watchers read)."""

    def __init__(self, console=None, show: bool = True, log_file: Path | None = None):
        self.log_file = log_file
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.console, self.show = console, show
        self.progress = self.task = None
        self.t0 = self.t_first = None
        self.tokens_first = 0
        self.last_tokens = 0

    def _append(self, record: dict) -> None:
        if self.log_file is not None:
            with self.log_file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        self._append({"event": "begin", "step": state.global_step, "max_steps": state.max_steps, "time": time.time()})
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[loss]}"), console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, loss="")

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        now = time.perf_counter()
        if "loss" in logs:
            tokens = logs.get("num_tokens", 0)
            if self.t_first is None:  # the first step is warm-up: rates are timed from its end
                self.t_first, self.tokens_first = now, tokens
            self.steps.append({"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                               "grad_norm": logs.get("grad_norm"), "num_tokens": tokens, "time_s": now - self.t0,
                               **{k: logs[k] for k in RECORDED if k in logs}})
            self.last_tokens = tokens
            self._append({"event": "step", "max_steps": state.max_steps, **self.steps[-1]})
            if self.progress:
                margin = f" · margin {logs['rewards/margins']:.3f}" if "rewards/margins" in logs else ""
                self.progress.update(self.task, completed=state.global_step, loss=f"loss {logs['loss']:.4f}{margin}")
        if "eval_loss" in logs:
            self.evals.append({"step": state.global_step, "eval_loss": logs["eval_loss"],
                               **{k: logs[f"eval_{k}"] for k in RECORDED if f"eval_{k}" in logs}})
            self._append({"event": "eval", **self.evals[-1]})
            if self.progress:
                self.progress.console.print(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kw):
        self._append({"event": "end", "step": state.global_step, "time": time.time()})
        self.close()

    def close(self):
        if self.progress:
            self.progress.stop()
            self.progress = None

    def tokens_per_s(self) -> float | None:
        """Real (non-padding) tokens per second after the first (warm-up) step."""
        if self.t_first is None or len(self.steps) < 2:
            return None
        dt = self.steps[-1]["time_s"] - (self.t_first - self.t0)
        tokens = self.last_tokens - self.tokens_first
        return tokens / dt if dt > 0 and tokens else None


def loss_plot(steps: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", color="#1f77b4")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
