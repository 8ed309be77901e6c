"""The Qwen-Image denoiser (QwenImageTransformer2DModel) as a tensor-only graph.

The original forward does not export: its RoPE tables are complex64, and `img_shapes` (a Python
list) and `int(max_txt_seq_len)` pin the sequence lengths. The wrapper below runs the model's own
submodules (img_in, txt_norm, txt_in, time_text_embed, transformer_blocks, norm_out, proj_out)
with RoPE passed in as real fp32 cos/sin tables that `prep()` computes on the host with the
model's own `pos_embed`. Image and text RoPE are separate inputs so each has its own dynamic dim.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

from ..base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec

ROPE_CACHE_SIZE = 64  # (size, text length) entries the stand-in keeps
VAE_FACTOR = 8  # pixels per latent cell (AutoencoderKLQwenImage: 3 down stages)

# QwenImageTransformer2DModel's class defaults are the released Qwen/Qwen-Image model.
REAL_CONFIG: dict[str, Any] = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    attention_head_dim=128,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)

INPUT_NAMES = (
    "hidden_states",
    "encoder_hidden_states",
    "encoder_hidden_states_mask",
    "timestep",
    "img_cos",
    "img_sin",
    "txt_cos",
    "txt_sin",
)


def image_grid(point: Point, patch_size: int = 2) -> tuple[int, int]:
    """(rows, cols) of image tokens at a pixel size: VAE x8, then patch x patch cells per token."""
    cell = VAE_FACTOR * patch_size
    return point.height // cell, point.width // cell


# ---------------------------------------------------------------------------------------------
# Host side: RoPE as real tables


def rope_from_config(config: Mapping[str, Any]) -> Any:
    """The model's own RoPE helper, built from its config (it has no weights)."""
    from diffusers.models.transformers.transformer_qwenimage import (
        QwenEmbedLayer3DRope,
        QwenEmbedRope,
    )

    cls = QwenEmbedLayer3DRope if config.get("use_layer3d_rope", False) else QwenEmbedRope
    return cls(theta=10000, axes_dim=list(config.get("axes_dims_rope", REAL_CONFIG["axes_dims_rope"])), scale_rope=True)


def _shapes_key(img_shapes: Any) -> tuple[tuple[int, int, int], ...]:
    """The (frame, height, width) list of one sample, as pos_embed reads it (it uses sample 0)."""
    first = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
    shapes = first if isinstance(first, list) else [first]
    return tuple(tuple(int(v) for v in s) for s in shapes)


def prep(pos_embed: Any, img_shapes: Any, text_len: int) -> dict[str, Any]:
    """img_cos/img_sin (image tokens, head_dim/2) and txt_cos/txt_sin (text tokens, head_dim/2),
    fp32, on the CPU: the real and imaginary parts of the model's complex RoPE tables."""
    import torch

    shapes = _shapes_key(img_shapes)
    with torch.no_grad():
        img, txt = pos_embed([list(shapes)], max_txt_seq_len=int(text_len), device=torch.device("cpu"))
    return {
        "img_cos": img.real.float().contiguous(),
        "img_sin": img.imag.float().contiguous(),
        "txt_cos": txt.real.float().contiguous(),
        "txt_sin": txt.imag.float().contiguous(),
    }


# ---------------------------------------------------------------------------------------------
# Graph side


def _apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """apply_rotary_emb_qwen(use_real=False) in real arithmetic: x [B, S, H, D] holds interleaved
    (re, im) pairs; cos/sin [S, D/2]. (a + ib)(c + is) = (ac - bs) + i(as + bc), in fp32."""
    import torch

    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(3).type_as(x)


