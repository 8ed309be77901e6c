"""Edits (image-to-image, inpainting, reference) on a loaded runtime: the family's own diffusers
pipelines (models: `Family.edits`), built with `from_pipe` over the text-to-image pipeline's
modules, so the weights and engines are loaded once and shared by every task. Reference edits
(FLUX.2 klein's multi-reference conditioning, Qwen-Image-Edit's instruction edits) are the
family's own pipeline given its `image` argument (runtime.request: `references`). The VAE stand-in's `encode` runs
the VAE encoder engine; without one, `PipelineRuntime.edit_unavailable` says what to build."""

from __future__ import annotations

import logging
from typing import Any

from ..dtypes import torch_dtype
from ..models import Family


def edit_pipeline(pipe: Any, family: Family, dtype: str, task: str) -> Any:
    """The family's Img2Img (task "img2img") or Inpaint ("inpaint") pipeline over the
    text-to-image `pipe`'s own modules, loaded in `dtype`: no weights are copied, so build it
    once per runtime and task and run it under the runtime's lock, as generate() runs `pipe`."""
    import diffusers

    from ..models.standin import EngineStandIn

    # "reference" edits run the family's own pipeline (its `image` argument): a second instance over
    # the same modules, so its encode_prompt gets a stage timer of its own, as the other edit pipelines do.
    cls = getattr(diffusers, family.edits.pipeline_class(task) or family.pipeline_class)
    # from_pipe carries over only the modules of the classes its signature names: pass the
    # stand-ins by name. It casts every module to `dtype` (fp32 when not given), in place, and the
    # modules are shared: the runtime's own dtype leaves them as they are.
    standins = {name: m for name, m in pipe.components.items() if isinstance(m, EngineStandIn)}
    notes = logging.getLogger("diffusers.models.modeling_utils")
    notes.addFilter(_cast_note)
    try:
        edit = cls.from_pipe(pipe, dtype=torch_dtype(dtype), **standins)
    finally:
        notes.removeFilter(_cast_note)
    edit.set_progress_bar_config(disable=True)
    return edit


def _cast_note(record: logging.LogRecord) -> bool:
    """Drop ModelMixin.to's note on every dtype cast ("modules ... kept in float32: []"): from_pipe's
    cast to the modules' own dtype changes nothing. Every other record passes."""
    return not record.getMessage().startswith("There are modules in")
