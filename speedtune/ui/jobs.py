"""The training run behind the Train tab: the real `speedtune train` command in its own process (so the page stays
responsive and the run folder and its train_log.jsonl are exactly the CLI's), one at a time per server, watched
through the log it appends to, stopped with SIGINT (the CLI saves a checkpoint and exits 130)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from speedtune import paths
from speedtune.errors import UserError
from speedtune.runs import RunFolder

INTERRUPTED = 130  # the CLI's exit code after Ctrl-C (a checkpoint was saved)


@dataclass
class Job:
    run: Path
    cmd: list[str]
    proc: subprocess.Popen
    output_file: Path  # the CLI's stdout and stderr, kept outside the run folder
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    ended: float | None = None  # when the page first saw it exit

    @property
    def elapsed_s(self) -> float:
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.time()
        return (self.ended or time.time()) - self.started

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self, lines: int = 20) -> str:
        try:
            text = self.output_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "\n").rstrip().splitlines()[-lines:])

    def error_line(self) -> str:
        """Why it failed: the CLI's one-line `error: ...` when it printed one, else its last line."""
        lines = [ln.strip() for ln in self.output_tail(400).splitlines() if ln.strip()]
        for ln in reversed(lines):
            if ln.startswith("error:"):
                return ln[len("error:"):].strip()
        return lines[-1] if lines else f"speedtune train exited with {self.proc.returncode}"


class Trainer:
    """At most one training process per server: a second start (another tab) is refused while one runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self.job: Job | None = None

    def start(self, args: list[str], run: Path) -> Job:
        with self._lock:
            if self.job is not None and self.job.running:
                raise UserError(f"a training run is already running ({self.job.run}); stop it or wait for it to end")
            logs = paths.home() / "ui" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            output_file = logs / f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            cmd = [sys.executable, "-m", "speedtune", "train", *args]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
            with output_file.open("wb") as out:
                # a session of its own: Ctrl-C in the server's terminal does not reach it; stop() does
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            self.job = Job(run, cmd, proc, output_file)
            return self.job

    def stop(self) -> Job:
        with self._lock:
            job = self.job
            if job is None or not job.running:
                raise UserError("no training run is running")
            job.stop_requested = True
            job.proc.send_signal(signal.SIGINT)
            return job

    def shutdown(self, timeout: float = 60) -> None:
        """On server exit: interrupt a running job so that it saves a checkpoint (Resume continues it later)."""
        job = self.job
        if job is not None and job.running:
            job.proc.send_signal(signal.SIGINT)
            try:
                job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                job.proc.kill()


@dataclass
class Progress:
    """What train_log.jsonl says so far: one loss per step (a resumed run's steps replace the earlier ones)."""
    max_steps: int | None = None
    losses: dict[int, float] = field(default_factory=dict)
    evals: dict[int, float] = field(default_factory=dict)
    times: list[tuple[int, float]] = field(default_factory=list)  # (step, seconds since this segment's begin)
    begun: bool = False
    ended: bool = False

    @property
    def step(self) -> int:
        return max(self.losses, default=0)

    def eta_s(self) -> float | None:
        """Seconds left, from the step rate after the first (warm-up) step of the current segment."""
        if len(self.times) < 2 or not self.max_steps:
            return None
        (s0, t0), (s1, t1) = self.times[0], self.times[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (self.max_steps - s1) * (t1 - t0) / (s1 - s0)


def read_log(run: Path) -> Progress:
    p = Progress()
    try:
        text = RunFolder(run).train_log.read_text()
    except OSError:
        return p
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        event = rec.get("event")
        if event == "begin":
            p.begun, p.ended, p.times = True, False, []
            p.max_steps = rec.get("max_steps") or p.max_steps
        elif event == "step":
            p.losses[int(rec["step"])] = float(rec["loss"])
            p.max_steps = rec.get("max_steps") or p.max_steps
            p.times.append((int(rec["step"]), float(rec.get("time_s") or 0)))
        elif event == "eval":
            p.evals[int(rec["step"])] = float(rec["eval_loss"])
        elif event == "end":
            p.ended = True
    return p


TRAINER = Trainer()
