"""Request bodies of the HTTP API (pydantic). Validation beyond types lives in
runtime.request.resolve, shared with `omni generate`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..runtime.request import MAX_IMAGES, MAX_SCALE, MAX_STEPS, SEED_LIMIT


class ImageParams(BaseModel):
    """The vllm-omni extension fields, shared by both endpoints."""

    negative_prompt: StrictStr | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE)
    true_cfg_scale: float | None = Field(None, ge=0, le=MAX_SCALE)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)


class ImageGenerationBody(ImageParams):
    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: StrictStr | None = None
    response_format: Literal["b64_json"] = "b64_json"
    user: str | None = None


class ChatImageParams(ImageParams):
    """Parameters of a chat request, read from `extra_body` and the top level."""

    model_config = ConfigDict(extra="ignore")

    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    size: StrictStr | None = None
    num_outputs_per_prompt: int = Field(1, ge=1, le=MAX_IMAGES)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    extra_body: dict[str, Any] | None = None

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
