"""speedtune.plan: how the default pass graphs lay out a step's rows, from the model's shape and the real lengths."""
import json

import pytest

from speedtune import fit, plan
from speedtune.bench import SHAPES
from speedtune.config import RunConfig
from speedtune.hardware import Hardware
from speedtune.paths import demo_dir

H200 = Hardware("cuda", "NVIDIA H200", "bfloat16", "the GPU supports bf16", 139.8)


@pytest.fixture
def alpaca():
    return [int(x) for x in (demo_dir() / "alpaca-lengths.txt").read_text().split()]


def shape(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps({**SHAPES[name], "model_type": "llama"}))
    return tmp_path / name


def test_the_default_graphs_pack_the_8b_rows_and_pad_the_135m_ones(tmp_path, alpaca):
    cfg = RunConfig(data="x.jsonl", batch_size=2, grad_accum=4)
    big = plan.resolve(cfg, H200, shape(tmp_path, "llama-3-8b"), alpaca, backend=("unsloth", "test"))
    assert big.step_graphs and big.padding_free and big.pad_multiple == fit.packed_multiple(alpaca, 8) == 256
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
    assert not peft.padding_free
    eager = plan.resolve(RunConfig(data="x.jsonl", step_graphs=False), H200, model, alpaca, backend=("unsloth", "t"))
    assert not eager.step_graphs and not eager.padding_free
