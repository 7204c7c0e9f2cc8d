"""The one place where speedtune opens a GGUF with llama.cpp (llama-cpp-python): export verification, GGUF chat,
the quickstart and `serve` all load through `open_llama`, `read_metadata` or `safe_loading`.

Why one place: on Intel CPUs with AMX (Sapphire Rapids and later), llama.cpp's AMX weight-repacking buffer type
crashes the process with a segfault at the first `eval` (upstream ggml-org/llama.cpp#20824). Loading with the model
parameter `use_extra_bufts = False` (llama.cpp's `--no-repack`) avoids it. llama-cpp-python does not take that
parameter as a `Llama()` keyword, so loads happen inside `safe_loading()`, which hands llama.cpp default model
parameters with the flag set.

The policy (`extra_bufts_allowed`): repacking stays on where the CPU has no AMX, because it makes Q4 models faster
there (measured: q4_0 prompts 30% faster, nothing slower; see the README's "llama.cpp on every CPU"), and is off on AMX
CPUs. SPEEDTUNE_LLAMA_REPACK=0 or 1 overrides the choice."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from speedtune.errors import UserError, install_hint
from speedtune import hardware

GGUF_MAGIC = b"GGUF"
_LOCK = threading.RLock()


def cpu_has_amx() -> bool:
    return any(f.startswith("amx") for f in hardware.cpu_flags())


def extra_bufts_allowed() -> bool:
    """Whether llama.cpp may use its extra buffer types (weight repacking) on this machine."""
    env = os.environ.get("SPEEDTUNE_LLAMA_REPACK", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return not cpu_has_amx()


def model_param_overrides() -> dict:
    """The llama_model_params fields speedtune sets on every load."""
    return {"use_extra_bufts": extra_bufts_allowed()}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"GGUF files need llama-cpp-python: {install_hint('gguf')}") from None
    return llama_cpp


@contextmanager
def safe_loading():
    """Every llama.cpp model created inside this block (by `Llama(...)`, or by llama-cpp-python's server) gets
    speedtune's model parameters. Loads are serialised; the patch is undone on exit."""
    import llama_cpp.llama_cpp as C

    _llama_cpp()
    overrides = model_param_overrides()
    with _LOCK:
        original = C.llama_model_default_params

        def defaults():
            params = original()
            for key, value in overrides.items():
                setattr(params, key, value)
            return params

        C.llama_model_default_params = defaults  # patches the binding Llama() reads (checked: llama-cpp-python 0.3.36)
        try:
            yield overrides
        finally:
            C.llama_model_default_params = original


def check_gguf(path: Path) -> Path:
    """A clear one-line error for a path that is missing or is not a GGUF file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a GGUF file; give the .gguf file inside it")
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: can't be read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (it does not start with 'GGUF'); convert a model with "
                        "speedtune export RUN --gguf q8_0")
    return path


def open_llama(path: Path, n_ctx: int = 2048, logits_all: bool = False, **kwargs):
    """A llama_cpp.Llama for a GGUF file, loaded safely on every CPU."""
    path = check_gguf(path)
    llama_cpp = _llama_cpp()
    try:
        with safe_loading():
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, seed=0,
                                   **kwargs)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path}: llama.cpp could not load it ({e}); the file is damaged or truncated (an unfinished "
                        "download or copy?), or there is too little memory") from None


def read_metadata(path: Path) -> tuple[dict[str, str], dict[int, str]]:
    """A GGUF's metadata as llama.cpp reads it (every key but the arrays, each value as text: '2', 'false', the chat
    template as written) and the text of its special tokens (those its `tokenizer.ggml.*_token_id` keys name), from a
    vocabulary-only load: no weights are read, so it takes a tenth of a second where the gguf package's reader, which
    parses the whole vocabulary into Python objects, took 3.5 s on SmolLM2's 49,152 tokens."""
    path = check_gguf(path)
    _llama_cpp()
    from llama_cpp import _internals
    from llama_cpp import llama_cpp as C

    try:
        with safe_loading():
            params = C.llama_model_default_params()  # speedtune's parameters (safe_loading), then vocabulary only
            params.vocab_only = True
            model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path}: llama.cpp could not load it ({e}); the file is damaged or truncated (an unfinished "
                        "download or copy?)") from None
    try:
        meta = model.metadata()
        ids = {int(v) for k, v in meta.items() if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")
               and v.lstrip("-").isdigit()}
        return meta, {i: model.token_get_text(i) for i in sorted(ids) if 0 <= i < model.n_vocab()}
    finally:
        model.close()


def system_info() -> str:
    return _llama_cpp().llama_print_system_info().decode(errors="replace")
