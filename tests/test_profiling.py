from types import SimpleNamespace

import torch

from speedtune.profiling import StepProfiler


def test_profiler_records_the_steps_it_was_asked_for(tmp_path):
    """On a CPU: the steps between `start` and `start + steps` are profiled, the report names the busiest ops, and
    the summary reports no device time (no GPU here)."""
    prof = StepProfiler(tmp_path / "p.txt", start=2, steps=2)
    x = torch.randn(256, 256)
    for step in range(1, 6):
        for _ in range(5):
            x = torch.tanh(x @ x)
        prof.on_step_end(None, SimpleNamespace(global_step=step), None)
    s = prof.summary
    assert s["profiled_steps"] == 2 and s["wall_s_per_step"] > 0
    assert s["device_busy_s_per_step"] == 0 and s["kernels_per_step"] == 0
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("2 steps from step 2") and "aten::mm" in text and "by host time" in text