class RealRopeAttnProcessor:
    """QwenDoubleStreamAttnProcessor2_0's joint attention with RoPE given as real (cos, sin) pairs:
    image_rotary_emb = ((img_cos, img_sin), (txt_cos, txt_sin)). Uses the block's own
    projections and QK norms; plain SDPA so the export does not depend on a dispatch backend."""

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        encoder_hidden_states_mask: Any = None,
        attention_mask: Any = None,
        image_rotary_emb: Any = None,
    ) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        (img_cos, img_sin), (txt_cos, txt_sin) = image_rotary_emb
        head_dim = attn.inner_dim // attn.heads

        def heads(proj: Any, x: Any) -> Any:
            return proj(x).unflatten(-1, (-1, head_dim))  # [B, S, H, D]

        img_q = heads(attn.to_q, hidden_states)
        img_k = heads(attn.to_k, hidden_states)
        img_v = heads(attn.to_v, hidden_states)
        txt_q = heads(attn.add_q_proj, encoder_hidden_states)
        txt_k = heads(attn.add_k_proj, encoder_hidden_states)
        txt_v = heads(attn.add_v_proj, encoder_hidden_states)
        img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
        txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        img_q, img_k = _apply_rope(img_q, img_cos, img_sin), _apply_rope(img_k, img_cos, img_sin)
        txt_q, txt_k = _apply_rope(txt_q, txt_cos, txt_sin), _apply_rope(txt_k, txt_cos, txt_sin)

        # joint sequence: [text, image]; SDPA wants [B, H, S, D]
        q = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)
        k = torch.cat([txt_k, img_k], dim=1).transpose(1, 2)
        v = torch.cat([txt_v, img_v], dim=1).transpose(1, 2)
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones_like(encoder_hidden_states_mask[:, :1]).expand(-1, hidden_states.shape[1])
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)

        seq_txt = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        txt_out = attn.to_add_out(out[:, :seq_txt].contiguous())
        return img_out, txt_out


@contextlib.contextmanager
def _processors(blocks: Sequence[Any], processor: Any) -> Iterator[None]:
    """Swap every block's attention processor for the duration of one traced forward, so the
    original module is left as it was (it still serves validation and the torch pipeline)."""
    saved = [block.attn.processor for block in blocks]
    try:
        for block in blocks:
            block.attn.processor = processor
        yield
    finally:
        for block, p in zip(blocks, saved):
            block.attn.processor = p


