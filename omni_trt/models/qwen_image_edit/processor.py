"""The Qwen2-VL processor QwenImageEditPlusPipeline reads its input images with, image part only.

transformers' Qwen2VLProcessor takes a video processor too, and checks its class even when None is
given; that class needs torchvision, which the CPU machines here cannot install beside torch. The
pipeline never passes videos, so this subclass drops that argument (transformers builds a
processor's parts from its __init__ signature) and reads the image processor with the PIL backend:
the same preprocessor_config.json, the same pixels, with or without torchvision. The folder keeps
the published layout (processor/ as Qwen2VLProcessor.save_pretrained writes it).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

PROCESSOR_ATTR = "processor"  # the pipeline attribute and model folder holding it


@cache
def processor_class() -> type:
    """Qwen2VLProcessor without its video processor (saves and loads as Qwen2VLProcessor); made on
    first use, so the family spec (imported by the server's pure parts) does not import transformers."""
    from transformers import Qwen2VLProcessor

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                     **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    # diffusers records a module's library and class from these when it saves a pipeline: the folder
    # then names transformers' own Qwen2VLProcessor, as the published checkpoints do.
    ImageQwen2VLProcessor.__module__ = Qwen2VLProcessor.__module__
    ImageQwen2VLProcessor.__name__ = ImageQwen2VLProcessor.__qualname__ = "Qwen2VLProcessor"
    return ImageQwen2VLProcessor


def load_processor(model: str | Path) -> Any:
    """The processor of a pipeline (a local folder or a hub id), without a video processor."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    where = dict(pretrained_model_name_or_path=str(model), subfolder=PROCESSOR_ATTR)
    return processor_class()(Qwen2VLImageProcessorPil.from_pretrained(**where), Qwen2Tokenizer.from_pretrained(**where))


def load_replacements(model: str | Path) -> dict[str, Any]:
    """DiffusionPipeline.from_pretrained keyword arguments for a QwenImageEditPlusPipeline: its processor."""
    return {PROCESSOR_ATTR: load_processor(model)}
