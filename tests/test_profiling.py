from types import SimpleNamespace

import torch

from speedtune.benchmarking.profiling import StepProfiler


def test_profiler_records_the_steps_it_was_asked_for(tmp_path):
    """On a CPU: the steps between `start` and `start + steps` are profiled, the report names the busiest ops, and
    the summary reports no device time (no GPU here)."""
    prof = StepProfiler(tmp_path / "p.txt", start=2, steps=2)
    prof.on_train_begin(None, SimpleNamespace(global_step=0), None)  # starts the CUDA tracing where there is a GPU
    x = torch.randn(256, 256)
    for step in range(1, 6):
        for _ in range(5):
            x = torch.tanh(x @ x)
        prof.on_step_end(None, SimpleNamespace(global_step=step), None)
    s = prof.summary
    assert s["profiled_steps"] == 2 and s["wall_s_per_step"] > 0
    assert s["device_busy_s_per_step"] == 0 and s["kernels_per_step"] == 0 and s["kernel_s"] == 0
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("2 steps from step 2") and "aten::mm" in text and "by host time" in text


def test_detail_lists_the_ops_by_shape_and_by_stack(tmp_path, monkeypatch):
    """SPEEDTUNE_PROFILE_DETAIL=1: the report also groups the ops by input shape and by the Python line that ran them."""
    monkeypatch.setenv("SPEEDTUNE_PROFILE_DETAIL", "1")
    prof = StepProfiler(tmp_path / "p.txt", start=1, steps=1)
    x = torch.randn(128, 96)
    for step in range(1, 3):
        y = torch.tanh(x @ x.t())
        prof.on_step_end(None, SimpleNamespace(global_step=step), None)
    text = (tmp_path / "p.txt").read_text()
    assert "by cpu time and input shapes" in text and "[[128, 96], [96, 128]]" in text
    assert "by cpu time and Python stack" in text and "test_profiling.py" in text
    assert y.shape == (128, 128)


def test_kernel_time_per_token_is_over_the_profiled_steps_and_their_tokens():
    """The bench's GPU-kernel seconds per 1,000 real tokens: the profiled steps' kernel time over the real tokens
    trained in exactly those steps (the trainer's cumulative count at their ends), not the run's."""
    from speedtune.benchmarking.timing import Timer, timed_fields

    timer = Timer(lambda: None)
    timer.times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    timer.losses, timer.grad_norms = [2.0] * 6, [1.0] * 6
    timer.tokens = [100.0, 250.0, 400.0, 500.0, 700.0, 1000.0]  # cumulative after steps 1..6
    prof = SimpleNamespace(start=4, steps=2, summary={"kernel_s": 0.25})
    f = timed_fields(timer, warmup=1, end=4, profiler=prof)
    assert f["timed_steps"] == 3 and f["real_tokens_per_s"] == (500 - 100) / 3
    assert f["gpu_kernel_s_per_1k_tokens"] == 0.25 / (1000 - 500) * 1000
    timer.losses[2] = float("nan")
    assert timed_fields(timer, warmup=1, end=4)["nonfinite_steps"] == [3]
