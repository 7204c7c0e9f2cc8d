"""speedtune.training.plan: how the default pass graphs lay out a step's rows, from the model's shape and the real lengths."""
import dataclasses
import json

import pytest

from speedtune.training import costs, fit, plan
from speedtune.benchmarking.runner import SHAPES
from speedtune.training.config import RunConfig
from speedtune.hardware import Hardware
from speedtune.paths import demo_dir

H200 = Hardware("cuda", "NVIDIA H200", "bfloat16", "the GPU supports bf16", 139.8)


@pytest.fixture
def alpaca():
    return [int(x) for x in (demo_dir() / "alpaca-lengths.txt").read_text().split()]


def shape(tmp_path, name, like=None):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps({**SHAPES[like or name], "model_type": "llama"}))
    return tmp_path / name


def test_the_default_graphs_pack_the_8b_rows_and_pad_the_135m_ones(tmp_path, alpaca):
    cfg = RunConfig(data="x.jsonl", batch_size=2, grad_accum=4)
    big = plan.resolve(cfg, H200, shape(tmp_path, "llama-3-8b"), alpaca, backend=("unsloth", "test"))
    assert big.step_graphs and big.padding_free and big.pad_multiple == fit.packed_multiple(alpaca, 8) == 256
    assert not big.half_lora  # a recorded pass casts inside its graph
    assert any(r.startswith("padding-free passes: packing each step's rows") for r in big.reasons)
    small = plan.resolve(RunConfig(data="x.jsonl", batch_size=4, grad_accum=1), H200, shape(tmp_path, "smollm2-135m"),
                         alpaca, backend=("unsloth", "test"))
    assert small.step_graphs and not small.padding_free and small.causal_only
    assert small.pad_multiple == fit.width_multiple(max(alpaca))
    assert any(r.startswith("padded passes: packing each step's rows") for r in small.reasons)


def test_asked_layouts_and_other_backends_keep_their_rows(tmp_path, alpaca):
    """What the user asked for holds; the PEFT backend (not measured packed under the default graphs) stays padded,
    and so does a CPU (no graphs)."""
    model = shape(tmp_path, "llama-3-8b")
    asked = plan.resolve(RunConfig(data="x.jsonl", padding_free=False), H200, model, alpaca, backend=("unsloth", "t"))
    assert asked.step_graphs and not asked.padding_free
    assert not any("packing each step's rows" in r for r in asked.reasons)
    peft = plan.resolve(RunConfig(data="x.jsonl"), H200, model, alpaca, backend=("peft", "t"))
    assert not peft.padding_free and not peft.half_lora  # PEFT's layers cast under autocast, which caches the casts
    eager = plan.resolve(RunConfig(data="x.jsonl", step_graphs=False), H200, model, alpaca, backend=("unsloth", "t"))
    assert not eager.step_graphs and not eager.padding_free
    assert eager.half_lora and any("speedtune.training.halflora" in r for r in eager.reasons)
    dpo = plan.resolve(RunConfig(data="x.jsonl", step_graphs=False, method="dpo"), H200, model, alpaca,
                       backend=("unsloth", "t"))
    assert not dpo.half_lora  # TRL's DPO trainer runs its own steps


T4_PROXY = Hardware("cuda", "NVIDIA H200", "float16", "--precision fp16", 15.0)  # --memory-cap-gb 15


def measured_t4_profile() -> dict:
    """The T4 profile's last committed run (fp16, a 15 GB cap, the 8B shape, Alpaca rows, 2 x 4): padded passes."""
    from pathlib import Path

    path = (Path(__file__).parent.parent / "benchmarks" / "results" /
            "2026-12-02-nvidia-h200-llama-3-8b-alpaca-seq2048-cap15gb-fp16.json")
    (run,) = json.loads(path.read_text())["results"]
    return run


def passes_per_step(p, steps) -> float:
    from speedtune.training import layout

    groups = [layout.by_tokens(s, p.token_budget, p.pass_overhead_tokens, p.padding_free) for s in steps]
    return sum(map(len, groups)) / len(steps)


