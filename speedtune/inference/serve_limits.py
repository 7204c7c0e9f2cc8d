"""The thin layer that bounds llama-cpp-python's OpenAI-compatible server (`speedtune serve`); the server itself is
llama-cpp-python's, untouched.

- `ValidateRequests` (ASGI middleware): a malformed request, `max_tokens` <= 0, an empty `messages` list or several
  prompts in one completion get an OpenAI-style 400 instead of a 500, a 200 or an endless generation. It also starts
  each request's clock and adds the `x-speedtune-*` headers that say when a request was capped or stopped.
- `bound_llama`: every generation (chat and completions both end in `Llama.create_completion`) gets a stopping
  criterion checked at every token: past the request's deadline (`--request-timeout`, counted from arrival, time
  waiting for the model included) or once the server is stopping, it ends with finish_reason "length".
  `max_tokens` above what the context leaves after the prompt is capped to that (llama.cpp cannot generate past its
  context) and said in the `x-speedtune-max-tokens` header.
- `BoundedServer`: SIGTERM and Ctrl-C set the stopping flag first, so a running generation ends at its next token and
  uvicorn's graceful shutdown (a few seconds at most) does not wait for it; a stream gets its last chunk and `[DONE]`
  (sse-starlette's own cut on shutdown is turned off: it raced that); the process exits 0."""

from __future__ import annotations

import contextvars
import json
import signal
import threading
import time
from dataclasses import dataclass

STOPPING = threading.Event()  # set once the server is asked to stop: every generation ends at its next token
GENERATING = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Budget:
    """One request's limits and what happened to them."""

    deadline: float  # time.monotonic() after which its generation stops
    timeout: float
    max_tokens: int | None = None  # as asked
    prompt_tokens: int | None = None  # seen at the first generated token
    n_ctx: int | None = None
    stopped: str | None = None  # "timeout" or "shutdown"

    def capped_to(self) -> int | None:
        """The max_tokens the request really got, when it asked for more than the context leaves."""
        if self.max_tokens is None or self.prompt_tokens is None or self.n_ctx is None:
            return None
        left = self.n_ctx - self.prompt_tokens
        return left if self.max_tokens > left else None

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = []
        capped = self.capped_to()
        if capped is not None:
            out.append((b"x-speedtune-max-tokens", f"{capped} (capped from {self.max_tokens}: the context of "
                        f"{self.n_ctx} leaves {capped} after the {self.prompt_tokens}-token prompt)".encode()))
        if self.stopped:
            why = f"--request-timeout {self.timeout:g} s" if self.stopped == "timeout" else "the server is stopping"
            out.append((b"x-speedtune-stopped", f"{self.stopped}: {why}".encode()))
        return out


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("speedtune_budget", default=None)


def bound_llama(llama, timeout: float):
    """Make every generation of this Llama stop at its request's deadline or when the server stops."""
    from llama_cpp import StoppingCriteriaList

    original = llama.create_completion
    n_ctx = llama.n_ctx()

    def create_completion(*args, **kwargs):
        budget = _BUDGET.get() or Budget(time.monotonic() + timeout, timeout)
        budget.n_ctx = n_ctx

        def over_budget(input_ids, logits) -> bool:
            if budget.prompt_tokens is None:
                budget.prompt_tokens = len(input_ids)
            if STOPPING.is_set():
                budget.stopped = budget.stopped or "shutdown"
            elif time.monotonic() >= budget.deadline:
                budget.stopped = budget.stopped or "timeout"
            return budget.stopped is not None

        kwargs["stopping_criteria"] = StoppingCriteriaList([over_budget, *(kwargs.get("stopping_criteria") or [])])
        result = original(*args, **kwargs)
        if kwargs.get("stream"):
            return _stream(result, budget)
        return _finished(result, budget)

    llama.create_completion = create_completion
    return llama


def _finished(result: dict, budget: Budget) -> dict:
    # llama-cpp-python reports a stopping criterion as "stop"; a cut answer is "length", as for max_tokens
    if budget.stopped:
        for choice in result.get("choices", []):
            choice["finish_reason"] = "length"
    return result


