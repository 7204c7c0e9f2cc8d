"""`speedtune bench`: the same recipe through each backend, each in a fresh process (Unsloth patches transformers
globally), on the same synthetic data with the same tokens per step; timed after warm-up with device
synchronisation. The reports (json, md, png under benchmarks/results/) are written by speedtune.bench_report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import yaml

from speedtune.errors import UserError

# Real configurations; speed and memory do not depend on the weights' values, so random weights of these shapes
# stand in where the real models can't be downloaded.
SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
}


@dataclass
class Suite:
    shape: str = "llama-3-8b"
    model: str | None = None  # a real model folder/alias instead of a random shape
    seq_len: int = 2048
    batch_size: int = 2
    grad_accum: int = 4
    lora_r: int = 16
    lora_alpha: int = 16
    load_in_4bit: bool = True
    warmup_steps: int = 3
    timed_steps: int = 5
    # each run: a name, a backend and a fit mode; "speedtune" is Unsloth with the automatic fit (speedtune.fit)
    runs: list = field(default_factory=lambda: [{"name": "peft", "backend": "peft", "fit": "off"},
                                                {"name": "unsloth", "backend": "unsloth", "fit": "off"},
                                                {"name": "speedtune", "backend": "unsloth", "fit": "auto"}])
    memory_cap_gb: float | None = None  # e.g. 15 with precision fp16: a T4-class profile
    precision: str = "auto"
    device: str = "auto"
    longest: bool = False  # search the longest sequence each run trains at (under memory_cap_gb)
    max_seq_len: int = 32768
    workdir: str = "/tmp/speedtune-bench"
    results: str = "benchmarks/results"


def load_suite(path: str | None, overrides: dict) -> Suite:
    data = {}
    if path:
        if not Path(path).is_file():
            raise UserError(f"suite file not found: {path}")
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(Suite.__dataclass_fields__)
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(Suite.__dataclass_fields__)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    suite = Suite(**data)
    if not suite.model and suite.shape not in SHAPES:
        raise UserError(f"unknown shape '{suite.shape}' (known: {', '.join(SHAPES)})")
    return suite


def build_shape(suite: Suite, device: str) -> Path:
    """A random-initialised model of a real configuration, built on the device and saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from speedtune.models import resolve_model

    out = Path(suite.workdir) / suite.shape
    if (out / "config.json").is_file():
        return out
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **SHAPES[suite.shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: an 8B model in fp32 would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp)
    del model
    tmp.rename(out)
    return out


RUN_OVERRIDES = ("batch_size", "grad_accum", "gradient_checkpointing", "offload_embeddings", "loss_chunk_gb")


