"""The FastAPI application: routes, OpenAI-shaped errors, engine lifespan.

>>> app = create_app(Model.from_pretrained("shakespeare-15m"))
>>> uvicorn.run(app, port=8000)            # or: fastllm serve
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastllm.server.async_engine import AsyncEngine
from fastllm.server.metrics import CONTENT_TYPE, create_metrics
from fastllm.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList, OpenAIError, TokenizeRequest,
    bad_request, now,
)
from fastllm.server.serving import OpenAIServing
from fastllm.tools import PARSERS

log = logging.getLogger("fastllm.server")


def default_served_name(model: Any) -> str:
    """The model directory's name ("shakespeare-15m"), else "fastllm"."""
    return Path(model.path).name if getattr(model, "path", None) else "fastllm"


def _error_response(e: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


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
        error = OpenAIError(exc.status_code, str(exc.detail), param=None, code=code)
        return _error_response(error, getattr(exc, "headers", None))  # e.g. a 405's Allow

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


PUBLIC_PATHS = ("/health", "/metrics", "/version")  # answered without the API key


class _RequireApiKey:
    """ASGI middleware: every HTTP route but PUBLIC_PATHS needs
    ``Authorization: Bearer <api_key>`` (the scheme in any case, as RFC 9110
    has it; the key compared in constant time); others get OpenAI's 401. Pure
    ASGI, so streaming and disconnect detection pass through untouched."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), self.expected)):
                error = OpenAIError(401, "Incorrect API key provided; send it as 'Authorization: Bearer <key>'.",
                                    code="invalid_api_key")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model: Any, served_model_name: str | None = None, max_num_seqs: int = 64,
               max_num_batched_tokens: int = 4096, api_key: str | None = None, tool_call_parser: str = "auto",
               **engine_kwargs: Any) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` under ``served_model_name``
    (default: its directory's name). The LLMEngine is built here (bad engine
    arguments raise now); its thread runs while the app's lifespan does. With
    ``api_key``, requests must carry it as a bearer token (but /health,
    /metrics and /version). tool_call_parser: how tool_choice "auto" finds
    calls ("auto": from the chat template; see fastllm.tools)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string (or None for no key)")
    name = served_model_name or default_served_name(model)
    if tool_call_parser not in ("auto", *PARSERS):
        raise ValueError(f"tool_call_parser must be 'auto' or one of {sorted(PARSERS)}, got {tool_call_parser!r}")
    metrics = create_metrics(name)
    engine = AsyncEngine(model, metrics=metrics, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens, **engine_kwargs)
    serving = OpenAIServing(model, engine, name, tool_call_parser)

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
    app.state.metrics = metrics
    _add_error_handlers(app)
    if api_key is not None:
        app.add_middleware(_RequireApiKey, api_key=api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine thread runs, 503 otherwise."""
        ok = engine.is_alive
        return JSONResponse({"status": "ok" if ok else "engine not running",
                             "num_unfinished_requests": engine.num_unfinished}, status_code=200 if ok else 503)

    started = now()

    def card() -> ModelCard:
        return ModelCard(id=name, created=started, max_model_len=model.config.max_position_embeddings)

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

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        """vLLM's: a prompt's (or conversation's) token ids, their count and the context length."""
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            ids = serving.chat_prompt(req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                                      bool(req.add_special_tokens))
        else:
            tok = _tokenizer(model)
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": model.config.max_position_embeddings,
                                "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [model.tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(body)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        """vLLM's: the text of token ids (special tokens kept)."""
        serving.check_model(req.model)
        vocab = model.config.vocab_size
        bad = [i for i in req.tokens if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"token ids must be in [0, {vocab}), got {bad[:5]}", "tokens")
        return JSONResponse({"prompt": _tokenizer(model).decode(req.tokens, skip_special_tokens=False)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text format (see fastllm.server.metrics)."""
        if metrics is None:
            raise OpenAIError(404, "metrics need prometheus_client: pip install 'fastllm[server]'",
                              code="not_found")
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> JSONResponse:
        from fastllm import __version__

        return JSONResponse({"version": __version__})

    return app


def _tokenizer(model: Any) -> Any:
    if model.tokenizer is None:
        raise bad_request("this model has no tokenizer", "prompt")
    return model.tokenizer


def serve(model: Any, served_model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", api_key: str | None = None, **app_kwargs: Any) -> int:
    """Run the server until interrupted (Ctrl-C / SIGTERM); returns 0.
    app_kwargs: create_app's (engine arguments, tool_call_parser)."""
    import uvicorn

    _log_like_uvicorn(log_level)
    app = create_app(model, served_model_name, api_key=api_key, **app_kwargs)
    log.info("serving %s as %r", getattr(model, "path", None), app.state.serving.name)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _log_like_uvicorn(level: str) -> None:
    """The fastllm loggers (ignored fields, engine failures...) at uvicorn's
    level, on stderr, unless the application configured them already."""
    root = logging.getLogger("fastllm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level.upper())
    return 0
