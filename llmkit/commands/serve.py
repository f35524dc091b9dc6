"""`llmkit serve`: an OpenAI-compatible HTTP server (chat, completions, streaming) for any model llmkit loads."""

from __future__ import annotations

import errno
import signal
import socket
import sys

import typer

from llmkit.errors import UsageError

DEFAULT_MODEL = "smollm2-135m"  # llmkit.models.refs.DEFAULT_CAUSAL_LM, repeated so --help imports nothing heavy


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in milliseconds, with one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host} cannot be resolved ({e.strerror}): use an address such as 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may rebind while old connections linger
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use: stop what holds it or pick another --port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, model folder, LoRA adapter, .gguf file or Hub id (see `llmkit models`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 = every interface; mind --api-key)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on (0 = any free port; the line printed at start names it)."),
    api_key: str = typer.Option(None, "--api-key", envvar="LLMKIT_API_KEY", show_default=False,
                                help="Require 'Authorization: Bearer KEY' on /v1/* [env: LLMKIT_API_KEY]."),
    max_concurrency: int = typer.Option(64, "--max-concurrency", help="Requests waiting or running at once; beyond that: HTTP 429."),
    max_body_mb: float = typer.Option(None, "--max-body-mb", help="Largest request body, in MB; larger ones get HTTP 413 unread "
                                      "[default: 1 + 256 bytes per token of the model's context, e.g. 2 MB at 4096].", show_default=False),
    adapter: list[str] = typer.Option(None, "--adapter", help="NAME=RUN_FOLDER: a LoRA run folder trained on --model, served beside it "
                                      "as model NAME (repeat for more; each loaded once).", show_default=False),
    backend: str = typer.Option("auto", "--backend", help="auto | transformers | llama.cpp (auto: llama.cpp for .gguf)."),
    batch_size: int = typer.Option(8, "--batch-size", help="transformers backend: most sequences generated together."),
    parallel: int = typer.Option(None, "--parallel", help="llama.cpp backend: requests decoded together (continuous batching); "
                                 "1 = one at a time, texts exactly as `llmkit generate` [default: $LLMKIT_SERVE_PARALLEL or 1].", show_default=False),
    device: str = typer.Option(None, "--device", help="transformers backend: cpu, cuda, cuda:1, mps [default: best available].", show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="transformers backend: auto | float32 | bfloat16 | float16."),
    threads: int = typer.Option(None, "--threads", help="CPU threads [default: the cores other processes leave idle, re-checked as it runs].",
                                show_default=False),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.pt): they can run code. Only for sources you trust."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a model's own Python code (auto_map). Only for sources you trust."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No request log on stderr, only the start line and errors."),
) -> None:
    """Serve a model over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Examples:

        llmkit serve --model smollm2-135m --port 8000 &

        curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
            -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

        llmkit serve --model runs/shakespeare --api-key "$(openssl rand -hex 16)" --max-concurrency 16

        llmkit serve --model smollm2-135m --parallel 16 --threads 1   # many clients: 1.6x llama_cpp.server's tokens/s

        llmkit serve --model runs/smollm2-q8_0.gguf --host 0.0.0.0 --port 8080 --api-key sk-local --quiet

        llmkit serve --model smollm2-135m --adapter sql=runs/lora-sql --adapter poet=runs/lora-poet --parallel 8
    """
    import logging

    import uvicorn

    from llmkit.serving.adapters import parse_adapters
    from llmkit.serving.app import create_app
    from llmkit.serving.engine import Engine

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (got {port})")
    if max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be at least 1 (got {max_concurrency})")
    if max_body_mb is not None and not max_body_mb > 0:
        raise UsageError(f"--max-body-mb must be more than 0 (got {max_body_mb})")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads}); leave it out to use the cores other processes leave idle")
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel must be at least 1 (got {parallel})")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty: pass a key, or leave the flag out to serve without one")
    adapters = parse_adapters(adapter or [])
    sock = _bind(host, port)
    try:
        engine = Engine.open(model, backend=backend, device=device, dtype=dtype, batch_size=batch_size, threads=threads,
                             max_concurrency=max_concurrency, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             parallel=parallel, adapters=adapters)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening now: the line scripts wait for
                print(f"serving {engine.model_name} on http://{url_host}:{bound_port} ({engine.backend.name})", file=sys.stderr, flush=True)

    # uvicorn's own start-up lines would repeat ours; its request log is the only INFO kept (unless --quiet)
    max_body = int(max_body_mb * 2**20) if max_body_mb is not None else None
    config = uvicorn.Config(create_app(engine, api_key=api_key, max_body_bytes=max_body), log_level="warning", access_log=not quiet,
                            timeout_graceful_shutdown=30, lifespan="on")
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING if quiet else logging.INFO)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal; ignoring it from here on
    # makes that a clean exit 0 instead of llmkit's "interrupted" exit codes, which mean work was cut short.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        engine.close(0)
