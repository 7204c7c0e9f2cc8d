"""Benchmarking (`speedtune bench`: speedtune.commands.bench): one recipe through several runs side by side (the suite:
speedtune.benchmarking.suite), each a fresh process on the same rows in the same order: `speedtune train`'s real code
path (speedtune.benchmarking.worker), or a baseline run by its own library (Unsloth's tutorial code and tuned
settings, TRL: speedtune.benchmarking.baselines). The rows are a real data file (`data:`, any format `speedtune
train` reads), rows drawn from a length profile (`lengths:`), or dense rows of the full sequence length (`lengths:
dense`); they are read and tokenised once, before any run starts, so a bad row is one line
(speedtune.benchmarking.rows). Timed after warm-up steps with device synchronisation (speedtune.benchmarking.timing).
Each run's output goes to its log in the workdir; a run that fails makes the command exit non-zero with its one-line
error. Per-step losses and gradient norms must match the reference run's (speedtune.benchmarking.check). The reports
(json, md, png under benchmarks/results/) are speedtune.benchmarking.report's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from speedtune import hardware
from speedtune.benchmarking import baselines as bench_baselines, rows as bench_data, worker as bench_worker
from speedtune.benchmarking.check import check_eval, check_losses
from speedtune.benchmarking.report import summarise, write_report
from speedtune.benchmarking.suite import (SHAPES, Suite, build_shape, label, load_suite, replace, run_backend, run_kind,
                                   suite_key, with_processes, with_smoke)
from speedtune.errors import UserError
from speedtune.models import prefetch
from speedtune.models.registry import resolve_model
from speedtune.training import backends

__all__ = ["run", "run_suite", "SHAPES", "Suite", "load_suite"]


def spawn(suite: Suite, run_spec: dict, model_path: Path, data, cuda: bool, profile_steps: int = 0) -> dict:
    """One run in a fresh process, its output in the workdir's log-NAME.txt; its result, or {"failed": ..., "error":
    ...} / {"oom": True} when it did not finish."""
    work = Path(suite.workdir)
    name = run_spec["name"]
    spec, out, log = work / f"spec-{name}.json", work / f"result-{name}.json", work / f"log-{name}.txt"
    out.unlink(missing_ok=True)
    if suite.cold_start:  # a first run of the day: the weights come off the disk (speedtune.models.prefetch)
        prefetch.evict(model_path)
    spec.write_text(json.dumps({"suite": asdict(suite), "run": run_spec, "model_path": str(model_path),
                                "data_path": str(data.train), "examples_path": str(data.examples),
                                "eval_examples": str(data.eval_examples) if data.eval_examples else None,
                                "rows": data.rows, "tokens": data.tokens, "sum_sq_lengths": data.sum_sq_lengths,
                                "output": str(work / f"run-{name}"), "cuda": cuda, "profile_steps": profile_steps,
                                "spawned_at": time.time()}))
    module = ("speedtune.benchmarking.worker" if run_kind(run_spec) == "speedtune" else
              "speedtune.benchmarking.baselines" if suite.method == "sft" else "speedtune.benchmarking.preference")
    n = int(run_spec.get("processes", 1))  # data parallel: the run's ranks under torchrun (one per GPU)
    if n > 1:
        from speedtune.training.distributed import launch_command

        cmd = launch_command(n, [str(spec), str(out)], module=module)
    else:
        cmd = [sys.executable, "-m", module, str(spec), str(out)]
    env = {**os.environ, **{k: str(v) for k, v in run_spec.get("env", {}).items()}}  # a run's own variables
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    r = json.loads(out.read_text()) if out.is_file() else \
        {"name": name, "failed": True, "error": f"exit {proc.returncode} without a result"}
    r.update(label=label(run_spec, suite.method), kind=run_kind(run_spec), log=str(log), suite_key=suite_key(suite, run_spec))
    r.setdefault("backend", run_backend(run_spec))
    if run_spec.get("repeat_of"):
        r["repeat_of"] = run_spec["repeat_of"]
    return r


def longest(suite: Suite, run_spec: dict, model_path: Path, cuda: bool, console) -> dict:
    """The longest sequence (multiple of 512) that trains a step of one dense row, like Unsloth's context-length
    table: double until a run runs out of memory, then bisect."""
    def probe(n: int) -> bool:
        s = replace(suite, seq_len=n, lengths="dense", data=None, eval_data=None, rows=4, steps=2, warmup_steps=0,
                    batch_size=1, grad_accum=1)
        r = spawn(s, run_spec, model_path, bench_data.prepare(s, model_path, Path(suite.workdir)), cuda)
        if r.get("failed"):
            raise UserError(f"the {run_spec['name']} probe at seq {n} failed: {r['error']} (log: {r['log']})")
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
    return {"name": run_spec["name"], "backend": run_backend(run_spec), "longest_seq": ok,
            "capped_by_search": bad is None, "memory_cap_gb": suite.memory_cap_gb}


def reuse(suite: Suite, run_spec: dict) -> dict | None:
    """A finished result of this very run from an earlier invocation (`--resume`), if the workdir holds one."""
    path = Path(suite.workdir) / f"result-{run_spec['name']}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return r if r.get("suite_key") == suite_key(suite, run_spec) and "real_tokens_per_s" in r else None


def check_asked(suite: Suite, cuda: bool) -> None:
    """Every run's settings checked before any run starts (a typo or a value of the wrong type: one line)."""
    for spec in suite.runs:
        if run_kind(spec) == "speedtune":
            bench_worker.config({"suite": asdict(suite), "run": spec, "model_path": "m", "data_path": "d",
                                 "output": "o", "cuda": cuda}).validate()
        else:
            bench_baselines.recipe(run_kind(spec), asdict(suite), spec, cuda)


