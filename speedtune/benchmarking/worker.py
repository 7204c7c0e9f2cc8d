"""One benchmark run of `speedtune train`, in its own process (Unsloth patches transformers globally): the real
`speedtune.training.train.train` on the suite's rows, with the harness's listeners (speedtune.benchmarking.timing).
Writes a JSON result: real (non-padding) tokens/s over the timed steps, seconds per step, GPU-kernel seconds per 1,000
real tokens, time to a saved adapter (from the parent's spawn to the adapter file on disk), peak allocated and reserved
memory, MFU, per-step losses and gradient norms, the held-out eval curve, and what actually ran (the plan, checkpointing
as the model reports it). A run that fails writes its one-line error instead (`failed`, `error`), its traceback going to
the run's log; one that runs out of memory writes `oom`.

MFU counts the model's FLOPs per step, not the hardware's: 4 x N_linear per trained token (the forward, and the
backward to the activations; the frozen base gets no weight gradient, LoRA's are negligible) plus causal attention,
6 x layers x hidden x n^2 per row of n tokens (forward and backward); recomputation and padding are not counted.
The peak is measured on the same GPU in the same process: a large bf16 matmul."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from speedtune.benchmarking.suite import RUN_KEYS
from speedtune.benchmarking.timing import listeners_for, mfu_fields, ordered, timed_fields
from speedtune.runs import RunFolder
from speedtune.training import distributed
from speedtune.training.config import FIELDS, RunConfig, coerce


def config(spec: dict):
    """The RunConfig the suite and the run ask for: every setting the run names must be what runs."""
    run, suite = spec["run"], spec["suite"]
    # (a run's `processes` is how bench.spawn launched it: torchrun's ranks, seen here as distributed.world())
    asked = dict(model=spec["model_path"], data=spec["data_path"], output=spec["output"], seq_len=suite["seq_len"],
                 batch_size=suite["batch_size"], grad_accum=suite["grad_accum"], lora_r=suite["lora_r"],
                 lora_alpha=suite["lora_alpha"], load_in_4bit=suite["load_in_4bit"] if spec["cuda"] else False,
                 max_steps=suite["steps"], save_steps=10**6, fit="off", memory_cap_gb=suite.get("memory_cap_gb"),
                 precision=suite.get("precision", "auto"), device=suite.get("device", "auto"),
                 seed=suite.get("seed", 3407), optim=suite.get("optim"), format=suite.get("format"),
                 columns=suite.get("columns"), template=suite.get("template"), drop_bad=suite.get("drop_bad", False),
                 method=suite.get("method", "sft"))
    asked.update({k: coerce(k, v, f"run {run['name']}") for k, v in run.items() if k not in RUN_KEYS and k in FIELDS})
    return RunConfig(**asked)


def measure(spec: dict) -> dict | None:
    cfg = config(spec)
    run, suite = spec["run"], spec["suite"]
    import torch

    from speedtune.training.train import train

    cuda = spec["cuda"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if cuda else None
    if cuda and dtype is None and cfg.precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    timer, profiler, held, end = listeners_for(spec, cuda, dtype)
    out = train(cfg, overwrite=True, show_progress=False, listeners=ordered(timer, profiler, held))
    if not distributed.world().main:  # data parallel: rank 0 reports (the token counts are the whole step's)
        return None
    adapter = next(out.glob("adapter_model.*"))
    folder = RunFolder(out)
    metrics, plan = folder.metrics(), folder.plan_as_run()  # the plan as it ran (events applied)
    result = {
        "name": run["name"], "kind": "speedtune", "backend": plan["backend"], "fit": plan["fit"],
        "layout": plan["layout"], "micro_batch": plan["micro_batch"],
        "grad_accum": plan["rows_per_step"] // plan["micro_batch"], "token_budget": plan["token_budget"],
        "gradient_checkpointing": plan["gradient_checkpointing"], "cuda_graphs": plan.get("cuda_graphs", False),
        "pad_multiple": plan.get("pad_multiple"), "step_graphs": plan.get("step_graphs", False),
        "graphs": metrics.get("step_graphs"), "padding_free": plan.get("padding_free", False),
        "checkpointing_reported_by_model": metrics["gradient_checkpointing"], "memory_cap_gb": cfg.memory_cap_gb,
        "label_logits": plan.get("label_logits", False), "half_lora": plan.get("half_lora", False),
        "offload_embeddings": plan["offload_embeddings"],
        "loss_chunk_gb": plan["loss_chunk_gb"], "optim": plan["optim"], "seed": cfg.seed,
        "padding_share": 1 - metrics["real_tokens"] / max(metrics["padded_tokens"], 1),
        "passes_per_step": metrics["passes"] / max(metrics["steps"], 1),
        "time_to_adapter_s": adapter.stat().st_mtime - spec["spawned_at"], "load_s": metrics["load_s"],
        "phases": metrics.get("phases"),  # where the time to the adapter went (speedtune.training.runlog.Phases)
        "device": metrics["device"], "dtype": metrics["dtype"], "versions": metrics["versions"], "rows": spec["rows"],
        "processes": metrics.get("processes", 1),
        **timed_fields(timer, suite["warmup_steps"], end, profiler, held),
        **({"peak_alloc_gb": metrics.get("peak_rss_gb"), "peak_reserved_gb": None} if not cuda else
           {"peak_alloc_gb": metrics["peak_alloc_gb"], "peak_reserved_gb": metrics["peak_reserved_gb"]}),
    }
    result["real_tokens_per_s_per_process"] = result["real_tokens_per_s"] / result["processes"]
    if cfg.method != "sft":  # each step's reward margins / log-odds, as the preference baselines report them
        from speedtune.training.runlog import RECORDED

        result["method"] = cfg.method
        result["preference_curve"] = {k: [s[k] for s in metrics["loss"] if k in s] for k in RECORDED
                                      if any(k in s for s in metrics["loss"])}
    result.update(mfu_fields(spec["model_path"], result["real_tokens_per_s"], metrics["real_tokens"],
                             metrics["sum_sq_lengths"], cuda))
    return result


def main(spec_path: str, out_path: str, measure_fn=None) -> int:
    """Run the spec with `measure_fn` (this module's `measure`, or the baselines') and write its result, or what
    stopped it: the exit status."""
    spec = json.loads(Path(spec_path).read_text())
    name = spec["run"]["name"]
    try:
        result = (measure_fn or measure)(spec)
    except Exception as e:  # noqa: BLE001 - any failure: the run's one-line error, its traceback in the log
        from speedtune.errors import UserError

        if type(e).__name__ == "OutOfMemoryError":
            result, code = {"name": name, "oom": True, "seq_len": spec["suite"]["seq_len"]}, 3
        else:
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            error = first if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
            result, code = {"name": name, "failed": True, "error": error}, 1
        write(out_path, result)
        return code
    if result is not None:
        write(out_path, result)
    return 0


def write(path: str, result: dict) -> None:
    p = Path(path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(p)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
