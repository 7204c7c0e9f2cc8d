"""Files that make a GGUF ready to use: an Ollama Modelfile (TEMPLATE equivalent to the training template, stop
parameters, SYSTEM), an LM Studio folder layout, and short notes for Jan and GPT4All."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from speedtune.data.templates import Template


def modelfile(gguf_name: str, template: Template, system: str | None = None, num_ctx: int = 2048) -> str:
    lines = [f"FROM ./{gguf_name}", ""]
    if template.ollama:
        lines += ['TEMPLATE """' + template.ollama + '"""', ""]
    system = system if system is not None else template.default_system
    if system:
        lines += ['SYSTEM """' + system + '"""', ""]
    for stop in dict.fromkeys(template.stop or [template.eot]):
        if stop:
            lines.append(f'PARAMETER stop "{stop}"')
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def tools_gap(template: Template, tokenizer) -> str | None:
    """Why the Modelfile would lose tool calling, when it would: the template writes tools (a Qwen2.5 or Llama-3.1
    model's own) but the TEMPLATE that matches it for chat (chatml, llama-3) does not."""
    from speedtune.data.tools import BUNDLED, supports_tools

    if not template.ollama or ".Tools" in template.ollama or not supports_tools(template, tokenizer):
        return None
    return (f"the Modelfile's TEMPLATE renders chat but not tools, which this model's own chat template writes: Ollama "
            "will not show it tools. Delete the TEMPLATE block to let Ollama pick its template from the GGUF, or "
            f"train with --template {BUNDLED} (ChatML models), whose TEMPLATE writes them")


def lmstudio_layout(gguf_files: list[Path], root: Path, publisher: str, model: str) -> Path:
    """LM Studio looks for models as <models dir>/<publisher>/<model>/<file>.gguf."""
    folder = root / publisher / model
    folder.mkdir(parents=True, exist_ok=True)
    for f in gguf_files:
        target = folder / f.name
        try:
            os.link(f, target)  # no second copy on disk
        except OSError:
            shutil.copy2(f, target)
    return folder


def notes(name: str, first: str, folder: Path, ollama: bool, lmstudio: Path | None) -> str:
    out = [f"# {name}: using the exported model", ""]
    if ollama:
        out += ["## Ollama", "", "```", f"cd {folder}",
                f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", ""]
    out += ["## LM Studio", "",
            (f"Copy or link `{lmstudio.parent.name}/` into LM Studio's models folder (`~/.lmstudio/models/`), or run "
             f"`lms import {first}`." if lmstudio else f"Run `lms import {first}`, or use My Models -> import."), "",
            "## Jan", "", f"Settings -> My Models -> Import model, and pick `{first}`. Jan reads the chat template "
            "and the end-of-turn token from the GGUF.", "",
            "## GPT4All", "", f"Copy `{first}` into GPT4All's models folder (Settings -> Application -> Download "
            "path); its chat template comes from the GGUF.", "",
            "## OpenAI-compatible server", "", "```", f"speedtune serve {first} --port 8000", "```", ""]
    return "\n".join(out)
