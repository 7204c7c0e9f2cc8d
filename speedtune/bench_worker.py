"""One benchmark run, in its own process (Unsloth patches transformers globally): the real `speedtune.train.train`
on the suite's rows, with a timing listener. Writes a JSON result: real (non-padding) tokens/s over the timed steps,
seconds per step, time to a saved adapter (from the parent's spawn to the adapter file on disk), peak memory, MFU,
per-step losses, and what actually ran (the plan, checkpointing as the model reports it).

MFU counts the model's FLOPs per step, not the hardware's: 4 x N_linear per trained token (the forward, and the
backward to the activations; the frozen base gets no weight gradient, LoRA's are negligible) plus causal attention,
6 x layers x hidden x n^2 per row of n tokens (forward and backward); recomputation and padding are not counted.
The peak is measured on the same GPU in the same process: a large bf16 matmul."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Timer:
    """on_step_end: device-synchronised timestamps; on_log: losses and the cumulative real-token count."""

    def __init__(self, sync):
        self.sync, self.times, self.losses, self.tokens = sync, [], [], []

    def on_train_begin(self, args, state, control, **kw):
        self.sync()
        self.times.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.sync()
        self.times.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.tokens.append(logs.get("num_tokens", 0.0))


def flops_per_token(shape: dict, real_tokens: int, sum_sq_lengths: int) -> float:
    """Model FLOPs per trained token over a run whose rows had these token counts (see the module's note)."""
    from speedtune.fit import linear_params

    return 4 * linear_params(shape) + 6 * shape["layers"] * shape["hidden"] * sum_sq_lengths / max(real_tokens, 1)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run, suite = spec["run"], spec["suite"]
    from speedtune.config import RunConfig

    keys = ("batch_size", "grad_accum", "gradient_checkpointing", "offload_embeddings", "loss_chunk_gb", "fit", "optim",
            "cuda_graphs", "step_graphs", "padding_free", "memory_cap_gb")
    # (a run's `processes` is how bench.spawn launched it: torchrun's ranks, seen here as distributed.world())
    asked = dict(model=spec["model_path"], data=spec["data_path"], output=spec["output"], seq_len=suite["seq_len"],
                 batch_size=suite["batch_size"], grad_accum=suite["grad_accum"], lora_r=suite["lora_r"],
                 lora_alpha=suite["lora_alpha"], load_in_4bit=suite["load_in_4bit"] if spec["cuda"] else False,
                 max_steps=suite["steps"], save_steps=10**6, backend=run["backend"], fit="off",
                 memory_cap_gb=suite.get("memory_cap_gb"), precision=suite.get("precision", "auto"),
                 device=suite.get("device", "auto"))
    asked.update({k: run[k] for k in keys if k in run})  # a run's own settings: asked for, so they must hold
    cfg = RunConfig(**asked)
    import torch

    from speedtune import distributed, fit, hardware
    from speedtune.train import train

    sync = torch.cuda.synchronize if spec["cuda"] else (lambda: None)
    timer = Timer(sync)
    listeners = [timer]
    end = suite["steps"]  # the last timed step
    if suite.get("profile"):  # after the timed steps: the profiler's own cost stays out of the timings
        from speedtune.profiling import StepProfiler

        end = suite["steps"] - 3
        listeners.append(StepProfiler(Path(spec["output"]).parent / f"profile-{run['name']}.txt", start=end))
    try:
        out = train(cfg, overwrite=True, show_progress=False, listeners=listeners)
    except torch.OutOfMemoryError:
        Path(out_path).write_text(json.dumps({"oom": True, "seq_len": suite["seq_len"]}))
        sys.exit(3)
    if not distributed.world().main:  # data parallel: rank 0 reports (the token counts are the whole step's)
        return
    adapter = next(out.glob("adapter_model.*"))
    metrics = json.loads((out / "metrics.json").read_text())
    plan = __import__("yaml").safe_load((out / "run_config.yaml").read_text())["plan"]
    w = suite["warmup_steps"]
    times, tokens = timer.times, timer.tokens
    steps = end - w
    dt = times[end] - times[w]
    real = tokens[end - 1] - (tokens[w - 1] if w > 0 else 0.0)
    rows = [json.loads(x) for x in Path(spec["data_path"]).read_text().splitlines()]
    result = {
        "name": run["name"], "backend": plan["backend"], "fit": plan["fit"], "layout": plan["layout"],
        "micro_batch": plan["micro_batch"], "grad_accum": plan["rows_per_step"] // plan["micro_batch"],
        "token_budget": plan["token_budget"], "gradient_checkpointing": plan["gradient_checkpointing"],
        "cuda_graphs": plan.get("cuda_graphs", False), "pad_multiple": plan.get("pad_multiple"),
        "step_graphs": plan.get("step_graphs", False), "graphs": metrics.get("step_graphs"),
        "padding_free": plan.get("padding_free", False),
        "checkpointing_reported_by_model": metrics["gradient_checkpointing"],
        "memory_cap_gb": cfg.memory_cap_gb, "label_logits": plan.get("label_logits", False),
        "offload_embeddings": plan["offload_embeddings"], "loss_chunk_gb": plan["loss_chunk_gb"], "optim": plan["optim"],
        "timed_steps": steps, "s_per_step": dt / steps, "real_tokens_per_s": real / dt,
        "tokens_per_s": real / dt, "padding_share": 1 - metrics["real_tokens"] / max(metrics["padded_tokens"], 1),
        "passes_per_step": metrics["passes"] / max(metrics["steps"], 1),
        "time_to_adapter_s": adapter.stat().st_mtime - spec["spawned_at"], "load_s": metrics["load_s"],
        "peak_alloc_gb": metrics.get("peak_alloc_gb", metrics.get("peak_rss_gb")),
        "peak_reserved_gb": metrics.get("peak_reserved_gb"), "losses": timer.losses,
        "first_loss": timer.losses[0], "last_loss": timer.losses[-1], "device": metrics["device"],
        "dtype": metrics["dtype"], "versions": metrics["versions"], "rows": len(rows),
        "processes": metrics.get("processes", 1),
    }
    if len(listeners) > 1 and listeners[1].summary:
        result["profile"] = listeners[1].summary
    result["real_tokens_per_s_per_process"] = result["real_tokens_per_s"] / result["processes"]
    peak = hardware.matmul_tflops("bfloat16", n=8192) if spec["cuda"] else None
    if peak:
        per_token = flops_per_token(fit.shape(spec["model_path"]), metrics["real_tokens"], metrics["sum_sq_lengths"])
        tflops = result["real_tokens_per_s"] * per_token / 1e12
        result.update(measured_peak_tflops=peak, model_tflops=tflops, mfu=tflops / peak)
    Path(out_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
