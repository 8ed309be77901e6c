"""The FastAPI app: the serving object, the routes, the guard (API key, body limits, drain), and
the one mapping from errors to HTTP responses (every error body carries both shapes: FastAPI's
`detail` and OpenAI's `error`; a server fault shows only "internal error" and an id)."""

from __future__ import annotations

import logging
import math
import threading
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import OmniError
from .admission import internal_error
from .contract import Caller, Serving, http_caller
from .guard import Guard
from .metrics import RequestCounter
from .playground import static_files
from .protocol import (
    EVENT_MODELS,
    ChatCompletionChunk,
    CompletedImageEvent,
    ImageEditForm,
    ImageGenerationBody,
    PartialImageEvent,
    error_body,
)
from .routes import router, v1

log = logging.getLogger(__name__)

__all__ = ["create_app", "error_body"]


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        names = [x for x in loc if not x.isdigit()]  # list indices and JSON offsets are no param
        param = param or (names[-1] if names else None)
        msg = str(e.get("msg")).removeprefix("Value error, ")  # pydantic's prefix on our own validators' words
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts) or "invalid request", param


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors can carry exceptions, bytes, NaN and megabytes in ctx/input: keep what
    strict JSON can hold, and not too much of it."""
    out = []
    for e in errors:
        item = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
        value = e.get("input")
        if isinstance(value, str):
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate cannot be sent as JSON
            item["input"] = value if len(value) <= 100 else value[:100] + "..."
        elif isinstance(value, (bool, int, type(None))) or (isinstance(value, float) and math.isfinite(value)):
            item["input"] = value
        out.append(item)
    return out


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the SSE events' models (FastAPI documents JSON bodies only)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        refs = {}
        for model in EVENT_MODELS:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, nested in js.pop("$defs", {}).items():
                components.setdefault(name, nested)
            components[model.__name__] = js
            refs[model] = {"$ref": f"#/components/schemas/{model.__name__}"}
        for route, path in schema["paths"].items():
            for op in path.values():
                stream = op.get("responses", {}).get("200", {}).get("content", {}).get("text/event-stream")
                if stream is not None:
                    events = [ChatCompletionChunk] if route.endswith("/chat/completions") else [PartialImageEvent, CompletedImageEvent]
                    stream["schema"] = {"oneOf": [refs[m] for m in events], "description": stream["schema"].get("description", "")}
        _file_parts(components)
        for body in (ImageGenerationBody, ImageEditForm):  # FastAPI writes number bounds as floats: 2**63 - 1 would round up
            own = body.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
            components[body.__name__]["properties"].update({k: {**own[k], "description": v.get("description")}
                                                             for k, v in components[body.__name__]["properties"].items()})
        app.openapi_schema = schema
    return app.openapi_schema


def _file_parts(components: dict[str, Any]) -> None:
    """Multipart file parts as OpenAPI's binary strings, and an edit's form needing an image."""

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("contentMediaType") == "application/octet-stream":
                node["format"] = "binary"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(components)
    for name, body in components.items():
        if name.startswith("Body_edits"):
            body["anyOf"] = [{"required": ["image"]}, {"required": ["image[]"]}]


def create_app(serving: Serving, caller: Callable[[Request], Caller] = http_caller) -> FastAPI:
    """The app over a serving object: the local ImageServing, or the Ray client whose runtimes
    live in the model replicas. Its lifespan loads the serving object in a thread once the server
    listens (503 "not initialized" meanwhile) and stops it at the end. caller: what the serving
    side learns of each request (under Ray's proxy, Ray's request id and its cancellation)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A daemon thread, not the loop's executor: a load still under way at shutdown must not hold the exit.
        threading.Thread(target=serving.load, name="omni-load", daemon=True).start()
        yield
        serving.stop()

    app = FastAPI(title="omni-trt", version="0.1.0", lifespan=lifespan)
    app.state.omni = serving
    app.state.caller = caller

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
        if e.status_code == 400 and isinstance(e.__cause__, (UnicodeDecodeError, RecursionError)):
            # FastAPI's 400 for a JSON body it could not parse (invalid UTF-8, nesting too deep):
            # a malformed body, 422 like any other.
            message = "the body is not valid JSON: " + ("invalid UTF-8" if isinstance(e.__cause__, UnicodeDecodeError) else "nested too deep")
            return JSONResponse(error_body(422, message, param="body"), status_code=422)
        return JSONResponse(error_body(e.status_code, e.detail), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _fault(_: Request, e: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex
        log.error("server fault %s", error_id, exc_info=e)
        err = internal_error(error_id)
        return JSONResponse(error_body(err.status, err.message), status_code=err.status)

    app.include_router(router)
    app.include_router(v1)
    app.mount("/static", static_files(), name="static")
    app.openapi = lambda: _openapi(app)
    # Outermost last: the counter sees the guard's answers too.
    options = serving.options
    app.add_middleware(Guard, api_key=options.api_key, max_body=options.max_body_bytes, body_timeout=options.body_timeout_s,
                       draining=lambda: serving.draining, body_total_timeout=options.body_total_timeout_s)
    app.add_middleware(RequestCounter, metrics=serving.metrics)
    return app