def test_the_t4_profile_packs_fewer_passes_within_15_gb_reserved(tmp_path, alpaca, monkeypatch):
    """fp16 with a 15 GB cap (a T4, or a big GPU held to it): packed rows (no padding computed), fewer passes a step
    than the padded layout that ran there (2.9), no recomputation (the Alpaca rows fit without it), a reserved-memory
    estimate within the cap, the reasons in the plan; no matmul probe (the choice is the same at any GPU speed)."""
    from speedtune.training import costs
    from speedtune import hardware

    monkeypatch.setattr(hardware, "matmul_tflops", lambda *a, **k: pytest.fail("the GPU-bound fit needs no probe"))
    old = measured_t4_profile()
    assert (old.get("padding_free"), old["passes_per_step"], old["token_budget"]) == (None, 2.9, 1024)
    cfg = RunConfig(data="x.jsonl", batch_size=2, grad_accum=4, max_steps=60, precision="fp16", memory_cap_gb=15)
    p = plan.resolve(cfg, T4_PROXY, shape(tmp_path, "llama-3-8b"), alpaca, backend=("unsloth", "test"))
    assert p.padding_free and not p.causal_only and p.layout == "tokens" and not p.step_graphs and p.half_lora
    assert not p.gradient_checkpointing and p.checkpoint_keep_layers == 0
    assert p.fit["estimated_gb"] < p.fit["reserved_gb"] <= 15 * fit.RESERVED_HEADROOM < 15
    steps = costs.run_steps(alpaca, 8, 60, cfg.seed)
    new = passes_per_step(p, steps)
    assert 1 <= new < 2 < old["passes_per_step"], new
    assert p.token_budget > old["token_budget"]  # budgeting reserved memory against the measured 10.4 GB at 1,024
    # the untied input embeddings (1 GB) go to CPU memory where that buys a larger budget: fewer passes
    kept = plan.resolve(dataclasses.replace(cfg, offload_embeddings=False), T4_PROXY,
                        shape(tmp_path, "kept", "llama-3-8b"), alpaca, backend=("unsloth", "test"))
    assert p.offload_embeddings and not kept.offload_embeddings and p.token_budget > kept.token_budget
    assert passes_per_step(p, steps) < passes_per_step(kept, steps)
    assert any(r.startswith("the input embedding table in CPU memory") for r in p.reasons)
    assert not any(r.startswith("the input embedding table in CPU memory") for r in kept.reasons)
    assert any("without bf16" in r and "packed" in r for r in p.reasons)
    assert any("xformers' block-diagonal causal" in r for r in p.reasons)
    assert any(r.startswith("no gradient checkpointing: ") and "times this split's GPU work" in r for r in p.reasons)
    # a real T4 (14.75 GiB, part of it the CUDA context's): the same layout within its memory
    t4 = plan.resolve(RunConfig(data="x.jsonl", batch_size=2, grad_accum=4, max_steps=60),
                      Hardware("cuda", "Tesla T4", "float16", "no bf16", 14.75), shape(tmp_path, "t4", "llama-3-8b"),
                      alpaca, backend=("unsloth", "test"))
    assert t4.padding_free and not t4.gradient_checkpointing and t4.fit["reserved_gb"] <= 14.75 * fit.RESERVED_HEADROOM
    assert passes_per_step(t4, steps) < 2


def test_the_gpu_bound_fit_recomputes_some_layers_only_where_the_rows_need_it(tmp_path):
    """Rows too long to train without recomputation on 15 GB: most layers keep their activations (Unsloth's
    checkpoint_skip_layers), the rest recomputed; asked for, checkpointing covers every layer."""
    from speedtune.training import costs

    model = str(shape(tmp_path, "llama-3-8b"))
    long_rows = [[2000] * 8] * 10
    part = costs.gpu_bound_fit(model, steps=long_rows, rows_per_step=8, micro_batch=2, longest_row=2000, lora_r=16,
                               four_bit=True, capacity_gb=15)
    assert part.gradient_checkpointing and 0 < part.keep_layers < 32 and part.token_budget >= 2000
    assert part.reserved_gb <= 15 * fit.RESERVED_HEADROOM
    assert any("checkpoint_skip_layers" in r and "would not fit" in r for r in part.reasons)
    every = costs.gpu_bound_fit(model, steps=long_rows, rows_per_step=8, micro_batch=2, longest_row=2000, lora_r=16,
                                four_bit=True, capacity_gb=15, checkpointing=True)
    assert every.gradient_checkpointing and every.keep_layers == 0 and every.token_budget > part.token_budget
    short = costs.gpu_bound_fit(model, steps=[[200] * 8] * 10, rows_per_step=8, micro_batch=2, longest_row=200,
                                lora_r=16, four_bit=True, capacity_gb=15)
    assert not short.gradient_checkpointing and short.keep_layers == 0


