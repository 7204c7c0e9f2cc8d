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
