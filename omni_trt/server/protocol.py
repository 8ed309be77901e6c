"""The HTTP API's request and response models (pydantic), so /openapi.json and /docs describe
every body the server takes and gives, errors included. Each request body turns itself into the
runtime's `ImageAsk` (`ask()`), once; validation beyond types lives in runtime.request.resolve,
shared with `omni generate`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from ..errors import RequestError
from ..runtime.request import MAX_IMAGES, MAX_PARTIAL_IMAGES, MAX_SCALE, MAX_STEPS, SEED_LIMIT, EMPTY_PROMPT, ImageAsk
from .cards import HealthResponse, ModelCard, ModelDefaults, ModelList, RuntimeInfo, SizeRange  # noqa: F401 - /v1/models and /health

# ---- requests ----

DALL_E_QUALITY = {"standard": "medium", "hd": "high"}  # dall-e-3's values, which the OpenAI SDK sends


# Strict: `n: "2"`, `n: true` and `guidance_scale: "3.5"` are type errors, not coerced; NaN and
# infinities (which JSON parsers let through as 1e999 or NaN) are refused.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def strict_size(size: str | None) -> str | None:
    """`size` as given: 'WxH' has no spaces around it (the size parser's own message, on every route)."""
    if size is not None and size != size.strip():
        raise RequestError(f"invalid size {size[:40]!r}: expected 'WxH' with positive integers, e.g. '1024x1024'", "size")
    return size


class ImageParams(BaseModel):
    """The vllm-omni extension fields and gpt-image's, shared by both endpoints."""

    model_config = STRICT

    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(None, description=(
        "gpt-image quality: the family's default steps x 1/3 (low), x 2/3 (medium), x 1 (high, auto); "
        "an explicit num_inference_steps wins. dall-e-3's standard and hd are medium and high."))
    style: Literal["vivid", "natural"] | None = Field(None, description="dall-e-3's; accepted and ignored.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description=(
        "auto and opaque make the usual image; transparent is refused (400): no served model makes alpha."))
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted for gpt-image clients; no moderation is applied.")

    negative_prompt: StrictStr | None = Field(None, description="What the image should not show (families with CFG; ignored elsewhere).")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Denoising steps (default: the model family's).")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="Classifier-free guidance scale (families that take it).")
    true_cfg_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="True-CFG scale (Qwen-Image, FLUX.1; needs a negative prompt).")
    seed: int | None = Field(None, ge=0, le=SEED_LIMIT - 1, description="Random seed; image i of the request uses seed + i. Default: random.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoding of the returned images.")
    output_compression: int | None = Field(None, ge=0, le=100, description="0..100: PNG zlib effort, or 100 - quality for JPEG/WebP.")
    lora: Any = Field(None, description="LoRA adapters: {name, scale (-4..4, default 1), path} or a list of them, or an adapter's name (README: LoRA).")
    cache: Any = Field(None, description=(
        "The step cache for this request (servers started with --cache-backend mag_cache): false runs every step (the exact "
        "uncached image); true or absent: the server's settings; an object overrides them: mag_threshold (0..2), "
        "mag_max_skip_steps (0..10), mag_retention_ratio (0..1). On edits, a form field holding the same JSON."))

    def _params(self) -> dict[str, Any]:
        """These fields as ImageAsk's keywords."""
        return dict(steps=self.num_inference_steps, guidance_scale=self.guidance_scale, true_cfg_scale=self.true_cfg_scale,
                    negative_prompt=self.negative_prompt, seed=self.seed, output_format=self.output_format,
                    output_compression=self.output_compression, quality=DALL_E_QUALITY.get(self.quality, self.quality),
                    background=self.background, lora=self.lora, cache=self.cache)