def said(r: dict) -> str:
    if r.get("oom"):
        return "[yellow]out of memory[/]" + (f" (cap {r['memory_cap_gb']:g} GB)" if r.get("memory_cap_gb") else "")
    if r.get("failed"):
        return f"[red]failed[/]: {r['error']} (log: {r['log']})"
    mem = f"{r['peak_reserved_gb']:.2f} GB reserved / " if r.get("peak_reserved_gb") is not None else ""
    kern = (f", {r['gpu_kernel_s_per_1k_tokens']:.4f} GPU-kernel s per 1k tokens"
            if r.get("gpu_kernel_s_per_1k_tokens") else "")
    ev = f", final eval loss {r['final_eval_loss']:.4f}" if r.get("final_eval_loss") is not None else ""
    margins = r.get("preference_curve", {}).get("rewards/margins")
    ev += f", reward margin {margins[0]:.3f} -> {margins[-1]:.3f}" if margins else ""
    return (f"{r['real_tokens_per_s']:,.0f} real tok/s, {r['s_per_step']:.3f} s/step{kern}, peak {mem}"
            f"{r['peak_alloc_gb']:.2f} GB allocated, adapter after {r['time_to_adapter_s']:.0f} s, loss "
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}{ev}")


def run_one(suite: Suite, run_spec: dict, model_path: Path, data, cuda: bool, profile_steps: int, console) -> dict:
    name = run_spec["name"]
    with console.status(f"{name}: {label(run_spec, suite.method)}; fresh process, {suite.steps} steps, the first "
                        f"{suite.warmup_steps} untimed (log: {Path(suite.workdir) / f'log-{name}.txt'})"):
        r = spawn(suite, run_spec, model_path, data, cuda, profile_steps)
    if "real_tokens_per_s" in r and r.get("kind") == "speedtune":  # what was asked for is what ran
        for key in ("gradient_checkpointing", "cuda_graphs", "step_graphs", "padding_free"):
            asked = run_spec.get(key)
            if asked is not None and asked != r.get(key):
                r = {**r, "failed": True, "error": f"{key} {asked} was asked for but {r.get(key)} ran"}
                del r["real_tokens_per_s"]
                break
    if "real_tokens_per_s" in r:
        (Path(suite.workdir) / f"result-{name}.json").write_text(json.dumps(r, indent=2))
    console.print(f"[bold]{name}[/]: {said(r)}")
    return r


