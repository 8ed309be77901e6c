"""The FastAPI app: the serving object, the routes, the API key, and the one mapping from
errors to HTTP responses (every error body carries both shapes: FastAPI's `detail` and
OpenAI's `error`)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import OmniError
from ..runtime.pipeline import PipelineRuntime
from .metrics import RequestCounter
from .routes import router, v1
from .serving import ImageServing, ServerOptions

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

__all__ = ["ServerOptions", "create_app", "error_body"]


def error_body(status: int, detail: Any, message: str | None = None, param: str | None = None) -> dict[str, Any]:
    """Both shapes at once: FastAPI clients read `detail`, OpenAI clients read `error`."""
    message = message if message is not None else (detail if isinstance(detail, str) else str(detail))
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"detail": detail, "error": {"message": message, "type": kind, "param": param, "code": status}}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        names = [x for x in loc if not x.isdigit()]  # list indices and JSON offsets are no param
        param = param or (names[-1] if names else None)
        parts.append(f"{field}: {e.get('msg')}" if field else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors can carry exceptions and bytes in ctx/input; keep what JSON can hold."""
    out = []
    for e in errors:
        item = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
        if "input" in e and isinstance(e["input"], (str, int, float, bool, type(None))):
            item["input"] = e["input"]
        out.append(item)
    return out


def create_app(options: ServerOptions, load: Callable[[], PipelineRuntime]) -> FastAPI:
    serving = ImageServing(options, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.load_in_background()
        yield
        serving.stop()

    app = FastAPI(title="omni-trt", version="0.1.0", lifespan=lifespan)
    app.state.omni = serving

    async def require_key(request: Request) -> None:
        key = options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != key:
            raise OmniError("missing or invalid API key: send 'Authorization: Bearer <key>'", status=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(OmniError)
    async def _omni_error(_: Request, e: OmniError) -> Response:
        if e.status == 499:
            return Response(status_code=499)  # the client left; nobody reads it
        return JSONResponse(error_body(e.status, e.message, param=e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = _jsonable_errors(e.errors())
        message, param = _validation_message(errors)
        return JSONResponse(error_body(422, errors, message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, e.detail), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _fault(_: Request, e: Exception) -> JSONResponse:
        log.exception("server fault")
        return JSONResponse(error_body(500, f"internal server error: {type(e).__name__}: {e}"), status_code=500)

    app.include_router(router)
    app.include_router(v1, dependencies=[Depends(require_key)])
    app.add_middleware(RequestCounter, metrics=serving.metrics)
    return app