def worker(spec_path: str, out_path: str) -> None:
    """One backend, in its own process: load, train warm-up + timed steps, report."""
    spec = json.loads(Path(spec_path).read_text())
    suite, run_spec = Suite(**spec["suite"]), spec["run"]
    backend = run_spec["backend"]
    from speedtune import hardware
    from speedtune.config import RunConfig
    from speedtune.train import apply_fit, apply_hardware_options, resolve_defaults

    hw = hardware.detect(None if suite.device == "auto" else suite.device)
    cfg = RunConfig(model=spec["model_path"], model_path=spec["model_path"], seq_len=suite.seq_len,
                    batch_size=suite.batch_size, grad_accum=suite.grad_accum, lora_r=suite.lora_r,
                    lora_alpha=suite.lora_alpha, load_in_4bit=suite.load_in_4bit if hw.device == "cuda" else False,
                    max_steps=suite.warmup_steps + suite.timed_steps, warmup_steps=0, backend=backend,
                    fit=run_spec.get("fit", "off"), memory_cap_gb=suite.memory_cap_gb, precision=suite.precision)
    hw = apply_hardware_options(cfg, hw)
    fitted = apply_fit(cfg, hw, backend=backend)
    for key in RUN_OVERRIDES:  # an explicit choice in the run's spec (e.g. to explore one the fit did not make)
        if key in run_spec:
            setattr(cfg, key, run_spec[key])
    resolve_defaults(cfg, hw)
    t0 = time.perf_counter()
    from speedtune import backends

    model, tokenizer = backends.load(backend, cfg, hw)
    load_s = time.perf_counter() - t0
    import torch

    resident_gb = torch.cuda.memory_allocated() / 2**30 if hw.device == "cuda" else None
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    sync = torch.cuda.synchronize if hw.device == "cuda" else (lambda: None)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    g = torch.Generator().manual_seed(1234)  # the same tokens for every backend
    n = cfg.batch_size * cfg.grad_accum * (cfg.max_steps + 1)
    ids = torch.randint(3, min(len(tokenizer), 49152), (n, suite.seq_len), generator=g).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = SFTConfig(output_dir=str(Path(suite.workdir) / f"ckpt-{run_spec['name']}"),
                     per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                     learning_rate=2e-4, max_steps=cfg.max_steps,
                     optim=cfg.optim, bf16=hw.dtype == "bfloat16", fp16=hw.dtype == "float16",
                     use_cpu=hw.device == "cpu", logging_steps=1, save_strategy="no", report_to="none",
                     max_length=suite.seq_len, disable_tqdm=True, seed=3407, dataloader_num_workers=0)
    timer = Timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    backends.after_trainer(backend, model, hw)
    if hw.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    timer.times.append(time.perf_counter())
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        Path(out_path).write_text(json.dumps({"oom": True, "seq_len": suite.seq_len}))
        sys.exit(3)
    steps = timer.times[suite.warmup_steps:]
    s_per_step = (steps[-1] - steps[0]) / (len(steps) - 1)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * suite.seq_len
    from speedtune.runlog import peak_memory_gb

    mem = peak_memory_gb(hw.device)
    result = {"name": run_spec["name"], "backend": backend, "fit": fitted, "micro_batch": cfg.batch_size,
              "grad_accum": cfg.grad_accum, "tokens_per_s": tokens_per_step / s_per_step, "s_per_step": s_per_step,
              "tokens_per_step": tokens_per_step, "load_s": load_s,
              "peak_alloc_gb": mem.get("peak_alloc_gb", mem.get("peak_rss_gb")),
              "peak_reserved_gb": mem.get("peak_reserved_gb"), "first_loss": timer.losses[0],
              "last_loss": timer.losses[-1], "losses": timer.losses, "device": hw.name, "dtype": hw.dtype,
              "optim": cfg.optim, "gradient_checkpointing": cfg.gradient_checkpointing,
              "offload_embeddings": bool(cfg.offload_embeddings), "loss_chunk_gb": cfg.loss_chunk_gb,
              "resident_gb": resident_gb}
    from speedtune.train import versions

    result["versions"] = versions(backend)
    Path(out_path).write_text(json.dumps(result, indent=2))


def _worker(suite: Suite, run_spec: dict, model_path: Path, console) -> dict:
    """One run in a fresh process; {"failed": ...} or {"oom": True} when it did not finish."""
    work = Path(suite.workdir)
    name = run_spec["name"]
    spec, out = work / f"spec-{name}.json", work / f"result-{name}.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"suite": asdict(suite), "run": run_spec, "model_path": str(model_path)}))
    proc = subprocess.run([sys.executable, "-m", "speedtune.bench", str(spec), str(out)], env=os.environ.copy())
    if out.is_file():
        return json.loads(out.read_text())
    return {"name": name, "backend": run_spec["backend"], "failed": True, "exit": proc.returncode}


def longest(suite: Suite, run_spec: dict, model_path: Path, console) -> dict:
    """The longest sequence (multiple of 512) that trains one step, like Unsloth's context-length table: double
    until a run runs out of memory, then bisect."""
    import dataclasses

    probe = lambda n: _worker(dataclasses.replace(suite, seq_len=n, warmup_steps=0, timed_steps=1,  # noqa: E731
                                                  batch_size=1, grad_accum=1), run_spec, model_path, console)
    ok, bad, n = 0, None, 512
    while n <= suite.max_seq_len:
        r = probe(n)
        if r.get("failed"):
            raise UserError(f"the {run_spec['name']} probe at seq {n} failed (exit {r['exit']}); its output is above")
        console.print(f"  {run_spec['name']}: seq {n} {'out of memory' if r.get('oom') else 'fits'}")
        if r.get("oom"):
            bad = n
            break
        ok, n = n, n * 2
    while bad and bad - ok > 512:
        mid = (ok + bad) // 2 // 512 * 512
        r = probe(mid)
        console.print(f"  {run_spec['name']}: seq {mid} {'out of memory' if r.get('oom') else 'fits'}")
        ok, bad = (ok, mid) if r.get("oom") else (mid, bad)
    return {"name": run_spec["name"], "backend": run_spec["backend"], "longest_seq": ok,
            "capped_by_search": bad is None, "memory_cap_gb": suite.memory_cap_gb}


