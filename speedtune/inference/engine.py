"""What every chat backend shares: the sampling settings and the `Engine` interface (`stream(messages, sampling)`).
The engines live beside it: `inference.HFEngine` (transformers), `gguf_engine.GGUFEngine` (llama.cpp) and
`remote.RemoteEngine` (any OpenAI-compatible server); `inference.load_engine` picks one for a target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9


class Engine:
    name: str = ""

    def stream(self, messages: list[dict], sampling: Sampling) -> Iterator[str]:
        raise NotImplementedError

    def answer(self, messages: list[dict], sampling: Sampling) -> str:
        return "".join(self.stream(messages, sampling)).strip()