def run(suite: Suite, console=None, only: list[str] | None = None, resume: bool = False,
        report_only: bool = False) -> dict:
    """Run the suite's runs (or `only` these, reusing the others' results with `resume`) and write the report;
    `report_only`: run nothing, report the finished results in the workdir (runs made in several calls or places)."""
    from rich.console import Console

    console = console or Console()
    hw = hardware.detect(None if suite.device == "auto" else suite.device)
    cuda = hw.device == "cuda"
    profile_steps = suite.profile_steps if cuda or suite.profile else 0
    if not suite.longest and suite.steps - profile_steps - suite.warmup_steps < 2:
        raise UserError(f"steps ({suite.steps}) must exceed warmup_steps ({suite.warmup_steps}) and the "
                        f"{profile_steps} profiled steps by at least 2")
    unknown = set(only or []) - {r["name"] for r in suite.runs}
    if unknown:
        raise UserError(f"--runs: no run named {', '.join(sorted(unknown))} in the suite "
                        f"({', '.join(r['name'] for r in suite.runs)})")
    check_asked(suite, cuda)
    work = Path(suite.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_path = data = None
    if not report_only:  # a report of finished results needs neither the model nor the rows
        with console.status(f"preparing the {suite.model or suite.shape} model and the rows"):
            model_path = resolve_model(suite.model) if suite.model else build_shape(suite, hw.device)
            data = None if suite.longest else bench_data.prepare(suite, model_path, work)
    if data:
        console.print(f"data: {data.rows} rows, {data.tokens:,} tokens ({data.train}); every run trains them in the "
                      f"same order; run logs in {work}")
    results, not_run = [], []
    for run_spec in suite.runs:
        name = run_spec["name"]
        earlier = reuse(suite, run_spec) if resume or report_only else None
        if report_only and not earlier:
            not_run.append(name)
            console.print(f"[yellow]{name}[/]: no finished result of this run in {suite.workdir} (--report-only)")
            continue
        if earlier and (only is None or name not in only):
            console.print(f"[bold]{name}[/]: reusing its result from {suite.workdir} (--resume)")
            results.append(earlier)
            continue
        if only is not None and name not in only:
            continue
        try:
            backends.choose(run_backend(run_spec), hw.device)
        except UserError as e:
            console.print(f"[yellow]skipping {name}[/]: {e}")
            continue
        if suite.longest:
            console.print(f"[bold]{name}[/]: searching the longest sequence that trains (batch 1)")
            results.append(longest(suite, run_spec, model_path, cuda, console))
            continue
        results.append(run_one(suite, run_spec, model_path, data, cuda, profile_steps, console))
    made_on = sorted({r["device"] for r in results if r.get("device")}) if report_only else [hw.name]
    report = {"date": time.strftime("%Y-%m-%d"), "device": ", ".join(made_on) or hw.name, "shape": suite.model or suite.shape,
              "data": suite.data or suite.lengths, "suite": asdict(suite), "results": results,
              "fairness": "the same rows in the same order for every run (tokenised once by speedtune's data path); "
                          "each run a fresh process, speedtune train's code path or the baseline's own library; "
                          "warm-up steps excluded; device synchronised before each timestamp"}
    if not_run:
        report["not_run"] = not_run
    if report_only and not results:
        raise UserError(f"--report-only: no finished result of this suite in {suite.workdir}")
    failures = []
    if suite.longest:
        report["longest"] = {r["name"]: r["longest_seq"] for r in results}
    else:
        failures, summary = check_losses(results, suite.reference)
        report["loss_check"] = {**summary, "failures": failures}
        eval_failures, report["eval_check"] = check_eval(results, suite.reference)
        failures += eval_failures
    summarise(report)
    stem = write_report(report, Path(suite.results))
    report["files"] = {k: str(stem.with_suffix("." + k)) for k in ("json", "md", "png")}
    console.print(f"report: {stem.with_suffix('.md')}")
    broken = [r for r in results if r.get("failed")]
    if broken:
        raise UserError("; ".join(f"run {r['name']} failed: {r['error']} (log: {r.get('log')})" for r in broken) +
                        f"; report {stem.with_suffix('.md')}", exit_code=1)
    if failures:
        raise UserError("the loss check failed: " + "; ".join(failures), exit_code=1)
    return report


def run_suite(suite_file: str | None = None, *, smoke: bool = False, only: list[str] | None = None,
              resume: bool = False, processes: int | None = None, console=None, report_only: bool = False,
              **overrides) -> dict:
    """A suite file (or the smoke suite) with `overrides` on top, optionally each run also on `processes`
    data-parallel processes, run and reported: what `speedtune bench` and `speedtune.bench()` do."""
    over = overrides
    if smoke:  # the smoke recipe, with a suite file's own runs (and reference) where it has them
        from speedtune.training.config import read_yaml

        mine = read_yaml(suite_file) if suite_file else {}
        over = {k: v for k, v in with_smoke(overrides).items()
                if not (k in ("runs", "reference") and k in mine and overrides.get(k) is None)}
    suite = load_suite(suite_file, over)
    if processes:
        suite.runs = with_processes(suite.runs, processes)
    return run(suite, console=console, only=only, resume=resume, report_only=report_only)
