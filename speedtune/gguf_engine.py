"""Talking to a GGUF through llama.cpp (llama-cpp-python): the chat template and EOS come from the file itself,
exactly as Ollama, LM Studio and Jan will read them."""

from __future__ import annotations

from pathlib import Path

from speedtune.errors import UserError
from speedtune.inference import Engine, Sampling


def open_llama(path: Path, n_ctx: int = 2048, logits_all: bool = False):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("GGUF files need llama-cpp-python: pip install 'speedtune[gguf]'") from None
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, seed=0)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path}: llama.cpp could not load it ({e})") from None


class GGUFEngine(Engine):
    def __init__(self, path: Path, n_ctx: int = 2048):
        self.llm = open_llama(path, n_ctx)
        self.name = str(path)
        self.last_finish_reason: str | None = None

    def stream(self, messages, sampling: Sampling):
        greedy = sampling.temperature <= 0
        chunks = self.llm.create_chat_completion(
            messages=messages, stream=True, max_tokens=sampling.max_new_tokens,
            temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=1 if greedy else 40, seed=0)
        for chunk in chunks:
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):
                self.last_finish_reason = choice["finish_reason"]
            text = choice.get("delta", {}).get("content")
            if text:
                yield text
