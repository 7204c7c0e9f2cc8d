"""Talking to a GGUF through llama.cpp (llama-cpp-python): the chat template and EOS come from the file itself,
exactly as Ollama, LM Studio and Jan will read them."""

from __future__ import annotations

from pathlib import Path

from speedtune.inference.engine import Engine, Sampling
from speedtune.inference.llamacpp import open_llama


class GGUFEngine(Engine):
    def __init__(self, path: Path, n_ctx: int = 2048):
        self.llm = open_llama(path, n_ctx)
        self.name = str(path)
        self.context_length = self.llm.n_ctx()  # what this engine opened: prompt + answer must fit
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
