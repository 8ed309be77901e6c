"""The model cards (/v1/models) and /health's body: what serves the model, its limits, and the
LoRA adapters served on it (vLLM's adapter cards)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ModelDefaults(BaseModel):
    size: str
    num_inference_steps: int
    guidance_scale: float | None
    true_cfg_scale: float | None


class SizeRange(BaseModel):
    """The sizes this server makes, as numbers: width and height within their ranges, multiples of multiple_of."""

    multiple_of: int
    min_width: int
    max_width: int
    min_height: int
    max_height: int


class RuntimeInfo(BaseModel):
    """What serves the model: its runtime, family, device, dtype and engines (on /health always
    set; on a model card once the model is loaded)."""

    runtime: str | None = Field(None, description="torch, torch-compile, onnxruntime or tensorrt.")
    family: str | None = None
    device: str | None = None
    dtype: str | None = None
    components: dict[str, str] | None = Field(None, description="Component -> what runs it, where engines are swapped in.")
    engine_profile: dict[str, Any] | None = Field(None, description="Component -> the built min/max request points.")
    compile: dict[str, Any] | None = Field(None, description="torch-compile: what was compiled, the warm-up size and its seconds.")
    preview_decoder: str | None = Field(None, description="What makes streamed partial images: mlp (a fitted per-pixel network "
                                        "from latent to RGB) or linear (a fitted latent-to-RGB map), at most 512 px, or full "
                                        "(the VAE decoder, full size).")
    lora: dict[str, Any] | None = Field(None, description="LoRA adapters: how a set is applied (set_adapters, onnxruntime session, "
                                        "tensorrt refit), switches so far, and the merged sessions held (onnxruntime).")
    cache: dict[str, Any] | None = Field(None, description="The step cache: backend (none or mag_cache), its mag_* settings, the step "
                                         "counts calibrated and where the calibration came from.")
    prompt_cache_size: int | None = Field(None, description="Text-encoder outputs kept for repeated prompts (0: none).")


class ModelCard(RuntimeInfo):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omni-trt"
    ready: bool
    defaults: ModelDefaults | None = None
    sizes: str | None = Field(None, description="The sizes this server makes.")
    size_limits: SizeRange | None = Field(None, description="The same, as numbers.")
    max_batch: int | None = Field(None, description="Most images per pipeline call at the default guidance.")
    max_prompt_tokens: int | None = Field(None, description="Longest prompt this server takes, in the model's tokens.")
    max_megapixel_steps: float | None = Field(None, description="Most width x height x n x steps / 1e6 one request may ask for.")
    input_images: Literal["optional", "required"] | None = Field(
        None, description="required: an edit-only model, which draws from input images only (POST /v1/images/edits); "
        "optional: generations and edits.")
    # A LoRA adapter's card (vLLM's shape): the served model it applies to, and what it changes. Never a path.
    parent: str | None = Field(None, description="A LoRA adapter's card: the served model it applies to; the id is the adapter's name.")
    root: str | None = Field(None, description="A LoRA adapter's card: the same as parent (vLLM's field).")
    lora_rank: int | None = Field(None, description="A LoRA adapter's card: its largest rank.")
    lora_target_layers: int | None = Field(None, description="A LoRA adapter's card: the transformer layers it changes.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    @classmethod
    def one(cls, name: str, created: int, ready: bool, **fields: Any) -> ModelList:
        """The served model's card: every field set explicitly, since /v1/models leaves out unset ones."""
        return cls(object="list", data=[ModelCard(id=name, object="model", created=created, owned_by="omni-trt", ready=ready, **fields)])

    def with_adapters(self, cards: list[dict[str, Any]]) -> ModelList:
        """This list with an adapter card per entry of `cards` (id, parent, lora_rank, ...) after the model's."""
        base = self.data[0]
        return ModelList(object="list", data=[*self.data, *(ModelCard(object="model", created=base.created, owned_by="omni-trt",
                                                                       ready=base.ready, **c) for c in cards)])


class HealthResponse(RuntimeInfo):
    status: Literal["ok"] = "ok"
    model: str