def _stream(chunks, budget: Budget):
    for chunk in chunks:
        if budget.stopped:
            for choice in chunk.get("choices", []):
                if choice.get("finish_reason"):
                    choice["finish_reason"] = "length"
        yield chunk


class ValidateRequests:
    """ASGI middleware in front of llama-cpp-python's app: OpenAI-style 400s for bad requests, a deadline per
    generating request, and the x-speedtune-* headers (sent with the first body chunk, when they are known)."""

    def __init__(self, app, timeout: float = 120.0):
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

        self.app = app
        self.timeout = timeout
        self.models = {"/v1/chat/completions": CreateChatCompletionRequest, "/v1/completions": CreateCompletionRequest}

    async def __call__(self, scope, receive, send):
        model = self.models.get(scope.get("path")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if model is None:
            return await self.app(scope, receive, send)
        budget = Budget(time.monotonic() + self.timeout, self.timeout)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if scope["path"] == "/v1/chat/completions":
            from speedtune.inference.tool_calls import request_body

            body = request_body(body)
        data, error = parse(model, body)
        if error:
            return await _error(send, 400, error)
        budget.max_tokens = data.get("max_tokens")
        _BUDGET.set(budget)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        held = None

        async def send_with_headers(message):
            nonlocal held
            if message["type"] == "http.response.start":
                held = message  # the headers wait for the first body chunk: by then the prompt has been read
                return
            if held is not None:
                start, held = held, None
                await send({**start, "headers": [*start.get("headers", []), *budget.headers()]})
            await send(message)

        # the body is JSON (checked above), whatever content-type the client sent (curl -d says form data)
        headers = [(k, v) for k, v in scope.get("headers", [])
                   if k.lower() not in (b"content-type", b"content-length")]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode())]}
        await self.app(scope, replay, send_with_headers)


async def _error(send, status: int, message: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                    "code": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def parse(model, body: bytes) -> tuple[dict, str | None]:
    """(the request as JSON, None) or ({}, why it is refused)."""
    from pydantic import ValidationError

    try:
        data = json.loads(body or b"null")
    except ValueError:
        return {}, "the request body is not valid JSON"
    if not isinstance(data, dict):
        return {}, "the request body must be a JSON object"
    try:
        model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        return {}, f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
    if "messages" in model.model_fields and not data.get("messages"):
        return {}, "messages: must hold at least one message"
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and max_tokens <= 0:
        return {}, f"max_tokens: must be at least 1 (got {max_tokens}); leave it out to use what the context allows"
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1:
        return {}, "prompt: one prompt per request (this server answers one at a time)"
    return data, None


class BoundedServer:
    """uvicorn, stopped promptly: the first SIGTERM or Ctrl-C sets STOPPING (generations end at their next token)
    and asks uvicorn to shut down gracefully within `grace` seconds; a second Ctrl-C forces it."""

    def __init__(self, app, sock, grace: int = 3):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # replaces uvicorn's: no signal re-raised after the shutdown
                STOPPING.set()
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

        self.sock = sock
        self.server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace))

    def run(self) -> None:
        STOPPING.clear()
        drain = _sse_drain(False)
        try:
            self.server.run(sockets=[self.sock])
        finally:
            _sse_drain(drain)


def _sse_drain(on: bool | None) -> bool | None:
    """Set sse-starlette's automatic drain (the server's streams are its EventSourceResponse); returns what it was.
    Left on, sse-starlette polls uvicorn's exit flag every 0.5 s and cancels an open stream as soon as it sees it,
    which races STOPPING: a stream could be cut before its last chunk (finish_reason "length") and `[DONE]`. Off, the
    generation ends at its next token and sends both, and uvicorn's grace period still bounds the wait."""
    try:
        from sse_starlette.sse import AppStatus
    except ImportError:
        return None
    was = AppStatus.enable_automatic_graceful_drain
    if on is not None:
        AppStatus.enable_automatic_graceful_drain = on
    return was