class ImageRequestBody(ImageParams):
    """The fields generations and edits share; each endpoint's body sets its own strictness."""

    # Non-empty, checked after the type: a constrained str would refuse lone surrogates with
    # pydantic's own words, where every text field has check_text's.
    prompt: str = Field(json_schema_extra={"minLength": 1}, description="Text prompt (for an edit: what to make of the image).")
    model: str | None = Field(None, description="Must be one of the served model names when given.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images (for an edit: per input image).")
    size: str | None = Field(None, description=(
        "'WxH' in pixels, e.g. '1024x1024', or 'auto' (default: the family's; for an edit, the input image's size fitted "
        "to the model's size rules)."))
    response_format: Literal["b64_json"] = Field("b64_json", description="Only b64_json: images come back inline.")
    user: str | None = Field(None, description="An end-user id, logged (escaped).")
    stream: bool = Field(False, description=(
        "Server-sent events: partial images as they form (image_generation.partial_image, or image_edit.partial_image), "
        "then each final image (.completed)."))
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES, description=(
        "With stream: previews per image (0..3), the predicted clean image at evenly spaced steps (at most steps - 1)."))

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError(EMPTY_PROMPT)
        return prompt

    def ask(self) -> ImageAsk:
        """The runtime's form of this body (previews only for a stream)."""
        return ImageAsk(self.prompt, size=strict_size(self.size), n=self.n, partial_images=self.partial_images if self.stream else 0,
                        strength=getattr(self, "strength", None), **self._params())


class ImageGenerationBody(ImageRequestBody):
    """POST /v1/images/generations (OpenAI's fields plus the vllm-omni extensions)."""

    model_config = ConfigDict(STRICT, extra="ignore")


class ImageEditForm(ImageRequestBody):
    """POST /v1/images/edits, multipart (OpenAI's fields plus the vllm-omni extensions and
    `strength`); the files (image, image[], mask) are separate form parts. Form values are text,
    so numbers are parsed from it, but NaN and infinities are still refused."""

    model_config = ConfigDict(extra="ignore", strict=False, allow_inf_nan=False,
                              json_schema_extra=lambda schema: schema.setdefault("required", []).append("prompt"))

    strength: float | None = Field(None, ge=0, le=1, description=(
        "How much of the input is re-imagined: 0 keeps it, 1 ignores it (default: the family's, 0.6 for "
        "image-to-image; runs that share of the steps)."))
    input_fidelity: Literal["high", "low"] | None = Field(None, description="gpt-image-1's; accepted, not applied.")
    # A form's empty field arrives as missing: both get the empty prompt's refusal (still required in the schema).
    prompt: str = Field("", validate_default=True, json_schema_extra={"minLength": 1}, description="What to make of the image.")


class ChatImageParams(ImageParams):
    """Parameters of a chat request, read from `extra_body` and the top level."""

    model_config = ConfigDict(STRICT, extra="ignore")

    strength: float | None = Field(None, ge=0, le=1, description="With an image in the messages: how much of it is redone (see the edits endpoint).")
    height: int | None = Field(None, gt=0, description="Image height in pixels (size wins when both are given).")
    width: int | None = Field(None, gt=0, description="Image width in pixels.")
    size: StrictStr | None = Field(None, description="'WxH' in pixels; wins over height/width.")
    num_outputs_per_prompt: int = Field(1, ge=1, le=MAX_IMAGES, description="Images in each choice's message (vLLM-Omni's).")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="OpenAI's: the number of choices; choice i's images use seeds from seed + i x per choice.")

    def ask(self, prompt: str) -> ImageAsk:
        """The runtime's form of the chat's parameters (n choices of num_outputs_per_prompt images, in
        one request: image j has seed + j); refusals of the prompt name `messages`."""
        return ImageAsk(prompt, size=strict_size(self.size), width=self.width, height=self.height, n=self.n * self.num_outputs_per_prompt,
                        strength=self.strength, prompt_param="messages", **self._params())


class ChatMessage(BaseModel):
    model_config = ConfigDict(STRICT, extra="allow")

    role: str = Field(description="user, system or assistant; the prompt is the user messages' text.")
    content: str | list[dict[str, Any]] | None = Field(None, description="A string, or a list of parts ({'type': 'text', 'text': ...}).")


class StreamOptions(BaseModel):
    model_config = ConfigDict(STRICT, extra="ignore")

    include_usage: bool = False