def test_the_h200_default_records_passes_only_where_the_capture_pays(tmp_path, alpaca, monkeypatch):
    """bf16 on an H200 (the matmul rate measured there, 770 TFLOP/s): the 8B recipe of 60 steps keeps its packed pass
    graphs, with fewer widths than a long run's; 20 steps don't pay for recording and run eagerly (padded rows,
    compiled blocks); the 135M recipe keeps its padded pass graphs."""
    from speedtune import hardware

    monkeypatch.setattr(hardware, "matmul_tflops", lambda *a, **k: 770.0)
    model = shape(tmp_path, "llama-3-8b")
    runs = {steps: plan.resolve(RunConfig(data="x.jsonl", batch_size=2, grad_accum=4, max_steps=steps), H200, model,
                                alpaca, backend=("unsloth", "t")) for steps in (20, 60, 500)}
    assert runs[60].step_graphs and runs[60].padding_free and runs[500].step_graphs
    assert runs[500].pad_multiple == fit.packed_multiple(alpaca, 8) < runs[60].pad_multiple
    widest_step = max(map(sum, costs.run_steps(alpaca, 8, 500, 3407)))
    assert min(runs[60].token_budget, runs[500].token_budget) >= widest_step  # one pass a step, as before
    assert runs[60].token_budget > runs[500].token_budget  # fewer shapes recorded: less of the pool held
    assert not runs[20].step_graphs and not runs[20].padding_free and runs[20].causal_only
    assert runs[20].pad_multiple is None
    assert any(r.startswith("pass graphs do not pay") for r in runs[20].reasons)
    assert any(r.startswith("pass graphs pay") for r in runs[60].reasons)
    small = plan.resolve(RunConfig(data="x.jsonl", batch_size=4, grad_accum=1, max_steps=60), H200,
                         shape(tmp_path, "smollm2-135m"), alpaca, backend=("unsloth", "t"))
    assert small.step_graphs and not small.padding_free
    asked = plan.resolve(RunConfig(data="x.jsonl", batch_size=2, grad_accum=4, max_steps=20, step_graphs=True), H200,
                         model, alpaca, backend=("unsloth", "t"))
    assert asked.step_graphs  # asked for: recorded whatever the estimate


def test_the_matmul_probe_is_measured_once_per_gpu_and_torch(tmp_path, monkeypatch):
    import torch

    from speedtune import hardware

    monkeypatch.setenv("SPEEDTUNE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    names = iter(["GPU A", "GPU A", "GPU B"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: next(names))
    calls = []
    monkeypatch.setattr(hardware, "measure_matmul_tflops", lambda *a: calls.append(a) or 100.0 + len(calls))
    assert hardware.matmul_tflops("float16") == 101.0
    assert hardware.matmul_tflops("float16") == 101.0  # the same GPU and torch: read from the cache
    assert hardware.matmul_tflops("float16") == 102.0 and len(calls) == 2  # another GPU: measured
    cached = json.loads((tmp_path / "cache" / "matmul-tflops.json").read_text())
    assert cached == {f"GPU A | torch {torch.__version__} | float16 | 4096": 101.0,
                      f"GPU B | torch {torch.__version__} | float16 | 4096": 102.0}


def test_expandable_segments_are_set_unless_the_user_set_the_allocator(monkeypatch):
    import os

    from speedtune import hardware

    for var in hardware.ALLOC_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # as on a GPU machine (this one may have no NVIDIA driver)
    said = hardware.configure_allocator()

    assert all(os.environ[v] == "expandable_segments:True" for v in hardware.ALLOC_VARS) and "set by speedtune" in said
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    assert "max_split_size_mb:128 (set before speedtune)" in hardware.configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128" and "PYTORCH_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    if not os.path.exists("/proc/driver/nvidia"):
        assert "no NVIDIA driver" in hardware.configure_allocator() and "PYTORCH_ALLOC_CONF" not in os.environ


def test_unsloth_compiles_its_blocks_only_where_the_compile_pays(tmp_path, alpaca, monkeypatch):
    """The 8B recipe's 60 steps on an H200 save less GPU time than the ~20 s compile costs: the blocks run
    uncompiled; a long run compiles them. UNSLOTH_BLOCK_COMPILE set by the user holds; one set by an earlier run in
    the same process does not count as the user's. Other backends compile nothing."""
    from speedtune import hardware
    from speedtune.training import backends

    monkeypatch.setattr(hardware, "matmul_tflops", lambda *a, **k: 770.0)
    monkeypatch.delenv("UNSLOTH_BLOCK_COMPILE", raising=False)
    monkeypatch.setattr(backends, "_SET_HERE", {})
    model = shape(tmp_path, "llama-3-8b")

    def run(steps, backend="unsloth"):
        return plan.resolve(RunConfig(data="x.jsonl", batch_size=2, grad_accum=4, max_steps=steps), H200, model,
                            alpaca, backend=(backend, "t"))

    short, long_ = run(60), run(20000)
    assert not short.block_compile and long_.block_compile
    assert any(r.startswith("Unsloth's per-block compile (torch.compile) does not pay") for r in short.reasons)
    assert any(r.startswith("Unsloth's per-block compile (torch.compile) pays") for r in long_.reasons)
    assert not run(60, "peft").block_compile
    monkeypatch.setenv("UNSLOTH_BLOCK_COMPILE", "1")
    forced = run(60)
    assert forced.block_compile and "UNSLOTH_BLOCK_COMPILE=1 in the environment" in " ".join(forced.reasons)
    backends.set_env("UNSLOTH_BLOCK_COMPILE", "1")  # as a run's load sets it: the next plan decides afresh
    assert not run(60).block_compile and backends.user_env("UNSLOTH_BLOCK_COMPILE") is None
