import json

import pytest

from speedtune import fit
from speedtune.bench import SHAPES


@pytest.fixture
def llama8b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["llama-3-8b"]))
    return str(tmp_path)


def test_speed_plan_keeps_the_effective_batch_and_drops_checkpointing_on_a_big_gpu(llama8b):
    p = fit.plan("speed", llama8b, effective_batch=8, micro_batch=2, seq_len=2048, lora_r=16, four_bit=True,
                 capacity_gb=80)
    assert p.micro_batch * p.grad_accum == 8 and not p.gradient_checkpointing and p.estimated_gb <= 80 * fit.HEADROOM
    assert p.reasons


def test_small_gpu_keeps_checkpointing_and_memory_profile_is_smallest(llama8b):
    t4 = fit.plan("speed", llama8b, 8, 2, 2048, 16, True, capacity_gb=15)
    assert t4.gradient_checkpointing and t4.micro_batch * t4.grad_accum == 8 and t4.estimated_gb <= 15
    mem = fit.plan("memory", llama8b, 8, 2, 2048, 16, True, capacity_gb=80)
    assert (mem.micro_batch, mem.grad_accum, mem.gradient_checkpointing) == (1, 8, True)
    assert mem.estimated_gb < t4.estimated_gb
    off = fit.plan("off", llama8b, 8, 2, 2048, 16, True, capacity_gb=80)
    assert (off.micro_batch, off.grad_accum) == (2, 4)


def test_estimate_grows_with_tokens_and_shrinks_with_4bit(llama8b):
    s = fit.shape(llama8b)
    assert fit.estimate_gb(s, 2, 2048, 16, True, False) > fit.estimate_gb(s, 1, 2048, 16, True, False)
    assert fit.estimate_gb(s, 1, 2048, 16, False, True) > fit.estimate_gb(s, 1, 2048, 16, True, True)
    assert fit.estimate_gb(s, 2, 2048, 16, True, True) < fit.estimate_gb(s, 2, 2048, 16, True, False)


def test_estimate_stays_above_the_measured_peaks_without_wasting_the_gpu(tmp_path):
    """The committed GPU benchmarks (benchmarks/results) hold each fitted run's plan and its measured peak: the
    estimate must not fall below a measured peak (that would be an out-of-memory crash on a GPU the size of the
    estimate), nor exceed it by more than half (that would give up speed for nothing)."""
    from pathlib import Path

    results = Path(__file__).parent.parent / "benchmarks" / "results"
    checked = 0
    for f in sorted(results.glob("*-nvidia-h200-llama-3-8b-seq*.json")):
        report = json.loads(f.read_text())
        (tmp_path / "config.json").write_text(json.dumps(SHAPES[report["shape"]]))
        s, suite = fit.shape(str(tmp_path)), report["suite"]
        for r in report["results"]:
            if r.get("backend") != "unsloth" or "peak_alloc_gb" not in r:
                continue
            est = fit.estimate_gb(s, r["micro_batch"], suite["seq_len"], suite["lora_r"], suite["load_in_4bit"],
                                  r["gradient_checkpointing"], 2, r.get("offload_embeddings", False))
            assert r["peak_alloc_gb"] <= est <= 1.5 * r["peak_alloc_gb"], (f.name, r["name"], est, r["peak_alloc_gb"])
            checked += 1
    assert checked >= 5


def test_train_applies_the_fit_to_unsloth_runs_only_and_records_why(llama8b):
    from speedtune.config import RunConfig
    from speedtune.hardware import Hardware
    from speedtune.train import apply_fit

    h100 = Hardware("cuda", "NVIDIA H100", "bfloat16", "test", memory_gb=80)
    fast = RunConfig(model_path=llama8b, data="x", output="y")
    rec = apply_fit(fast, h100, backend="unsloth")
    assert (fast.batch_size, fast.grad_accum, fast.gradient_checkpointing) == (2, 4, False)
    assert any("padding-free" in r for r in rec["reasons"])
    vanilla = RunConfig(model_path=llama8b, data="x", output="y")
    rec = apply_fit(vanilla, h100, backend="peft")
    assert vanilla.gradient_checkpointing is True and rec["mode"] == "off" and "PEFT" in rec["reasons"][0]
    small = RunConfig(model_path=llama8b, data="x", output="y", fit="memory")
    apply_fit(small, h100, backend="unsloth")
    assert (small.batch_size, small.grad_accum, small.offload_embeddings) == (1, 8, True)
    mine = RunConfig(model_path=llama8b, data="x", output="y", gradient_checkpointing=True, batch_size=4, grad_accum=2)
    apply_fit(mine, h100, backend="unsloth")  # the user chose checkpointing: their recipe runs as given
    assert (mine.batch_size, mine.grad_accum, mine.gradient_checkpointing) == (4, 2, True)
    assert apply_fit(RunConfig(model_path=llama8b), Hardware("cpu", "cpu", "float32", "test")) is None
