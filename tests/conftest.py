"""Shared fixtures: the real embedded SmolLM2 (materialised once into the speedtune cache) and a tiny random model
built from its real tokenizer (2 layers), so most tests take seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from speedtune.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model(smollm2, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(smollm2)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run the real `speedtune` command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "speedtune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A user mistake: non-zero exit, one line on stderr naming the problem, no traceback."""
    err = result.stderr.strip()
    assert result.returncode != 0, result.stdout + err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def real_run(smollm2, tmp_path_factory) -> Path:
    """A short real run of the embedded default on the bundled identity data (CPU, a few steps)."""
    from speedtune.paths import demo_dir

    out = tmp_path_factory.mktemp("runs") / "smol"
    r = cli("train", "--model", "smollm2-135m", "--data", demo_dir() / "identity.jsonl", "--max-steps", "4",
            "--batch-size", "4", "--grad-accum", "1", "--lr", "5e-4", "--output", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def exported(real_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "gguf"
    r = cli("export", real_run, "--gguf", "f16,q8_0", "--ollama", "--lmstudio", "--output", out)
    assert r.returncode == 0, r.stderr
    return out
