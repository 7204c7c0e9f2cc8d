"""Load anything a user may want to talk to, behind one `Engine.stream(messages, ...)`:
a model alias/folder/hub id, a run folder (base + LoRA adapter), a merged folder (transformers), a `.gguf`
(llama.cpp), or an OpenAI-compatible URL. The chat template is the target's own, so it is the one used in training."""

from __future__ import annotations

import threading
from pathlib import Path

from speedtune import hardware
from speedtune.inference.engine import Engine
from speedtune.errors import UserError
from speedtune.models.registry import resolve_model
from speedtune.runs import RunFolder


def is_run_folder(path: Path) -> bool:
    return RunFolder(path).is_run()


def check_run_folder(run: Path) -> Path:
    """A run folder that can be loaded: its adapter weights are there (an interrupted or half-copied run has only
    the config)."""
    folder = RunFolder(run)
    if not folder.has_weights():
        saved = sorted(folder.checkpoints.glob("checkpoint-*")) if folder.checkpoints.is_dir() else []
        hint = f"; a checkpoint is in {saved[-1]}" if saved else ""
        raise UserError(f"{run}: the run folder has no adapter weights (adapter_model.safetensors): training did not "
                        f"finish or the folder is incomplete{hint}")
    return run


def run_base_model(run: Path) -> str:
    """The base model a run folder was trained from (its saved plan or config, else the adapter's config)."""
    return RunFolder(run).base_model()


def load_hf(target: str, device: str | None = None):
    """(model, tokenizer, hardware) for a model spec or a run folder, in the hardware's precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hw = hardware.detect(device)
    path = Path(target).expanduser()
    run = check_run_folder(path) if is_run_folder(path) else None
    base = resolve_model(run_base_model(run)) if run else resolve_model(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(run or base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=hardware.torch_dtype(hw.dtype))
        if run:
            from peft import PeftModel

            if (run / "generation_config.json").is_file():  # the run's: it stops where training ended turns
                from transformers import GenerationConfig

                model.generation_config = GenerationConfig.from_pretrained(run)
            model = PeftModel.from_pretrained(model, run)
    except (OSError, ValueError, KeyError) as e:  # a damaged or incomplete folder: transformers says which file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{run or base}: can't be loaded ({type(e).__name__}: {first})") from None
    model.to(hw.device).eval()
    return model, tokenizer, hw


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids generation stops on: the generation config's EOS plus the tokenizer's EOS."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class HFEngine(Engine):
    def __init__(self, target: str, device: str | None = None):
        self.model, self.tokenizer, self.hw = load_hf(target, device)
        self.name = str(target)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)

    def stream(self, messages, sampling):
        from transformers import TextIteratorStreamer

        tok = self.tokenizer
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        greedy = sampling.temperature <= 0
        kwargs = dict(**enc, streamer=streamer, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                      eos_token_id=stop_ids(self.model, tok), pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        thread = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()


def load_engine(target: str, device: str | None = None, url: str | None = None, n_ctx: int = 2048) -> Engine:
    """The engine for a model spec / folder / .gguf (`target`) or an OpenAI-compatible endpoint (`url`)."""
    if url is not None:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--url {url}: give the full address, e.g. http://127.0.0.1:8000/v1")
        from speedtune.inference.remote import RemoteEngine

        return RemoteEngine(url)
    if target.startswith(("http://", "https://")):
        from speedtune.inference.remote import RemoteEngine

        return RemoteEngine(target)
    if target.endswith(".gguf"):
        from speedtune.inference.gguf_engine import GGUFEngine

        return GGUFEngine(Path(target), n_ctx)
    return HFEngine(target, device)
