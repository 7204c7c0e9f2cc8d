"""`speedtune bench`: one recipe through several runs side by side, each a fresh process running the real
`speedtune train` code path (speedtune.bench_worker) on the same rows in the same order: a real data file
(`data:`), rows drawn from a length profile (`lengths:`, e.g. the Alpaca profile in benchmarks/data/), or dense rows
of the full sequence length (`lengths: dense`). Timed after warm-up steps with device synchronisation. Every run's
per-step losses must match the reference run's within a tolerance, or the suite fails. The reports (json, md, png
under benchmarks/results/) are written by speedtune.bench_report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

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


LOSS_TOLERANCE = 0.01  # relative per-step loss difference allowed between runs (see `check_losses`)

TUTORIAL_RUNS = [
    {"name": "peft", "backend": "peft", "fit": "off", "gradient_checkpointing": True},  # as the tutorials set it
    {"name": "peft-best", "backend": "peft", "fit": "off", "gradient_checkpointing": False},
    # Unsloth's defaults (its offloaded checkpointing), with padded batches: its own default on an H100/H200 is
    # padding-free, measured slower (1,161 against 1,458 real tok/s, H200, 2026-12-02), so this is the faster baseline
    {"name": "unsloth", "backend": "unsloth", "fit": "off", "padding_free": False},
    {"name": "speedtune", "backend": "unsloth", "fit": "auto"},  # the default: the fastest layout the GPU holds
    {"name": "speedtune-lean", "backend": "unsloth", "fit": "lean"},  # padding-free, below Unsloth's memory
    # the default fit held to 12 GB (an RTX 3060/4070-class card): it turns checkpointing on to fit
    {"name": "speedtune-12gb", "backend": "unsloth", "fit": "auto", "memory_cap_gb": 12},
]


@dataclass
class Suite:
    shape: str = "llama-3-8b"
    model: str | None = None  # a real model folder/alias instead of a random shape
    data: str | None = None  # a data file (any format speedtune train reads)
    lengths: str = "alpaca"  # a length profile: alpaca (shipped), a file of token counts, or dense (all seq_len)
    rows: int = 999  # rows drawn from the profile
    seq_len: int = 2048
    batch_size: int = 2
    grad_accum: int = 4
    lora_r: int = 16
    lora_alpha: int = 16
    load_in_4bit: bool = True
    steps: int = 60
    warmup_steps: int = 5  # the first steps (compilation, allocator warm-up) are not timed
    runs: list = field(default_factory=lambda: [dict(r) for r in TUTORIAL_RUNS])
    reference: str = "unsloth"  # the run whose per-step losses the others must match
    memory_cap_gb: float | None = None  # e.g. 15 with precision fp16: a T4-class profile
    precision: str = "auto"
    device: str = "auto"
    longest: bool = False  # search the longest sequence each run trains at (dense rows, batch 1)
    max_seq_len: int = 32768
    profile: bool = False  # torch.profiler over 3 steps after the timed ones (speedtune.profiling)
    workdir: str = field(default_factory=lambda: os.environ.get("SPEEDTUNE_BENCH_WORKDIR", "/tmp/speedtune-bench"))
    results: str = "benchmarks/results"


def load_suite(path: str | None, overrides: dict) -> Suite:
    data = {}
    if path:
        from speedtune.config import read_yaml

        data = read_yaml(path)
        unknown = set(data) - set(Suite.__dataclass_fields__)
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(Suite.__dataclass_fields__)}")
    unknown = {k for k, v in overrides.items() if v is not None} - set(Suite.__dataclass_fields__)
    if unknown:
        raise UserError(f"bench: unknown setting(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(Suite.__dataclass_fields__)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    suite = Suite(**data)
    if not suite.model and suite.shape not in SHAPES:
        raise UserError(f"unknown shape '{suite.shape}' (known: {', '.join(SHAPES)})")
    if suite.warmup_steps >= suite.steps - 1 - 3 * suite.profile:
        raise UserError(f"steps ({suite.steps}) must exceed warmup_steps ({suite.warmup_steps}) by at least 2"
                        + (" and the 3 profiled steps" if suite.profile else ""))
    names = [r.get("name") for r in suite.runs]
    if len(set(names)) != len(names) or None in names:
        raise UserError(f"{path or 'suite'}: every run needs a unique name (got {names})")
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


def suite_rows(suite: Suite, tokenizer_path: Path, work: Path) -> Path:
    """The data file every run trains on."""
    from transformers import AutoTokenizer

    from speedtune import bench_data

    if suite.data:
        if not Path(suite.data).exists():
            raise UserError(f"data: {suite.data} not found")
        return Path(suite.data)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if suite.lengths == "dense":
        lengths = [suite.seq_len - 8]
    else:
        lengths = [min(n, suite.seq_len - 8) for n in bench_data.read_profile(bench_data.profile_path(suite.lengths))]
    return bench_data.write(work / f"rows-{suite.lengths.replace('/', '_')}-{suite.seq_len}.jsonl",
                            bench_data.rows(tok, lengths, suite.rows))


def suite_key(suite: Suite, run_spec: dict) -> str:
    """What makes two results of a run comparable: the suite's recipe and data, and the run's settings."""
    import hashlib

    same = {k: v for k, v in asdict(suite).items() if k not in ("runs", "results", "workdir", "reference")}
    return hashlib.sha1(json.dumps([same, run_spec], sort_keys=True).encode()).hexdigest()[:16]


def spawn(suite: Suite, run_spec: dict, model_path: Path, data_path: Path, cuda: bool) -> dict:
    """One run in a fresh process; {"failed": ...} or {"oom": True} when it did not finish."""
    work = Path(suite.workdir)
    name = run_spec["name"]
    spec, out = work / f"spec-{name}.json", work / f"result-{name}.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"suite": asdict(suite), "run": run_spec, "model_path": str(model_path),
                                "data_path": str(data_path), "output": str(work / f"run-{name}"), "cuda": cuda,
                                "spawned_at": time.time()}))
    n = int(run_spec.get("processes", 1))  # data parallel: the run's ranks under torchrun (one per GPU)
    if n > 1:
        from speedtune.distributed import launch_command

        cmd = launch_command(n, [str(spec), str(out)], module="speedtune.bench_worker")
    else:
        cmd = [sys.executable, "-m", "speedtune.bench_worker", str(spec), str(out)]
    env = {**os.environ, **{k: str(v) for k, v in run_spec.get("env", {}).items()}}  # a run's own variables
    proc = subprocess.run(cmd, env=env)
    if out.is_file():
        return {**json.loads(out.read_text()), "suite_key": suite_key(suite, run_spec)}
    return {"name": name, "backend": run_spec["backend"], "failed": True, "exit": proc.returncode}


def longest(suite: Suite, run_spec: dict, model_path: Path, cuda: bool, console) -> dict:
    """The longest sequence (multiple of 512) that trains a step of one dense row, like Unsloth's context-length
    table: double until a run runs out of memory, then bisect."""
    import dataclasses

    def probe(n: int) -> bool:
        s = dataclasses.replace(suite, seq_len=n, lengths="dense", rows=4, steps=2, warmup_steps=0, batch_size=1,
                                grad_accum=1)
        r = spawn(s, run_spec, model_path, suite_rows(s, model_path, Path(suite.workdir)), cuda)
        if r.get("failed"):
            raise UserError(f"the {run_spec['name']} probe at seq {n} failed (exit {r['exit']}); its output is above")
        console.print(f"  {run_spec['name']}: seq {n} {'out of memory' if r.get('oom') else 'fits'}")
        return not r.get("oom")

    ok, bad, n = 0, None, 512
    while n <= suite.max_seq_len:
        if not probe(n):
            bad = n
            break
        ok, n = n, n * 2
    while bad and bad - ok > 512:
        mid = (ok + bad) // 2 // 512 * 512
        ok, bad = (mid, bad) if probe(mid) else (ok, mid)
    return {"name": run_spec["name"], "backend": run_spec["backend"], "longest_seq": ok,
            "capped_by_search": bad is None, "memory_cap_gb": suite.memory_cap_gb}


def check_losses(results: list[dict], reference: str) -> list[str]:
    """Every run trains the same rows in the same order from the same weights with the same optimizer, so its
    per-step losses must match the reference run's up to numerics. bf16 rounds at 2^-8 (0.4%) per operation;
    different kernels (fused vs not), a different grouping of the sums and 8-bit optimizer states add up to well under
    1% over a short run (measured: 0.0013 of ~11.9 on the dense suite). A layout bug (a lost row, a wrong loss
    normalisation) moves losses by far more. Returns the failures; records each run's largest difference."""
    ref = next((r for r in results if r["name"] == reference and "losses" in r), None)
    failures = []
    if ref is None:
        return failures
    for r in results:
        if r is ref or "losses" not in r:
            continue
        n = min(len(r["losses"]), len(ref["losses"]))
        diffs = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(r["losses"][:n], ref["losses"][:n])]
        worst = max(range(n), key=lambda k: diffs[k])
        r["max_rel_loss_diff"] = diffs[worst]
        r[f"max_loss_diff_vs_{reference}"] = abs(r["losses"][worst] - ref["losses"][worst])
        if diffs[worst] > LOSS_TOLERANCE:
            failures.append(f"{r['name']} step {worst + 1}: loss {r['losses'][worst]:.4f} vs {reference}'s "
                            f"{ref['losses'][worst]:.4f} ({diffs[worst]:.1%} apart, tolerance {LOSS_TOLERANCE:.0%})")
    return failures