def run(suite: Suite, console=None) -> dict:
    from rich.console import Console

    from speedtune import backends, hardware
    from speedtune.models import resolve_model

    console = console or Console()
    hw = hardware.detect(None if suite.device == "auto" else suite.device)
    work = Path(suite.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with console.status(f"preparing the {suite.model or suite.shape} model"):
        model_path = resolve_model(suite.model) if suite.model else build_shape(suite, hw.device)
    results = []
    for run_spec in suite.runs:
        name, backend = run_spec["name"], run_spec["backend"]
        try:
            backends.choose(backend, hw.device)
        except UserError as e:
            console.print(f"[yellow]skipping {name}[/]: {e}")
            continue
        if suite.longest:
            console.print(f"[bold]{name}[/]: searching the longest sequence that trains (batch 1)")
            results.append(longest(suite, run_spec, model_path, console))
            continue
        console.print(f"[bold]{name}[/] ({backend}, fit {run_spec.get('fit', 'off')}): fresh process, "
                      f"{suite.warmup_steps} warm-up + {suite.timed_steps} timed steps")
        r = _worker(suite, run_spec, model_path, console)
        if r.get("failed") or r.get("oom"):
            console.print(f"[red]the {name} run did not finish ({'out of memory' if r.get('oom') else 'exit %s' % r.get('exit')})[/]")
            results.append({"name": name, "backend": backend, "failed": True, "exit": r.get("exit", "oom")})
            continue
        console.print(f"  {r['tokens_per_s']:.0f} tok/s, {r['s_per_step']:.2f} s/step, peak {r['peak_alloc_gb']:.2f} GB, "
                      f"micro-batch {r['micro_batch']} x {r['grad_accum']}, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
        results.append(r)
    report = {"date": time.strftime("%Y-%m-%d"), "device": hw.name, "shape": suite.model or suite.shape,
              "suite": asdict(suite), "results": results,
              "fairness": "same synthetic tokens (seed 1234) and tokens per step for every backend; each backend in a "
                          "fresh process; warm-up steps excluded; device synchronised before each timestamp"}
    ok = [r for r in results if "tokens_per_s" in r]
    by = {r["name"]: r for r in ok}
    base = by.get("peft")
    if base:
        for r in ok:
            r["speedup_vs_peft"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["memory_vs_peft"] = r["peak_alloc_gb"] / base["peak_alloc_gb"]
        if "unsloth" in by:
            report["speedup"] = by["unsloth"]["speedup_vs_peft"]
            report["memory_ratio"] = by["unsloth"]["memory_vs_peft"]
        if "speedtune" in by:
            report["auto_speedup"] = by["speedtune"]["speedup_vs_peft"]
            report["auto_memory_ratio"] = by["speedtune"]["memory_vs_peft"]
        if "speedtune-memory" in by:
            report["memory_profile_ratio"] = by["speedtune-memory"]["memory_vs_peft"]
            report["memory_profile_speedup"] = by["speedtune-memory"]["speedup_vs_peft"]
    ref = by.get("unsloth") or base
    if ref:  # same math: the per-step losses of every run against the reference run's
        for r in ok:
            if r is not ref and len(r["losses"]) == len(ref["losses"]):
                r[f"max_loss_diff_vs_{ref['name']}"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
    if suite.longest:
        report["longest"] = {r["name"]: r["longest_seq"] for r in results}
        results[:] = []
    from speedtune.bench_report import write_report

    write_report(report, Path(suite.results))
    return report


@click.command("bench")
@click.argument("suite_file", required=False, type=click.Path(dir_okay=False))
@click.option("--shape", help=f"Model shape: {', '.join(SHAPES)}.")
@click.option("--model", help="A real model (alias or folder) instead of a random shape.")
@click.option("--seq-len", type=int)
@click.option("--batch-size", type=int)
@click.option("--grad-accum", type=int)
@click.option("--timed-steps", type=int)
@click.option("--results", help="Folder for the reports (benchmarks/results).")
@click.option("--memory-cap-gb", type=float, help="Cap GPU memory (15 with --precision fp16: a T4 profile).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--longest", is_flag=True, default=None, help="Search the longest sequence each run trains at.")
@click.option("--max-seq-len", type=int, help="Upper bound of the --longest search (32768).")
@click.option("--smoke", is_flag=True, help="CPU smoke run on the tiny shape: proves the harness, not the numbers.")
def command(suite_file, shape, model, seq_len, batch_size, grad_accum, timed_steps, results, memory_cap_gb, precision,
            longest, max_seq_len, smoke):
    """Benchmark Unsloth against vanilla PEFT on one recipe (SUITE_FILE: a YAML of the suite's keys)."""
    over = dict(shape=shape, model=model, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                timed_steps=timed_steps, results=results, memory_cap_gb=memory_cap_gb, precision=precision,
                longest=longest, max_seq_len=max_seq_len)
    if smoke:
        over = {**dict(shape="tiny", seq_len=128, batch_size=2, grad_accum=1, warmup_steps=1, timed_steps=2,
                       device="cpu", load_in_4bit=False), **{k: v for k, v in over.items() if v is not None}}
    run(load_suite(suite_file, over))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
