"""The FastAPI application: routes, OpenAI-shaped errors, engine lifespan.

>>> app = create_app(Model.from_pretrained("shakespeare-15m"))
>>> uvicorn.run(app, port=8000)            # or: fastllm serve
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastllm.server.async_engine import AsyncEngine
from fastllm.server.protocol import (
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAIError, now,
)
from fastllm.server.serving import OpenAIServing

log = logging.getLogger("fastllm.server")


def default_served_name(model: Any) -> str:
    """The model directory's name ("shakespeare-15m"), else "fastllm"."""
    return Path(model.path).name if getattr(model, "path", None) else "fastllm"


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per problem: 'temperature: Input should be a valid number'."""
    lines, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            lines.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        lines.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(dict.fromkeys(lines)) or "invalid request", param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(OpenAIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(OpenAIError(exc.status_code, str(exc.detail), param=None, code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


def create_app(model: Any, served_model_name: str | None = None, max_num_seqs: int = 64,
               max_num_batched_tokens: int = 4096, **engine_kwargs: Any) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` under ``served_model_name``
    (default: its directory's name). The LLMEngine is built here (bad engine
    arguments raise now); its thread runs while the app's lifespan does."""
    name = served_model_name or default_served_name(model)
    engine = AsyncEngine(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                         **engine_kwargs)
    serving = OpenAIServing(model, engine, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="fastllm", summary="OpenAI-compatible API over fastllm's LLMEngine", lifespan=lifespan)
    app.state.engine = engine
    app.state.serving = serving
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine thread runs, 503 otherwise."""
        ok = engine.is_alive
        return JSONResponse({"status": "ok" if ok else "engine not running",
                             "num_unfinished_requests": engine.num_unfinished}, status_code=200 if ok else 503)

    def card() -> ModelCard:
        return ModelCard(id=name, created=now(), max_model_len=model.config.max_position_embeddings)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        if model_id != name:
            raise OpenAIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return JSONResponse(card().model_dump())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(req, raw)

    return app


def serve(model: Any, served_model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", **engine_kwargs: Any) -> int:
    """Run the server until interrupted (Ctrl-C / SIGTERM); returns 0."""
    import uvicorn

    app = create_app(model, served_model_name, **engine_kwargs)
    log.info("serving %s as %r", getattr(model, "path", None), app.state.serving.name)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
    return 0
