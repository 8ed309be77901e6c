"""The HTTP routes: thin translations between HTTP and the serving object (server/serving.py).
Each declares its response model and its error responses, so /openapi.json documents both."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from ..errors import RequestError
from . import playground
from .adapters import router as adapter_routes
from .inputs import undecodable_field
from .protocol import (
    ChatBody,
    ChatCompletionResponse,
    ErrorResponse,
    HealthResponse,
    ImageEditForm,
    ImageGenerationBody,
    ImagesResponse,
    ModelList,
)
from .contract import Answer, Caller, Serving


def serving(request: Request) -> Serving:
    return request.app.state.omni


def caller(request: Request) -> Caller:
    """Who asks, as the serving side knows them (create_app says how: uvicorn's disconnect, or Ray's proxy)."""
    return request.app.state.caller(request)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "A request the model cannot run (size, model name, prompt, an input image it cannot read)",
        401: "Missing or wrong API key",
        408: "The request body stalled (--body-timeout)",
        413: "A body over the server's size limit",
        422: "A malformed body or a field of the wrong type or out of range",
        429: "The queue is full; retry after Retry-After seconds",
        500: "A server fault (details in the server log)",
        501: "The engines cannot do this (an engine dir built without the VAE encoder: no edits)",
        503: "The model is not loaded yet, or the server is shutting down",
        504: "The request took longer than --request-timeout; its work was stopped",
    }
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


GENERATE_ERRORS = _errors(400, 401, 408, 413, 422, 429, 500, 503, 504)


def with_headers(response: Response, answer: Answer) -> Any:
    """A serving call's response model, its headers set on the route's response."""
    out, headers = answer
    response.headers.update(headers)
    return out


def sse_response(events: Any, headers: dict[str, str]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies (nginx honours X-Accel-Buffering)."""
    return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

class TextFormRoute(APIRoute):
    """A route whose multipart text fields must be UTF-8, as JSON bodies must: Starlette would read
    other bytes as Latin-1 and run the request on a prompt nobody sent."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/"):
                field = undecodable_field(await request.body(), content_type)  # cached: the form is parsed from it
                if field:
                    raise RequestError(f"{field} is not valid UTF-8 text; send form fields as UTF-8", field, status=422)
            return await handler(request)

        return checked


router = APIRouter(route_class=TextFormRoute)
v1 = APIRouter(prefix="/v1", route_class=TextFormRoute)


# The page is not part of the API: kept out of /openapi.json (and so out of schema clients and fuzzing).
@router.get("/", include_in_schema=False)
async def index() -> Response:
    return playground.page()


@router.get("/health", response_model=HealthResponse, responses=_errors(503))
async def health(s: Serving = Depends(serving)) -> Any:
    return await s.health()


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(s: Serving = Depends(serving)) -> Response:
    return Response(await s.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


@v1.get("/models", response_model=ModelList, response_model_exclude_unset=True, responses=_errors(401))
async def models(s: Serving = Depends(serving)) -> Any:
    return await s.models()


STREAM = {"text/event-stream": {"schema": {"type": "string", "description": (
    "With stream: true. Events image_generation.partial_image (PartialImageEvent) as previews form, then "
    "image_generation.completed (CompletedImageEvent) per image; `error` (ErrorResponse) if it fails after it began; "
    "SSE comments while queued.")}}}


@v1.post("/images/generations", response_model=ImagesResponse, responses={**GENERATE_ERRORS, 200: {"content": STREAM}})
async def images(body: ImageGenerationBody, response: Response, s: Serving = Depends(serving), who: Caller = Depends(caller)) -> Any:
    if body.stream:
        return sse_response(*await s.stream_images(who, body))
    return with_headers(response, await s.create_images(who, body))


EDIT_STREAM = {"text/event-stream": {"schema": {"type": "string", "description": (
    "With stream: true. image_edit.partial_image and image_edit.completed events, as for generations.")}}}
EDIT_ERRORS = {**GENERATE_ERRORS, **_errors(501)}


@v1.post("/images/edits", response_model=ImagesResponse, responses={**EDIT_ERRORS, 200: {"content": EDIT_STREAM}})
async def edits(
    response: Response,
    form: Annotated[ImageEditForm, Form()],
    image: Annotated[list[UploadFile] | None, File(description="The image to edit (PNG, JPEG, WebP; other modes are converted).")] = None,
    images: Annotated[list[UploadFile] | None, File(alias="image[]", description=(
        "Up to 16 images: each is edited on its own, n images each, in order (no served model composes several)."))] = None,
    mask: Annotated[UploadFile | None, File(description=(
        "A PNG the size of the (first) image whose fully transparent pixels mark where to edit: inpainting. "
        "Without it: image-to-image."))] = None,
    s: Serving = Depends(serving),
    who: Caller = Depends(caller),
) -> Any:
    files = [("image", await f.read()) for f in image or []] + [("image[]", await f.read()) for f in images or []]
    mask_bytes = await mask.read() if mask is not None else None
    if form.stream:
        return sse_response(*await s.stream_edit(who, form, files, mask_bytes))
    return with_headers(response, await s.create_edit(who, form, files, mask_bytes))


CHAT_STREAM = {"text/event-stream": {"schema": {"type": "string", "description": (
    "With stream: true. OpenAI's chat.completion.chunk events (ChatCompletionChunk, data lines only), then data: [DONE]; "
    "`error` (ErrorResponse) if it fails after it began; SSE comments while queued.")}}}


@v1.post("/chat/completions", response_model=ChatCompletionResponse, responses={**GENERATE_ERRORS, 200: {"content": CHAT_STREAM}})
async def chat(body: ChatBody, response: Response, s: Serving = Depends(serving), who: Caller = Depends(caller)) -> Any:
    if body.stream:
        return sse_response(*await s.stream_chat(who, body))
    return with_headers(response, await s.create_chat(who, body))


# LoRA adapters' load/unload routes (404 unless --enable-lora-loading; server/adapters.py).
router.include_router(adapter_routes)
