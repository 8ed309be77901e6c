"""The HTTP API's request and response models (pydantic), so /openapi.json and /docs describe
every body the server takes and gives, errors included. Validation beyond types lives in
runtime.request.resolve, shared with `omni generate`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..runtime.request import MAX_IMAGES, MAX_SCALE, MAX_STEPS, SEED_LIMIT

# ---- requests ----


class ImageParams(BaseModel):
    """The vllm-omni extension fields, shared by both endpoints."""

    negative_prompt: StrictStr | None = Field(None, description="What the image should not show (families with CFG; ignored elsewhere).")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Denoising steps (default: the model family's).")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="Classifier-free guidance scale (families that take it).")
    true_cfg_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="True-CFG scale (Qwen-Image, FLUX.1; needs a negative prompt).")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="Random seed; image i of the request uses seed + i. Default: random.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoding of the returned images.")
    output_compression: int | None = Field(None, ge=0, le=100, description="0..100: PNG zlib effort, or 100 - quality for JPEG/WebP.")


class ImageGenerationBody(ImageParams):
    """POST /v1/images/generations (OpenAI's fields plus the vllm-omni extensions)."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr = Field(description="Text prompt.")
    model: str | None = Field(None, description="Must be the served model name when given.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images.")
    size: StrictStr | None = Field(None, description="'WxH' in pixels, e.g. '1024x1024' (default: the family's).")
    response_format: Literal["b64_json"] = Field("b64_json", description="Only b64_json: images come back inline.")
    user: str | None = Field(None, description="An end-user id, logged.")


class ChatImageParams(ImageParams):
    """Parameters of a chat request, read from `extra_body` and the top level."""

    model_config = ConfigDict(extra="ignore")

    height: int | None = Field(None, gt=0, description="Image height in pixels (size wins when both are given).")
    width: int | None = Field(None, gt=0, description="Image width in pixels.")
    size: StrictStr | None = Field(None, description="'WxH' in pixels; wins over height/width.")
    num_outputs_per_prompt: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="user, system or assistant; the prompt is the user messages' text.")
    content: str | list[dict[str, Any]] | None = Field(None, description="A string, or a list of parts ({'type': 'text', 'text': ...}).")


class ChatBody(BaseModel):
    """POST /v1/chat/completions with image output (vllm-omni's text-to-image chat)."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; its user text is the prompt.")
    model: str | None = Field(None, description="Must be the served model name when given.")
    extra_body: dict[str, Any] | None = Field(None, description="Image parameters (see ChatImageParams); the top level works too.")

    def params(self) -> dict[str, Any]:
        """Top-level parameters (what the OpenAI SDK sends for extra_body=...), then the nested
        `extra_body` object (the seed's curl example), which wins where both are set."""
        merged = {k: v for k, v in (self.model_extra or {}).items() if k in ChatImageParams.model_fields}
        merged.update(self.extra_body or {})
        return merged

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


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time of the response.")
    data: list[ImageData] = Field(description="One entry per image, in order.")


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


class ModelDefaults(BaseModel):
    size: str
    num_inference_steps: int
    guidance_scale: float | None
    true_cfg_scale: float | None


class RuntimeInfo(BaseModel):
    """What serves the model: its runtime, family, device, dtype and engines."""

    runtime: str = Field(description="torch, torch-compile, onnxruntime or tensorrt.")
    family: str
    device: str
    dtype: str
    components: dict[str, str] | None = Field(None, description="Component -> what runs it, where engines are swapped in.")
    engine_profile: dict[str, Any] | None = Field(None, description="Component -> the built min/max request points.")
    compile: dict[str, Any] | None = Field(None, description="torch-compile: what was compiled, the warm-up size and its seconds.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omni-trt"
    ready: bool
    runtime: str | None = None
    family: str | None = None
    device: str | None = None
    dtype: str | None = None
    components: dict[str, str] | None = None
    engine_profile: dict[str, Any] | None = None
    compile: dict[str, Any] | None = None
    defaults: ModelDefaults | None = None
    sizes: str | None = Field(None, description="The sizes this server makes.")
    max_batch: int | None = Field(None, description="Most images per pipeline call at the default guidance.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(RuntimeInfo):
    status: Literal["ok"] = "ok"
    model: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Both shapes at once: FastAPI clients read `detail`, OpenAI clients read `error`."""

    detail: str | list[dict[str, Any]]
    error: ErrorInfo
