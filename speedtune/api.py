"""The Python API: the same path as the CLI, as functions a notebook calls. `import speedtune as st`, then

    model = st.load("smollm2-135m")                       # an alias, folder, run folder, .gguf or URL
    print(st.generate(model, "Who are you?", temperature=0))
    data = st.dataset("identity.jsonl")                  # checked and tokenised as training will see it
    run = st.train(data="identity.jsonl", max_steps=60)  # the one training function; returns the run folder
    report = st.export(run, gguf=["q8_0"], ollama=True)   # merged, converted and verified GGUFs

Every function here is a thin door to the one the CLI verb runs (`train.train`, `export.export_run`,
`inference.load_engine`, `data.dataset.for_model`, `bench.run_suite`): same defaults, same checks, and the same
`speedtune.UserError` with its one-line message (in IPython/Jupyter it is shown as that one line, not a traceback)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from speedtune.errors import UserError
from speedtune.runs import RunFolder


@dataclass
class Run:
    """A finished run folder: the PEFT adapter, `metrics.json`, `run_config.yaml` (what was asked and the plan),
    `loss.png`. Pass it (or its path) to `generate`, `load` and `export`."""

    path: Path
    metrics: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path) -> "Run":
        metrics = RunFolder(path).metrics()
        if metrics is None:
            raise UserError(f"{path}: not a finished speedtune run (no metrics.json); train one with speedtune.train")
        return cls(Path(path), metrics)

    @property
    def plan(self) -> dict:
        """How the run was laid out on the machine it ran on: the plan (`plan:` in run_config.yaml) with what the
        run settled otherwise (events.jsonl) applied."""
        return RunFolder(self.path).plan_as_run()

    @property
    def loss_plot(self) -> Path:
        return RunFolder(self.path).loss_plot

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _target(model) -> str:
    return str(model.path if isinstance(model, Run) else model)


def load(model="smollm2-135m", *, device: str | None = None, url: str | None = None, n_ctx: int = 2048):
    """A chat engine for a model alias, hub id, local or merged folder, run folder (base + adapter), `.gguf` file
    (llama.cpp) or an OpenAI-compatible `url`. What `speedtune chat` talks to."""
    from speedtune.inference.loader import load_engine

    return load_engine(_target(model), device=device, url=url, n_ctx=n_ctx)


def generate(model, prompt: str | list[dict], *, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.7, top_p: float = 0.9, stream: bool = False) -> str | Iterator[str]:
    """The model's answer to `prompt` (a string, or a whole list of chat messages). `model` is an engine from
    `load` or anything `load` takes. `stream=True` returns the pieces as they are generated:
    `for piece in st.generate(m, "Hi", stream=True): print(piece, end="", flush=True)`. `temperature=0` is greedy."""
    from speedtune.checks import check_range
    from speedtune.training.config import check_finite
    from speedtune.inference.engine import Engine, Sampling

    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p)):
        check_finite(name, value, fix="a number")
    check_range("max_new_tokens", max_new_tokens, 1)
    check_range("temperature", temperature, 0, 100, " (0 is greedy)")
    check_range("top_p", top_p, 0, 1)
    engine = model if isinstance(model, Engine) else load(model)
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages = list(prompt)
    else:
        raise UserError("prompt: give a string or a non-empty list of {'role': ..., 'content': ...} messages")
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return engine.stream(messages, sampling) if stream else engine.answer(messages, sampling)


def dataset(data: str, model="smollm2-135m", *, format: str | None = None, columns: str | None = None,
            template: str | None = None, train_on: str = "responses", drop_bad: bool = False, seq_len: int = 2048):
    """The dataset as training will see it (`speedtune data check`): every row formatted with the model's
    template, tokenised and checked. Returns a `Built` (`.examples`, `.format`, `.template`, `.dropped`, `.tokens`);
    a bad row raises UserError naming the file and row."""
    from speedtune.data.dataset import DataOptions, for_model

    built, _, _ = for_model(_target(model), DataOptions(str(data), format, columns, template, train_on, drop_bad),
                            seq_len=seq_len)
    return built


def preview(data: str, model="smollm2-135m", *, count: int = 3, format: str | None = None, columns: str | None = None,
            template: str | None = None, train_on: str = "responses", drop_bad: bool = False, seq_len: int = 2048,
            console=None) -> None:
    """Print `count` examples as `speedtune data preview` does: special tokens magenta, the trained part green."""
    from speedtune.data.dataset import DataOptions, for_model
    from speedtune.data.render import show_preview

    built, tokenizer, _ = for_model(_target(model), DataOptions(str(data), format, columns, template, train_on,
                                                                drop_bad), seq_len=seq_len, limit=count)
    show_preview(built, tokenizer, count, console)


def train(config: str | None = None, /, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          verbose: bool = False, console=None, **settings) -> Run:
    """Fine-tune as `speedtune train` does: `config` is an optional YAML file, `settings` are its keys (the flag
    names with underscores: model, data, output, max_steps, lr, lora_r, batch_size, ...), and win over the file.
    Returns the finished `Run` (its folder, metrics and plan). `verbose=True` prints why the plan chose each setting
    (`Run.plan["reasons"]` holds them either way)."""
    from speedtune.training import config as config_mod
    from speedtune.training.train import train as train_run

    unknown = [k for k in settings if k not in config_mod.FIELDS]
    if unknown:
        raise UserError(f"train: unknown setting {', '.join(unknown)}; known: {', '.join(config_mod.FIELDS)}")
    cfg = config_mod.load(config, {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()})
    return Run.open(train_run(cfg, resume=resume, overwrite=overwrite, console=console, show_progress=progress,
                              verbose=verbose))


def export(run, output=None, *, gguf: list[str] | str | None = None, merged: str | None = None,
           ollama: bool = False, lmstudio: bool = False, push_to_hub: str | None = None, base: str | None = None,
           name: str | None = None, overwrite: bool = False, console=None) -> dict:
    """Merge and convert a run as `speedtune export` does (default: `<run>/export`, the GGUF quants that suit the
    model's size), verify every GGUF against the merged model, and return the report: per GGUF its file, size,
    top-1 agreement, mean KL, and whether greedy chat stops on the end-of-turn token."""
    from speedtune.exporting.export import export_run

    quants = [q.strip() for q in gguf.split(",")] if isinstance(gguf, str) else gguf
    return export_run(Path(_target(run)), Path(output) if output else None, merged=merged, gguf=quants,
                      ollama=ollama, lmstudio=lmstudio, push_to_hub=push_to_hub, overwrite=overwrite, base=base,
                      name=name, console=console)


def bench(suite: str | None = None, *, smoke: bool = False, runs: list[str] | None = None, resume: bool = False,
          processes: int | None = None, console=None, **overrides) -> dict:
    """Run a benchmark suite as `speedtune bench` does (each run in a fresh process, side by side) and return its
    report (`report["files"]` names its JSON, Markdown and chart); `smoke=True` is the tiny CPU suite that proves the
    harness; `processes=N` adds each run data-parallel on N processes and reports the scaling."""
    from speedtune.benchmarking.runner import run_suite

    return run_suite(suite, smoke=smoke, only=runs, resume=resume, processes=processes, console=console, **overrides)


def _notebook_errors() -> None:
    """In IPython/Jupyter, show a UserError as its one line (what the CLI prints), not a traceback."""
    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython

    ip = get_ipython()
    if ip is None or not hasattr(ip, "set_custom_exc"):
        return

    def one_line(shell, etype, value, tb, tb_offset=None):
        print(f"error: {value}", file=sys.stderr)

    ip.set_custom_exc((UserError,), one_line)
