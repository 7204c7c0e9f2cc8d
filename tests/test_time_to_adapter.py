"""Where the time to a saved adapter goes: `speedtune train` writes the breakdown of its whole command (Python's
start and imports, data, plan, model load, trainer, training steps, pass-graph recording, saving) into the run
folder's metrics.json, and the phases add up to the command's time."""

from __future__ import annotations

import json
import sys
import time

from conftest import cli

from speedtune.paths import demo_dir
from speedtune.training.runlog import Phases, process_age_s

PHASES = ["imports_s", "data_s", "plan_s", "load_s", "trainer_s", "train_s", "save_s"]


def test_the_run_folder_has_the_commands_phases(tiny_model, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    r = cli("train", "--model", tiny_model, "--data", demo_dir() / "identity.jsonl", "--max-steps", "2",
            "--seq-len", "128", "--output", out)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr
    phases = json.loads((out / "metrics.json").read_text())["phases"]
    assert list(phases) == [*PHASES, "total_s"]  # on a CPU no pass graphs: no capture phase
    assert all(phases[k] >= 0 for k in PHASES)
    assert phases["imports_s"] > 0.5 and phases["train_s"] > 0 and phases["load_s"] > 0  # torch alone takes seconds
    assert abs(sum(phases[k] for k in PHASES) - phases["total_s"]) < 0.01
    assert phases["total_s"] < elapsed  # counted from the process's start to the adapter, before it exits


def test_phases_count_from_the_process_start_only_for_a_command():
    assert 0 < process_age_s() < 24 * 3600
    mine = Phases(from_process_start=True)
    here = Phases()
    time.sleep(0.01)
    mine.mark("imports")
    here.mark("imports")
    assert mine.s["imports_s"] > here.s["imports_s"] >= 0.01
    here.mark("train")
    train = here.s["train_s"]
    here.move(0.5, "train", "capture")  # recording happens inside the steps: booked apart, never below zero
    assert here.s["train_s"] == 0 and here.s["capture_s"] == train
    d = here.as_dict()
    assert abs(sum(v for k, v in d.items() if k != "total_s") - d["total_s"]) < 0.01
    assert sys.platform != "linux" or mine.as_dict()["total_s"] > d["total_s"]
