"""`speedtune serve TARGET`: an OpenAI-compatible API (/v1/chat/completions streaming and not, /v1/completions,
/v1/models) served by llama-cpp-python's server.

A `.gguf` is served as it is. A model, run folder or merged folder is converted on the fly into a GGUF (f16, cached
under $SPEEDTUNE_HOME/serve/, through `speedtune export`'s own path for run folders), so that what is served is what
Ollama and LM Studio would run, with the chat template and EOS the GGUF carries. A request with `tools` gets the
model's calls back as OpenAI `tool_calls` (speedtune.inference.tool_calls)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import click

from speedtune import paths
from speedtune.checks import Number, check_range
from speedtune.errors import UserError, install_hint
from speedtune.commands.options import Finite
from speedtune.exporting import gguf_tools as gt, gguf_tools
from speedtune.inference.llamacpp import check_gguf, safe_loading
from speedtune.inference.loader import is_run_folder
from speedtune.inference.serve_limits import BoundedServer, ValidateRequests, bound_llama
from speedtune.inference.tool_calls import with_tool_calls
from speedtune.models.registry import resolve_model


def gguf_for(target: str, console) -> Path:
    """The GGUF to serve for TARGET, converting (once, cached) when it is not one."""
    if target.endswith(".gguf"):
        from speedtune.inference.llamacpp import check_gguf

        return check_gguf(Path(target))
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
        from speedtune.exporting.export import export_run

        report = export_run(src, cache, gguf=["f16"], name=src.name, console=console)
        return Path(report["gguf"][0]["file"])
    gt.check_architecture(src)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{name}.partial"
    gt.convert(src, tmp, "f16")
    tmp.rename(cache / name)
    return cache / name


def make_app(gguf: Path, alias: str, n_ctx: int = 4096, request_timeout: float = 120.0):
    """llama-cpp-python's OpenAI app for one GGUF, loaded through speedtune.inference.llamacpp and bounded by
    speedtune.inference.serve_limits (400s for bad requests, a deadline per request, a stop flag checked per token)."""
    try:
        from llama_cpp.server import app as server_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise UserError(f"serving needs llama-cpp-python's server: {install_hint('gguf')}") from None

    check_gguf(gguf)
    model = ModelSettings(model=str(gguf), model_alias=alias, n_ctx=n_ctx, verbose=False)
    # interrupt_requests=False: a streaming answer is not cut short because another request is waiting
    try:
        with safe_loading():  # llama-cpp-python's server builds its own Llama: it gets speedtune's model parameters
            app = server_app.create_app(server_settings=ServerSettings(interrupt_requests=False),
                                        model_settings=[model])
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{gguf}: llama.cpp could not load it with --n-ctx {n_ctx} ({e}); a truncated or damaged "
                        "file, or too little memory for the context") from None
    llama = server_app._llama_proxy._current_model  # the one model this app serves
    bound_llama(llama, request_timeout)
    with_tool_calls(llama)  # a request with tools gets the model's <tool_call> blocks back as tool_calls
    app.add_middleware(ValidateRequests, timeout=request_timeout)
    return app


def listen(host: str, port: int):
    """The listening socket, opened before the model loads: a port in use is a one-line error, not a log line."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"--host {host}: can't be used ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        import errno

        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use (another server?); pick another "
                            "--port") from None
        raise UserError(f"--host {host} --port {port}: can't listen there ({e.strerror or e})") from None
    sock.listen(2048)  # clients that connect while the model loads wait in the backlog
    return sock


@click.command("serve")
@click.argument("target")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=Number(int, 1, 65535), default=8000, show_default=True)
@click.option("--name", help="The model name clients ask for (default: the file's name).")
@click.option("--n-ctx", type=Number(int, 128), default=4096, show_default=True,
              help="Context length (prompt + answer), at most what the model was trained for.")
@click.option("--request-timeout", type=Finite(1, 86400), default=120, show_default=True,
              help="Seconds a request may take, waiting included; a longer answer stops with finish_reason length.")
def command(target, host, port, name, n_ctx, request_timeout):
    """Serve TARGET (a .gguf, run folder, merged folder or model) behind an OpenAI-compatible API."""
    from rich.console import Console

    console = Console(stderr=True)
    sock = listen(host, port)
    gguf = gguf_for(target, console)
    trained = gguf_tools.context_length(gguf)
    if trained:
        check_range("--n-ctx", n_ctx, 128, trained, f" (the model was trained for {trained} tokens)")
    alias = name or gguf.stem
    app = make_app(gguf, alias, n_ctx, request_timeout)
    console.print(f"serving [bold]{alias}[/] ({gguf}) at [bold]http://{host}:{port}/v1[/] — "
                  f"try: speedtune chat --url http://{host}:{port}/v1   (Ctrl-C stops)")
    BoundedServer(app, sock).run()
    console.print("server stopped")
