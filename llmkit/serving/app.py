"""OpenAI-compatible HTTP serving on llmkit's own generation backends: the routes behind `llmkit serve`.

    >>> import uvicorn
    >>> from llmkit.serving.app import create_app
    >>> from llmkit.serving.engine import Engine
    >>> engine = Engine.open("smollm2-135m")   # loads the model; one worker thread owns it from now on
    >>> uvicorn.run(create_app(engine), host="127.0.0.1", port=8000)

What this layer does with a request: a body larger than any prompt the context could hold is refused (413) before
it is read; the event loop parses the rest (pydantic; a bad body is a 400), checks the key
(401) and the model name (404), takes a slot from the engine (429 when --max-concurrency are taken), and hands
it to the engine (`llmkit.serving.engine`: prompt checks, the worker thread, batching); the answer goes back as
one JSON body or as server-sent chunks (`llmkit.serving.protocol`). A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.inference.sampling import Generation
from llmkit.serving.engine import Engine
from llmkit.serving.protocol import APIError, ChatRequest, CompletionRequest, Output, validation_message


class _ApiKey:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which breaks streaming disconnects): /v1/* needs the key."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key provided"
                await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """Pure ASGI middleware: a body over `limit` bytes is answered 413 before it is read (by its Content-Length),
    or as soon as its chunks pass the limit. A 60 MB body was otherwise parsed, validated and tokenized while
    everyone else waited; no prompt that fits a model's context comes near the limit (`default_body_limit`)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await APIError(400, "Content-Length is not a number").response()(scope, receive, send)
            elif int(length) > self.limit:
                await self._refuse(scope, receive, send, f"{int(length):,} bytes")
            else:
                await self.app(scope, receive, send)
            return
        # chunked: read it here, up to the limit, then hand the app the whole body (it would read it all anyway)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send, f"over {self.limit:,} bytes")
                return
            if not message.get("more_body"):
                break
        body, given = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal given
            if given:
                return await receive()  # after the body: disconnects
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: str) -> None:
        mb = self.limit / 2**20
        response = APIError(413, f"the request body is {size}: more than this server takes ({mb:.3g} MB, "
                                 f"--max-body-mb); no prompt that fits the model's context is that long",
                            code="request_too_large").response()
        response.headers["Connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def default_body_limit(window: int | None) -> int:
    """Bytes a request body may have: 256 per token of the context (JSON escapes take up to 12 bytes a character,
    a token is a few characters) plus 1 MiB for the rest of the body; 16 MiB when the context is not known."""
    return 2**20 + 256 * window if window else 16 * 2**20


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int | None = None) -> Any:
    """The FastAPI app, behind the body-size limit (`max_body_bytes`, default: `default_body_limit` of the model's
    context) and, when `api_key` is set, the API-key check."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and drained the in-flight requests; now let the worker go
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "llmkit"}

    def check_model(name: str | None) -> None:
        if name is not None and name not in engine.names and name not in engine.adapters:
            served = ", ".join(f"'{n}'" for n in [engine.model_name, *engine.adapters])
            raise APIError(404, f"the model '{name}' does not exist here; this server serves {served}",
                           param="model", code="model_not_found")

    @app.get("/")
    async def chat_page() -> Any:
        """The chat page: one offline HTML file (no CDN) that talks to /v1/*. Outside /v1, so it is served without
        the key, which the user types into it; the CSP keeps it from loading or sending anything elsewhere."""
        from pathlib import Path

        from fastapi.responses import HTMLResponse

        page = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-cache", "Content-Security-Policy": (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, "backend": engine.backend.name,
                "in_flight": engine.in_flight, "max_concurrency": engine.max_concurrency}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in [engine.model_name, *engine.adapters]]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card(name if name in engine.adapters else engine.model_name)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        return await _complete(engine, req, request, chat=True, check_model=check_model)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await _complete(engine, req, request, chat=False, check_model=check_model)

    limited = _BodyLimit(app, max_body_bytes or default_body_limit(engine.window))
    return _ApiKey(limited, api_key) if api_key else limited


async def _complete(engine: Engine, req: ChatRequest | CompletionRequest, request: Request, *, chat: bool, check_model: Any) -> Any:
    check_model(req.model)
    engine.acquire()
    try:
        job = await engine.submit(req, chat)
    except BaseException:
        engine.release()  # refused before it reached the worker (400), or the client left during prep
        raise
    out = Output(job.adapter or engine.model_name, chat, req, job)
    if req.stream:
        return StreamingResponse(out.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    gens: dict[int, Generation] = {}
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), 0.5)
        except TimeoutError:
            if await request.is_disconnected():  # nobody to answer: stop generating (llama.cpp) or skip if queued
                job.cancelled.set()
                return JSONResponse({}, status_code=499)
            continue
        if event[0] == "gen":
            gens[event[1]] = event[2]
        elif event[0] == "error":
            raise event[1]
        elif event[0] == "end":
            return out.final([gens[i] for i in range(len(gens))])
