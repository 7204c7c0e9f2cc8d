"""Chat against any OpenAI-compatible endpoint (speedtune serve, Ollama's /v1, vLLM, LM Studio's server)."""

from __future__ import annotations

import os

from speedtune.errors import UserError
from speedtune.inference.engine import Engine, Sampling


class RemoteEngine(Engine):
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None):
        try:
            from openai import OpenAI
        except ImportError:
            raise UserError("--url needs the openai package: pip install openai") from None
        self.client = OpenAI(base_url=url.rstrip("/"), api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"),
                             max_retries=0, timeout=600)
        try:
            self.model = model or self.client.models.list().data[0].id
        except Exception as e:
            raise UserError(f"--url {url}: no OpenAI-compatible server answered ({type(e).__name__}); is it running, "
                            "and does the URL end with /v1?") from None
        self.name = f"{self.model} at {url}"

    def stream(self, messages, sampling: Sampling):
        chunks = self.client.chat.completions.create(
            model=self.model, messages=messages, stream=True, max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p)
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
