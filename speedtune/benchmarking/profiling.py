"""Where a training step's time goes: torch.profiler over a few steps of a real run (`speedtune bench --profile`).
A listener like the benchmark's timer: it starts after warm-up, records `steps` steps, then writes a text report
(the busiest ops by device time and by host time) and returns a summary: wall seconds per step, the seconds per
step the device spent in kernels, kernels launched per step, and the share of the wall time the device was busy.
A step whose device is busy for a small share of its wall time is bound by the host (Python, kernel launches,
syncs), not by the GPU's arithmetic: more tokens per pass cost little, more passes cost a lot.

`kernel_s` is the summed time of the device kernels over the profiled steps (copies and memsets left out): on a slower
GPU (a T4 has ~1/15 of an H200's compute and memory bandwidth) that is what a step costs, the host's time hiding
behind it. The profiler's CUDA tracing (CUPTI) is started once before the first step, so that kernels replayed from
CUDA graphs captured later are recorded one by one."""

from __future__ import annotations

import os
import time
from pathlib import Path


class StepProfiler:
    def __init__(self, path: Path, start: int, steps: int = 3):
        self.path, self.start, self.steps = Path(path), start, steps
        # SPEEDTUNE_PROFILE_DETAIL=1: the report also lists the ops by input shape and by Python stack (costs host time
        # in the profiled steps only, which are not timed)
        self.detail = os.environ.get("SPEEDTUNE_PROFILE_DETAIL") == "1"
        self.prof, self.t0, self.summary = None, 0.0, None

    def on_train_begin(self, args, state, control, **kw):
        import torch

        if torch.cuda.is_available():  # CUPTI up before any graph is captured (see the module's note)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]):
                torch.ones(1, device="cuda").add_(1)
                torch.cuda.synchronize()

    def _sync(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kw):
        import torch
        from torch.profiler import ProfilerActivity, profile

        if state.global_step == self.start and self.prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, record_shapes=self.detail, with_stack=self.detail)
            self._sync()
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and self.summary is None and state.global_step == self.start + self.steps:
            self._sync()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.summary = self._report(wall)

    def _report(self, wall: float) -> dict:
        from torch.autograd import DeviceType

        kernels = [e for e in self.prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6  # the kernels of one stream run one after another
        compute = [e for e in kernels if not e.name.startswith(("Memcpy", "Memset"))]
        kernel_s = sum(e.device_time for e in compute) / 1e6
        n = self.steps
        summary = {"profiled_steps": n, "wall_s_per_step": wall / n, "device_busy_s_per_step": busy / n,
                   "device_busy_share": busy / wall if wall else 0.0, "kernels_per_step": len(compute) / n,
                   "kernel_s": kernel_s}
        table = self.prof.key_averages()
        text = [f"{n} steps from step {self.start}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()), ""]
        if kernels:
            text += ["by device time", table.table(sort_by="self_device_time_total", row_limit=25), ""]
        text += ["by host time", table.table(sort_by="self_cpu_time_total", row_limit=25)]
        if self.detail:
            by = "self_device_time_total" if kernels else "self_cpu_time_total"
            for title, table in (("input shapes", self.prof.key_averages(group_by_input_shape=True)),
                                 ("Python stack", self.prof.key_averages(group_by_stack_n=6))):
                text += ["", f"by {by.split('_')[1]} time and {title}",
                         table.table(sort_by=by, row_limit=40, max_name_column_width=40)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(text))
        return summary