class ChatBody(BaseModel):
    """POST /v1/chat/completions with image output (vllm-omni's text-to-image chat)."""

    model_config = ConfigDict(STRICT, extra="allow")

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; its user text is the prompt.")
    model: StrictStr | None = Field(None, description="Must be the served model name when given.")
    extra_body: dict[str, Any] | None = Field(None, description="Image parameters (see ChatImageParams); the top level works too.")
    stream: bool = Field(False, description="Server-sent chat.completion.chunk events (data: lines), ending with data: [DONE].")
    stream_options: StreamOptions | None = Field(None, description="With stream: include_usage adds a last chunk with the usage.")

    def params(self) -> dict[str, Any]:
        """Top-level parameters (what the OpenAI SDK sends for extra_body=...), then the nested
        `extra_body` object (the seed's curl example), which wins where both are set."""
        merged = {k: v for k, v in (self.model_extra or {}).items() if k in ChatImageParams.model_fields}
        merged.update(self.extra_body or {})
        return merged

    def image_urls(self) -> list[str]:
        """URLs of the user messages' image_url parts (a chat edit: the image to edit)."""
        urls = []
        for m in self.messages:
            if m.role != "user" or not isinstance(m.content, list):
                continue
            for part in m.content:
                if part.get("type") == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    urls.append(url if isinstance(url, str) else "")
        return urls

    def prompt(self) -> str:
        texts = []
        for m in self.messages:
            if m.role != "user" or m.content is None:
                continue
            if isinstance(m.content, str):
                texts.append(m.content)
            else:
                texts.extend(p.get("text", "") for p in m.content if p.get("type") == "text" and isinstance(p.get("text"), str))
        return "\n".join(t for t in texts if t.strip())


# ---- responses ----


class ImageData(BaseModel):
    b64_json: str = Field(description="The encoded image, base64.")
    url: None = Field(None, description="Always null: images come back inline.")
    revised_prompt: None = Field(None, description="Always null: prompts are used as given.")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int = 0


class ImageUsage(BaseModel):
    """OpenAI's image usage: input = the prompt's tokens in the model's tokenizer, output = the
    transformer's tokens per image (16 x 16 pixels each) times the images."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class DenoiseSteps(BaseModel):
    """An extension on servers with a step cache: the request's denoising steps that called the
    transformer and those that reused its last output."""

    computed: int
    reused: int


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time of the response.")
    data: list[ImageData] = Field(description="One entry per image, in order.")
    size: str = Field(description="WxH of the images made.")
    quality: str = Field(description="The quality asked for (auto when none).")
    background: str = Field(description="opaque: every served model makes opaque images.")
    output_format: str
    usage: ImageUsage
    denoise_steps: DenoiseSteps | None = Field(None, exclude_if=lambda v: v is None, description="With a step cache: steps computed and reused per image.")


class PartialImageEvent(BaseModel):
    """An SSE `image_generation.partial_image` (or `image_edit.partial_image`) event's data."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"] = "image_generation.partial_image"
    b64_json: str
    partial_image_index: int = Field(description="0-based, per image.")
    image_index: int = Field(0, description="Which of the request's n images (an extension: OpenAI streams one).")
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str


class CompletedImageEvent(BaseModel):
    """An SSE `image_generation.completed` (or `image_edit.completed`) event's data: one per image, the last one last."""

    type: Literal["image_generation.completed", "image_edit.completed"] = "image_generation.completed"
    b64_json: str
    image_index: int = 0
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str
    usage: ImageUsage
    denoise_steps: DenoiseSteps | None = Field(None, exclude_if=lambda v: v is None, description="With a step cache: steps computed and reused for this image.")


class ImageURL(BaseModel):
    url: str = Field(description="A data: URL holding the image.")


class ImagePart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: list[ImagePart] = Field(description="The images, as image_url parts (a list even for one).")


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"


class ChatUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(BaseModel):
    id: str = Field(description="chatcmpl-<request id>")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The served model name.")
    choices: list[ChatChoice]
    usage: ChatUsage = Field(default_factory=ChatUsage)


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: list[ImagePart] | None = Field(None, description="A choice's images, as the non-streamed message carries them.")


class ChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop"] | None = None


class ChatCompletionChunk(BaseModel):
    """A streamed chat's SSE data: per choice a role chunk, its images, a finish_reason chunk;
    then a usage chunk (no choices) with stream_options.include_usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Both shapes at once: FastAPI clients read `detail`, OpenAI clients read `error`."""

    detail: str | list[dict[str, Any]]
    error: ErrorInfo


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "timeout_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable", 504: "timeout_error"}


def error_body(status: int, detail: Any, message: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An ErrorResponse as JSON: every error the server answers has this shape."""
    message = message if message is not None else (detail if isinstance(detail, str) else str(detail))
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"detail": detail, "error": {"message": message, "type": kind, "param": param, "code": status}}


EVENT_MODELS = (PartialImageEvent, CompletedImageEvent, ChatCompletionChunk)  # the data of the SSE events, for /openapi.json
