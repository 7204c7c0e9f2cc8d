"""What every benchmark run measures, the same way whichever library trains it (speedtune.benchmarking.worker for
`speedtune train`, speedtune.benchmarking.baselines for Unsloth's and TRL's own trainers): plain listener objects that
get the Trainer's events, and the result fields made from them.

Timing: device-synchronised timestamps at each step's end; the steps after warm-up up to the profiled window are timed.
Real tokens: speedtune's StepTrainer logs its cumulative count of non-padding tokens (`num_tokens`); for the baselines
`TokenCount` counts them as they enter the model's training forwards (Unsloth's trainer logs no count). Kernel time:
torch.profiler over the last steps (speedtune.benchmarking.profiling), the device kernels' summed time divided by the
real tokens of those steps. Eval loss: the held-out rows, one row a forward (no padding, so no layout choice enters),
cross-entropy over the trained positions in fp32, the time it takes left out of the timings."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from pathlib import Path

from speedtune import hardware
from speedtune.training import fit


class Timer:
    """on_step_end: device-synchronised timestamps; on_log: losses, gradient norms and the cumulative real-token
    count. Time spent in `exclude` (evaluation) is taken out of the timestamps."""

    def __init__(self, sync):
        self.sync, self.times, self.losses, self.grad_norms, self.tokens = sync, [], [], [], []
        self.excluded = 0.0

    def now(self) -> float:
        self.sync()
        return time.perf_counter() - self.excluded

    def on_train_begin(self, args, state, control, **kw):
        self.times.append(self.now())

    def on_step_end(self, args, state, control, **kw):
        self.times.append(self.now())

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            norm = logs.get("grad_norm")
            self.grad_norms.append(float(norm) if norm is not None else None)
            self.tokens.append(float(logs.get("num_tokens", 0.0)))


class TokenCount:
    """The real tokens through a model's training forwards: the attention mask's ones, or every token of a
    padding-free batch (one sequence, no padding). Kept on the device (no sync per forward); put into each step's
    logs as `num_tokens`, before the Timer reads them. Evaluation forwards (eval mode) are not counted."""

    def __init__(self, model):
        self.total = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            self.total = self.total + mask.sum()
        elif ids is not None:
            self.total = self.total + ids.numel()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs:
            logs["num_tokens"] = float(self.total)


class HeldOutEval:
    """Every `every` steps, and after the last one: the mean cross-entropy over the held-out rows' trained tokens.
    Not while `profiler` records (its kernel time is the training steps'): the last eval runs at the end of
    training, after the profiled window."""

    def __init__(self, rows: list[dict], every: int, timer: Timer, dtype=None, profiler=None):
        self.rows, self.every, self.timer, self.dtype, self.profiler = rows, every, timer, dtype, profiler
        self.curve: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kw):
        p = self.profiler
        recording = p is not None and p.prof is not None and p.summary is None
        if model is not None and state.global_step % self.every == 0 and state.global_step < state.max_steps \
                and not recording:
            self._eval(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kw):
        if model is not None and (not self.curve or self.curve[-1]["step"] != state.global_step):
            self._eval(model, state.global_step)

    def _eval(self, model, step: int) -> None:
        t0 = self.timer.now()
        self.curve.append({"step": step, "eval_loss": eval_loss(model, self.rows, self.dtype)})
        self.timer.excluded += self.timer.now() - t0


def eval_loss(model, rows: list[dict], dtype=None) -> float:
    import torch

    device = next(p for p in model.parameters()).device
    cast = torch.autocast(device.type, dtype=dtype) if dtype is not None and device.type == "cuda" else \
        contextlib.nullcontext()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), cast:
            for r in rows:
                ids = torch.tensor([r["input_ids"]], device=device)
                target = torch.tensor(r["labels"][1:], device=device)
                logits = model(input_ids=ids).logits[0, :-1].float()
                keep = target != -100
                total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def listeners_callback(listeners):
    """A TrainerCallback that forwards the Trainer's events to plain listener objects (for trainers that are not
    speedtune's, which forwards them itself)."""
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        pass

    for event in ("on_train_begin", "on_step_end", "on_log", "on_train_end"):
        def forward(self, args, state, control, _e=event, **kw):
            for listener in listeners:
                fn = getattr(listener, _e, None)
                if fn is not None:
                    fn(args, state, control, **kw)
        setattr(Forward, event, forward)
    return Forward()


def timed_fields(timer: Timer, warmup: int, end: int, profiler=None, held_out: HeldOutEval | None = None) -> dict:
    """The result fields a run's listeners measured: steps warmup+1..end timed; the profiled steps after them."""
    times, tokens = timer.times, timer.tokens
    if len(times) <= end or len(tokens) < end:
        raise RuntimeError(f"the trainer reported {len(times) - 1} step ends and {len(tokens)} logged losses; the "
                           f"timing needs {end} (logging every step)")
    dt = times[end] - times[warmup]
    real = tokens[end - 1] - (tokens[warmup - 1] if warmup > 0 else 0.0)
    if real <= 0:
        raise RuntimeError("the trainer logged no real-token count (num_tokens) over the timed steps")
    bad = [i + 1 for i, (loss, g) in enumerate(zip(timer.losses, timer.grad_norms))
           if not math.isfinite(loss) or (g is not None and not math.isfinite(g))]
    out = {"timed_steps": end - warmup, "s_per_step": dt / (end - warmup), "real_tokens_per_s": real / dt,
           "tokens_per_s": real / dt, "losses": timer.losses, "grad_norms": timer.grad_norms,
           "first_loss": timer.losses[0], "last_loss": timer.losses[-1], "nonfinite_steps": bad,
           "real_tokens": tokens[-1], "gpu_kernel_s_per_1k_tokens": None}
    if profiler is not None and profiler.summary:
        s = profiler.summary
        out["profile"] = s
        window = tokens[profiler.start + profiler.steps - 1] - tokens[profiler.start - 1]
        if s.get("kernel_s") and window > 0:
            out["gpu_kernel_s_per_1k_tokens"] = s["kernel_s"] / window * 1000
    if held_out is not None:
        out["eval_curve"] = held_out.curve
        out["final_eval_loss"] = held_out.curve[-1]["eval_loss"] if held_out.curve else None
    return out


def memory_fields(cuda: bool) -> dict:
    if not cuda:
        return {"peak_alloc_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_reserved_gb": None}
    import torch

    return {"peak_alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


def mfu_fields(model_path: str, real_tokens_per_s: float, real: int, sum_sq: int, cuda: bool) -> dict:
    """MFU against the bf16 matmul rate measured on this GPU (model FLOPs: speedtune.benchmarking.worker's note)."""
    if not cuda:
        return {}

    peak = hardware.matmul_tflops("bfloat16", n=8192)
    if not peak:
        return {}
    s = fit.shape(model_path)
    per_token = 4 * fit.linear_params(s) + 6 * s["layers"] * s["hidden"] * sum_sq / max(real, 1)
    tflops = real_tokens_per_s * per_token / 1e12
    return {"measured_peak_tflops": peak, "model_tflops": tflops, "mfu": tflops / peak}


def listeners_for(spec: dict, cuda: bool, dtype=None) -> tuple:
    """(timer, profiler or None, held-out eval or None, the last timed step) for a run spec
    (speedtune.benchmarking.runner.spawn)."""
    suite = spec["suite"]
    timer = Timer(_sync(cuda))
    end, profiler, held = suite["steps"], None, None
    if spec.get("profile_steps"):
        from speedtune.benchmarking.profiling import StepProfiler

        end = suite["steps"] - spec["profile_steps"]
        profiler = StepProfiler(Path(spec["output"]).parent / f"profile-{spec['run']['name']}.txt", start=end,
                                steps=spec["profile_steps"])
    if spec.get("eval_examples"):
        rows = [json.loads(x) for x in Path(spec["eval_examples"]).read_text().splitlines() if x.strip()]
        held = HeldOutEval(rows, suite["eval_steps"], timer, dtype, profiler)
    return timer, profiler, held, end


def ordered(timer, profiler, held) -> list:
    """The listeners in the order they must see each event: the timestamp first, then the eval (its time is taken
    out of the next step's), then the profiler (so an eval never runs inside its window)."""
    return [x for x in (timer, held, profiler) if x is not None]


def _sync(cuda: bool):
    if cuda:
        import torch

        return torch.cuda.synchronize
    return lambda: None
