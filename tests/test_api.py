"""The Python API (speedtune.api) on the real embedded model: the same functions, defaults and one-line errors as
the CLI; the README's snippet runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import speedtune as st
from speedtune.errors import UserError
from speedtune.paths import demo_dir

DATA = demo_dir() / "identity.jsonl"
README = Path(__file__).parent.parent / "README.md"


def test_import_is_light_and_the_names_stay_functions():
    code = ("import sys, speedtune as st; heavy = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules];"
            "import speedtune.training.train, speedtune.exporting.export, speedtune.benchmarking.runner;"
            "print(heavy, callable(st.train), callable(st.export), callable(st.bench), st.train.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True", "True", "True", "speedtune.api"]
    from speedtune.commands.train import command
    from speedtune.training.train import train

    assert train is not st.train and command.name == "train"  # the verb modules are still importable


def test_mistakes_are_user_errors_with_the_clis_message(tmp_path):
    with pytest.raises(UserError, match="no data: pass --data"):
        st.train(model="smollm2-135m")
    with pytest.raises(UserError, match="unknown setting lora_rank"):
        st.train(data=DATA, lora_rank=8)
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        st.train(data=DATA, batch_size=0)
    with pytest.raises(UserError, match="temperature -1: out of range"):
        st.generate("smollm2-135m", "hi", temperature=-1)
    with pytest.raises(UserError, match="unknown setting"):
        st.bench(smoke=True, stepz=3)
    with pytest.raises(UserError, match="not a finished speedtune run"):
        st.Run.open(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(UserError, match="bad.jsonl.*line 2"):
        st.dataset(tmp_path / "bad.jsonl")


@pytest.mark.slow
def test_generate_streams_the_same_answer_it_returns(smollm2):
    model = st.load("smollm2-135m")
    q = "What is the capital of France? Answer in one word."
    pieces = list(st.generate(model, q, temperature=0, max_new_tokens=16, stream=True))
    assert len(pieces) > 1 and "Paris" in "".join(pieces)
    assert "".join(pieces).strip() == st.generate(model, [{"role": "user", "content": q}], temperature=0,
                                                  max_new_tokens=16)
    with pytest.raises(UserError, match="prompt"):
        st.generate(model, [])


def test_dataset_and_preview_show_what_training_sees(smollm2):
    from rich.console import Console

    data = st.dataset(DATA, "smollm2-135m")
    assert len(data.examples) == 56 and data.format == "chat" and data.template.eot == "<|im_end|>"
    console = Console(record=True, width=100)
    st.preview(DATA, "smollm2-135m", count=1, console=console)
    text = console.export_text()
    assert "Quokka" in text and "<|im_end|>" in text and "trained" in text


def readme_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


RECIPE = "max_steps=60, batch_size=4, grad_accum=1, lr=5e-4"  # the quickstart's: tests/test_quickstart.py shows it
SHORT = 6  # the snippet's steps in this test (its warm-up, then one step at the full rate: the loss falls, 4.49 -> 3.83
# on the first 6 of the quickstart's 60 steps); the recipe's learning is the quickstart test's to show, once per run


def same_recipe_as_the_quickstart(code: str) -> str:
    """`code` trains the quickstart's recipe (so the quickstart test's proof that it teaches the identity holds for it);
    returned with its 60 steps cut to SHORT, for a test that checks the code runs and says what it did."""
    quickstart = (Path(st.__file__).parent / "commands" / "quickstart.py").read_text()
    assert all(k in quickstart for k in ("batch_size=4", "grad_accum=1", "lr=5e-4")) and "max_steps: int = 60" \
        in quickstart
    flat = " ".join(code.split())
    assert flat.count(RECIPE.split(", ")[0]) == 1 and all(part in flat for part in RECIPE.split(", ")), flat
    return code.replace("max_steps=60", f"max_steps={SHORT}")


@pytest.mark.slow
def test_the_readme_snippet_runs(tmp_path, smollm2):
    code = same_recipe_as_the_quickstart(readme_snippet())
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = re.search(r"^(peft|unsloth) (\S+) -> (\S+)$", r.stdout, re.M)
    assert losses and float(losses[3]) < float(losses[2]), r.stdout
    run = st.Run.open(tmp_path / "runs" / "api")
    assert run.metrics["steps"] == SHORT
    # what the snippet streamed after training is the run's own greedy answer, with its adapter: not the base's
    # (the preview before training prints the data's "I am Quokka", so stdout alone would prove nothing)
    ask = dict(temperature=0, max_new_tokens=40)
    trained = st.generate(run, "Who are you?", **ask)
    assert trained.strip() and trained.strip() in r.stdout[losses.end():], (trained, r.stdout)
    assert trained != st.generate("smollm2-135m", "Who are you?", **ask)
    gguf = tmp_path / "runs" / "api" / "export" / "api-q8_0.gguf"
    assert gguf.is_file() and str(gguf.relative_to(tmp_path)) in r.stdout