def _wrapper(model: Any) -> Any:
    import torch

    cfg = model.config
    unsupported = [k for k in ("zero_cond_t", "use_additional_t_cond", "guidance_embeds") if cfg.get(k, False)]
    if unsupported:  # Qwen-Image-Edit/Layered variants: per-token modulation or extra conditioning
        raise NotImplementedError(f"QwenImageTransformer2DModel export does not support {unsupported}")

    class QwenImageTransformer(torch.nn.Module):
        """Tensor-only forward; the top-level loop of QwenImageTransformer2DModel.forward."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.processor = RealRopeAttnProcessor()

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            encoder_hidden_states_mask: torch.Tensor,
            timestep: torch.Tensor,
            img_cos: torch.Tensor,
            img_sin: torch.Tensor,
            txt_cos: torch.Tensor,
            txt_sin: torch.Tensor,
        ) -> torch.Tensor:
            m = self.model
            hidden_states = m.img_in(hidden_states)
            timestep = timestep.to(hidden_states.dtype)
            encoder_hidden_states = m.txt_in(m.txt_norm(encoder_hidden_states))
            temb = m.time_text_embed(timestep, hidden_states)
            rope = ((img_cos, img_sin), (txt_cos, txt_sin))
            with _processors(m.transformer_blocks, self.processor):
                for block in m.transformer_blocks:
                    encoder_hidden_states, hidden_states = block(
                        hidden_states=hidden_states,
                        encoder_hidden_states=encoder_hidden_states,
                        encoder_hidden_states_mask=encoder_hidden_states_mask,
                        temb=temb,
                        image_rotary_emb=rope,
                    )
            return m.proj_out(m.norm_out(hidden_states, temb))

    return QwenImageTransformer(model)


# ---------------------------------------------------------------------------------------------
# Validation target


def _reference_case(model: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    cfg = model.config
    rows, cols = image_grid(point, cfg.patch_size)
    b, s, t = point.batch, rows * cols, point.text_len
    hidden_states = torch.randn((b, s, cfg.in_channels), generator=generator).to(dtype)
    encoder_hidden_states = torch.randn((b, t, cfg.joint_attention_dim), generator=generator).to(dtype)
    # Sample 0 uses every token; the others end in padding, as a batch of shorter prompts does.
    valid = [t] + [int(v) for v in torch.randint(1, t + 1, (b - 1,), generator=generator)]
    mask = torch.arange(t)[None, :] < torch.tensor(valid)[:, None]
    timestep = torch.rand((b,), generator=generator).to(dtype)  # the pipeline passes t / 1000
    img_shapes = [[(1, rows, cols)]] * b
    with torch.no_grad():
        sample = model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
    inputs = {
        "hidden_states": hidden_states,
        "encoder_hidden_states": encoder_hidden_states,
        "encoder_hidden_states_mask": mask,
        "timestep": timestep,
        **prep(model.pos_embed, img_shapes, t),
    }
    return ReferenceCase(inputs=inputs, expected={"sample": sample})


# ---------------------------------------------------------------------------------------------
# Run time


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from ..standin import EngineStandIn, PrepCache

    class QwenImageTransformerStandIn(EngineStandIn):
        """Answers the pipeline's QwenImageTransformer2DModel calls from an engine; no weights.

        Absorbs what PyTorch broadcasting hides: a text batch of 1 against an image batch of N
        (a single negative prompt for several images), `encoder_hidden_states_mask=None` when
        every token is valid, and the Python `img_shapes` list (RoPE, cached per size and text
        length)."""

        def __init__(self) -> None:
            super().__init__(config, engine)
            self.pos_embed = rope_from_config(config)
            self._rope = PrepCache(ROPE_CACHE_SIZE)

        def rope(self, img_shapes: Any, text_len: int, device: torch.device) -> dict[str, torch.Tensor]:
            key = (_shapes_key(img_shapes), int(text_len), str(device))
            return self._rope.get(key, lambda: {k: v.to(device) for k, v in prep(self.pos_embed, img_shapes, text_len).items()})

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor = None,
            encoder_hidden_states_mask: torch.Tensor | None = None,
            timestep: torch.Tensor = None,
            img_shapes: list | None = None,
            guidance: torch.Tensor | None = None,
            attention_kwargs: dict[str, Any] | None = None,
            controlnet_block_samples: Any = None,
            additional_t_cond: torch.Tensor | None = None,
            return_dict: bool = True,
        ) -> Any:
            if guidance is not None or controlnet_block_samples is not None or additional_t_cond is not None:
                raise NotImplementedError("guidance, controlnet_block_samples, additional_t_cond: not in the engine")
            if attention_kwargs:  # e.g. a LoRA scale: the engine's weights are fixed
                raise NotImplementedError(f"attention_kwargs {sorted(attention_kwargs)} cannot change an engine")
            b = hidden_states.shape[0]
            t = encoder_hidden_states.shape[1]
            if encoder_hidden_states_mask is None:
                mask = torch.ones((b, t), dtype=torch.bool, device=hidden_states.device)
            else:
                mask = encoder_hidden_states_mask.to(torch.bool).expand(b, t)
            timestep = timestep.reshape(-1).expand(b).to(hidden_states.dtype)
            feeds = {
                "hidden_states": hidden_states,
                "encoder_hidden_states": encoder_hidden_states.expand(b, t, -1),
                "encoder_hidden_states_mask": mask,
                "timestep": timestep,
                **self.rope(img_shapes, t, hidden_states.device),
            }
            sample = self.engine(feeds)["sample"]
            return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)

    return QwenImageTransformerStandIn()


def transformer_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """The transformer component. `config` fixes the static feature dims of the shapes (profiles,
    range checks); None means the released Qwen-Image model."""
    cfg = {**REAL_CONFIG, **(config or {})}
    patch, half_head = cfg["patch_size"], cfg["attention_head_dim"] // 2
    out_features = patch * patch * (cfg["out_channels"] or cfg["in_channels"])
    text_dim = cfg["joint_attention_dim"]

    def tokens(p: Point) -> int:
        rows, cols = image_grid(p, patch)
        return rows * cols

    batch_tokens = {0: "batch", 1: "image_tokens"}
    batch_text = {0: "batch", 1: "text_len"}
    return ComponentSpec(
        name="transformer",
        pipeline_attr="transformer",
        inputs=(
            TensorSpec("hidden_states", lambda p: (p.batch, tokens(p), cfg["in_channels"]), batch_tokens),
            TensorSpec("encoder_hidden_states", lambda p: (p.batch, p.text_len, text_dim), batch_text),
            TensorSpec("encoder_hidden_states_mask", lambda p: (p.batch, p.text_len), batch_text, dtype="bool"),
            TensorSpec("timestep", lambda p: (p.batch,), {0: "batch"}),
            # RoPE math stays fp32 in every export dtype, as the model does it (x.float()).
            TensorSpec("img_cos", lambda p: (tokens(p), half_head), {0: "image_tokens"}, dtype="float32"),
            TensorSpec("img_sin", lambda p: (tokens(p), half_head), {0: "image_tokens"}, dtype="float32"),
            TensorSpec("txt_cos", lambda p: (p.text_len, half_head), {0: "text_len"}, dtype="float32"),
            TensorSpec("txt_sin", lambda p: (p.text_len, half_head), {0: "text_len"}, dtype="float32"),
        ),
        outputs=(TensorSpec("sample", lambda p: (p.batch, tokens(p), out_features), batch_tokens),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
    )
