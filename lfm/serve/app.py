"""The FastAPI application: routes, bearer-key check, body limits, and errors that are always OpenAI-shaped.

Bodies are read and parsed here rather than by FastAPI's automatic validation so that every failure (oversize,
malformed JSON, wrong types, missing fields) becomes `{"error": {...}}` with a 4xx, never a traceback or FastAPI's
own `{"detail": ...}`. The engine thread starts and stops with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import chat_completions
from .completions import completions
from .errors import ApiError, bad_request
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ResponsesRequest, responses
from .state import ServerState
from .tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize, tokenizer_info

log = logging.getLogger("lfm.serve")

_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics",
              "/tokenize", "/detokenize", "/tokenizer_info"}


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="lfm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lfm = state
    app.add_middleware(_CountStatus, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
        return ApiError(e.status_code, msg.get(e.status_code, str(e.detail))).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return bad_request(str(e)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, f"internal server error: {type(e).__name__}").response()

    # ---------------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> Response:
        if not state.engine.alive:
            raise ApiError(503, "the engine thread is not running", code="engine_unavailable")
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _auth(state, request)
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> JSONResponse:
        _auth(state, request)
        state.check_model(name)
        return JSONResponse(_model_card(state))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _auth(state, request)
        body = await _parse(state, request, ChatCompletionRequest)
        return await chat_completions(state, request, body)

    @app.post("/v1/completions")
    async def complete(request: Request):
        _auth(state, request)
        body = await _parse(state, request, CompletionRequest)
        return await completions(state, request, body)

    @app.post("/v1/responses")
    async def respond(request: Request):
        _auth(state, request)
        body = await _parse(state, request, ResponsesRequest)
        return await responses(state, request, body)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        _auth(state, request)
        return JSONResponse(await tokenize(state, await _parse(state, request, TokenizeRequest)))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> JSONResponse:
        _auth(state, request)
        return JSONResponse(await detokenize(state, await _parse(state, request, DetokenizeRequest)))

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request) -> JSONResponse:
        _auth(state, request)
        return JSONResponse(tokenizer_info(state))

    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lfm",
            "max_model_len": state.max_model_len}


def _auth(state: ServerState, request: Request) -> None:
    key = state.cfg.api_key
    if not key:
        return
    got = request.headers.get("authorization", "")
    token = got[7:].strip() if got[:7].lower() == "bearer " else ""
    if not secrets.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key",
                       "invalid_request_error")


async def _parse(state: ServerState, request: Request, model: type[BaseModel]) -> Any:
    limit = state.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", None, "request_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", None, "request_too_large")
        chunks.append(part)
    raw = b"".join(chunks)
    try:  # a body of megabytes parses (and validates, below) off the event loop
        data = json.loads(raw) if len(raw) < 1 << 16 else await asyncio.to_thread(json.loads, raw)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and integers over Python's 4300-digit limit
        raise bad_request(f"the body is not valid JSON: {str(e)[:200]}", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("the body nests too deeply", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data) if len(raw) < 1 << 16 else await asyncio.to_thread(model.model_validate, data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        raise bad_request(f"{loc}: {msg}" if loc else msg, loc or None, "invalid_type"
                          if err.get("type", "").endswith("_type") else "invalid_value") from None


class _CountStatus:
    """ASGI middleware: counts every response by endpoint and status for /metrics (streaming-safe, unlike
    BaseHTTPMiddleware, which would also get in the way of disconnect handling)."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        seen = False

        async def wrapped(message) -> None:
            nonlocal seen
            if message["type"] == "http.response.start" and not seen:
                seen = True
                self.metrics.count(endpoint, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            if not seen:
                self.metrics.count(endpoint, 499)  # the client left before any response
