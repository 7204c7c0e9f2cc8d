"""`speedtune serve TARGET`: an OpenAI-compatible API (/v1/chat/completions streaming and not, /v1/completions,
/v1/models) served by llama-cpp-python's server.

A `.gguf` is served as it is. A model, run folder or merged folder is converted on the fly into a GGUF (f16, cached
under $SPEEDTUNE_HOME/serve/, through `speedtune export`'s own path for run folders), so that what is served is what
Ollama and LM Studio would run, with the chat template and EOS the GGUF carries."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from speedtune import paths
from speedtune.errors import UserError


def gguf_for(target: str, console) -> Path:
    """The GGUF to serve for TARGET, converting (once, cached) when it is not one."""
    from speedtune import gguf_tools as gt
    from speedtune.inference import is_run_folder
    from speedtune.models import resolve_model

    if target.endswith(".gguf"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"GGUF file not found: {target}")
        return path
    p = Path(target).expanduser()
    run = is_run_folder(p)
    src = p.resolve() if run else resolve_model(target).resolve()
    stamp = max((f.stat().st_mtime_ns for f in src.iterdir() if f.is_file()), default=0)
    key = hashlib.sha1(f"{src}:{stamp}".encode()).hexdigest()[:12]
    cache = paths.home() / "serve" / f"{src.name}-{key}"
    name = f"{src.name}-f16.gguf"
    if (cache / name).is_file():
        return cache / name
    console.print(f"converting {src} to GGUF f16 for llama.cpp (once; cached in {cache})")
    if run:
        from speedtune.export import export_run

        report = export_run(src, cache, gguf=["f16"], name=src.name, console=console)
        return Path(report["gguf"][0]["file"])
    gt.check_architecture(src)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{name}.partial"
    gt.convert(src, tmp, "f16")
    tmp.rename(cache / name)
    return cache / name


class ValidateRequests:
    """ASGI middleware: a malformed request body gets an OpenAI-style 400 JSON error (llama-cpp-python's server
    answers 500 with a traceback in its log); everything else passes through untouched."""

    def __init__(self, app):
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

        self.app = app
        self.models = {"/v1/chat/completions": CreateChatCompletionRequest, "/v1/completions": CreateCompletionRequest}

    async def __call__(self, scope, receive, send):
        model = self.models.get(scope.get("path")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if model is None:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = _invalid(model, body)
        if error:
            import json

            payload = json.dumps({"error": {"message": error, "type": "invalid_request_error", "param": None,
                                            "code": None}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _invalid(model, body: bytes) -> str | None:
    import json

    from pydantic import ValidationError

    try:
        data = json.loads(body or b"null")
    except ValueError:
        return "the request body is not valid JSON"
    if not isinstance(data, dict):
        return "the request body must be a JSON object"
    try:
        model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
    return None


def make_app(gguf: Path, alias: str, n_ctx: int = 4096, n_threads: int | None = None):
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise UserError("serving needs llama-cpp-python's server: pip install 'speedtune[gguf]'") from None
    model = ModelSettings(model=str(gguf), model_alias=alias, n_ctx=n_ctx, verbose=False,
                          **({"n_threads": n_threads} if n_threads else {}))
    app = create_app(server_settings=ServerSettings(), model_settings=[model])
    app.add_middleware(ValidateRequests)
    return app


@click.command("serve")
@click.argument("target")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--name", help="The model name clients ask for (default: the file's name).")
@click.option("--n-ctx", type=click.IntRange(128), default=4096, show_default=True, help="Context length.")
def command(target, host, port, name, n_ctx):
    """Serve TARGET (a .gguf, run folder, merged folder or model) behind an OpenAI-compatible API."""
    import uvicorn
    from rich.console import Console

    console = Console(stderr=True)
    gguf = gguf_for(target, console)
    alias = name or gguf.stem
    app = make_app(gguf, alias, n_ctx)
    console.print(f"serving [bold]{alias}[/] ({gguf}) at [bold]http://{host}:{port}/v1[/] — "
                  f"try: speedtune chat --url http://{host}:{port}/v1   (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
    console.print("server stopped")