def reuse(suite: Suite, run_spec: dict) -> dict | None:
    """A finished result of this very run from an earlier invocation (`--resume`), if the workdir holds one."""
    path = Path(suite.workdir) / f"result-{run_spec['name']}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return r if r.get("suite_key") == suite_key(suite, run_spec) and "real_tokens_per_s" in r else None


def run(suite: Suite, console=None, only: list[str] | None = None, resume: bool = False) -> dict:
    """Run the suite's runs (or `only` these, reusing the others' results with `resume`) and write the report."""
    from rich.console import Console

    from speedtune import backends, hardware
    from speedtune.bench_report import summarise, write_report
    from speedtune.models import resolve_model

    console = console or Console()
    hw = hardware.detect(None if suite.device == "auto" else suite.device)
    cuda = hw.device == "cuda"
    work = Path(suite.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with console.status(f"preparing the {suite.model or suite.shape} model and the rows"):
        model_path = resolve_model(suite.model) if suite.model else build_shape(suite, hw.device)
        data_path = None if suite.longest else suite_rows(suite, model_path, work)
    results = []
    unknown = set(only or []) - {r["name"] for r in suite.runs}
    if unknown:
        raise UserError(f"--runs: no run named {', '.join(sorted(unknown))} in the suite "
                        f"({', '.join(r['name'] for r in suite.runs)})")
    for run_spec in suite.runs:
        name, backend = run_spec["name"], run_spec["backend"]
        earlier = reuse(suite, run_spec) if resume else None
        if earlier and (only is None or name not in only):
            console.print(f"[bold]{name}[/]: reusing its result from {suite.workdir} (--resume)")
            results.append(earlier)
            continue
        if only is not None and name not in only:
            continue
        try:
            backends.choose(backend, hw.device)
        except UserError as e:
            console.print(f"[yellow]skipping {name}[/]: {e}")
            continue
        if suite.longest:
            console.print(f"[bold]{name}[/]: searching the longest sequence that trains (batch 1)")
            results.append(longest(suite, run_spec, model_path, cuda, console))
            continue
        console.print(f"[bold]{name}[/] ({backend}, {', '.join(f'{k} {v}' for k, v in run_spec.items() if k not in ('name', 'backend'))}): "
                      f"fresh process, {suite.steps} steps, the first {suite.warmup_steps} untimed")
        r = spawn(suite, run_spec, model_path, data_path, cuda)
        if "real_tokens_per_s" in r:
            (Path(suite.workdir) / f"result-{name}.json").write_text(json.dumps(r, indent=2))
        if r.get("failed") or r.get("oom"):
            console.print(f"[red]the {name} run did not finish ({'out of memory' if r.get('oom') else 'exit %s' % r.get('exit')})[/]")
            results.append({"name": name, "backend": backend, "failed": True, "exit": r.get("exit", "oom")})
            continue
        for key in ("gradient_checkpointing", "cuda_graphs", "step_graphs", "padding_free"):
            asked = run_spec.get(key)
            if asked is not None and asked != r.get(key):
                raise UserError(f"run {name} asked for {key} {asked} but ran with {r.get(key)}")
        if r.get("profile"):
            p = r["profile"]
            console.print(f"  profile: {p['wall_s_per_step']:.3f} s/step, device busy {p['device_busy_s_per_step']:.3f} s "
                          f"({p['device_busy_share']:.0%}), {p['kernels_per_step']:.0f} kernels/step; "
                          f"{Path(suite.workdir) / ('profile-' + name + '.txt')}")
        console.print(f"  {r['real_tokens_per_s']:.0f} real tok/s, {r['s_per_step']:.2f} s/step, peak "
                      f"{r['peak_alloc_gb']:.2f} GB, {r['passes_per_step']:.1f} passes/step, padding "
                      f"{r['padding_share']:.0%}, adapter after {r['time_to_adapter_s']:.0f} s, loss "
                      f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}")
        results.append(r)
    report = {"date": time.strftime("%Y-%m-%d"), "device": hw.name, "shape": suite.model or suite.shape,
              "data": suite.data or suite.lengths, "suite": asdict(suite), "results": results,
              "fairness": "the same rows in the same order for every run; each run a fresh process running speedtune "
                          "train's code path; warm-up steps excluded; device synchronised before each timestamp"}
    failures = check_losses(results, suite.reference)
    if suite.longest:
        report["longest"] = {r["name"]: r["longest_seq"] for r in results}
    summarise(report)
    stem = write_report(report, Path(suite.results))
    report["files"] = {k: str(stem.with_suffix("." + k)) for k in ("json", "md", "png")}
    if failures:
        raise UserError("per-step losses differ beyond the tolerance: " + "; ".join(failures), exit_code=1)
    return report


SMOKE = dict(shape="tiny", seq_len=256, batch_size=2, grad_accum=2, rows=64, steps=4, warmup_steps=1, device="cpu",
             load_in_4bit=False, reference="peft", precision="fp32",  # not bf16 on an AMX CPU: the same math everywhere
             runs=[{"name": "peft", "backend": "peft", "fit": "off", "gradient_checkpointing": True},
                   {"name": "speedtune", "backend": "peft", "fit": "auto"}])


def with_processes(runs: list[dict], n: int) -> list[dict]:
    """Each run, then the same run data-parallel on `n` processes (named RUN-xN), for the scaling report."""
    return [r for run in runs for r in (run, {**run, "name": f"{run['name']}-x{n}", "processes": n})]


def with_smoke(overrides: dict) -> dict:
    """The CPU smoke suite (a tiny shape, 4 steps: it proves the harness, not the numbers), `overrides` on top."""
    return {**SMOKE, **{k: v for k, v in overrides.items() if v is not None}}


def run_suite(suite_file: str | None = None, *, smoke: bool = False, only: list[str] | None = None,
              resume: bool = False, processes: int | None = None, console=None, **overrides) -> dict:
    """A suite file (or the smoke suite) with `overrides` on top, optionally each run also on `processes`
    data-parallel processes, run and reported: what `speedtune bench` and `speedtune.bench()` do."""
    suite = load_suite(suite_file, with_smoke(overrides) if smoke else overrides)
    if processes:
        suite.runs = with_processes(suite.runs, processes)
    return run(suite, console=console, only=only, resume=resume)


@click.command("bench")
@click.argument("suite_file", required=False, type=click.Path(dir_okay=False))
@click.option("--shape", help=f"Model shape: {', '.join(SHAPES)}.")
@click.option("--model", help="A real model (alias or folder) instead of a random shape.")
@click.option("--data", help="A data file to train on (default: rows drawn from the suite's length profile).")
@click.option("--lengths", help="A length profile (one token count per line), or 'dense'.")
@click.option("--seq-len", type=click.IntRange(16))
@click.option("--batch-size", type=click.IntRange(1))
@click.option("--grad-accum", type=click.IntRange(1))
@click.option("--steps", type=click.IntRange(3), help="Steps per run (60).")
@click.option("--results", help="Folder for the reports (benchmarks/results).")
@click.option("--memory-cap-gb", type=click.FloatRange(0, min_open=True), help="Cap GPU memory (15 with --precision fp16: a T4 profile).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--longest", is_flag=True, default=None, help="Search the longest sequence each run trains at.")
@click.option("--max-seq-len", type=click.IntRange(512), help="Upper bound of the --longest search (32768).")
@click.option("--profile", is_flag=True, default=None, help="Profile 3 steps of each run after its timed steps "
              "(torch.profiler: device-busy share, kernels per step, top ops; written to the workdir).")
@click.option("--runs", "only", help="Run only these runs of the suite (comma list of names).")
@click.option("--processes", type=click.IntRange(2), help="Also run each run data-parallel on N processes (one per "
              "GPU, under torchrun; on a CPU, gloo) and report the scaling against one.")
@click.option("--resume", is_flag=True, help="Reuse finished results of this suite's other runs from the workdir.")
@click.option("--smoke", is_flag=True, help="CPU smoke run on the tiny shape: proves the harness, not the numbers.")
def command(suite_file, smoke, only, resume, processes, **over):
    """Benchmark speedtune against Unsloth's defaults and vanilla PEFT on one recipe (SUITE_FILE: a YAML of the
    suite's keys; flags override it)."""
    run_suite(suite_file, smoke=smoke, only=[n.strip() for n in only.split(",") if n.strip()] if only else None,
              resume=resume, processes=processes, **over)
