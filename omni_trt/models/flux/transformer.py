"""FluxTransformer2DModel as a tensor-only graph.

The original forward exports, but its RoPE tables are computed in float64 inside the graph from
the position ids. Here the host computes them once per (image tokens, text length) with the
model's own FluxPosEmbed (no weights) and passes real fp32 cos/sin in, text and image parts
separately so the image-token count is its own dynamic dim. Everything else runs the model's own
submodules; only the top-level loop is rewritten.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec

PIXELS_PER_TOKEN = 16  # VAE x8, then 2x2 latent patches packed into one token
ROPE_THETA = 10000  # hard-coded in FluxTransformer2DModel.__init__

# FLUX.1-dev / schnell shapes; transformer_spec(config) uses a checkpoint's own.
REAL = dict(in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, attention_head_dim=128)


def _image_tokens(p: Point) -> int:
    return (p.height // PIXELS_PER_TOKEN) * (p.width // PIXELS_PER_TOKEN)


def rope_embedder(config: Mapping[str, Any]) -> Any:
    """The model's own position embedder, built from its config (it has no weights)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=ROPE_THETA, axes_dim=list(config["axes_dims_rope"]))


def prep(config: Mapping[str, Any], txt_ids: Any, img_ids: Any) -> dict[str, Any]:
    """Host-side RoPE: fp32 cos/sin per text and image token. The table rows are per-token, so
    embedding the parts separately equals embedding their concatenation as the model does."""
    import torch

    embed = rope_embedder(config)
    with torch.no_grad():
        txt_cos, txt_sin = embed(txt_ids[0] if txt_ids.ndim == 3 else txt_ids)
        img_cos, img_sin = embed(img_ids[0] if img_ids.ndim == 3 else img_ids)
    return {
        "txt_rope_cos": txt_cos.float(),
        "txt_rope_sin": txt_sin.float(),
        "img_rope_cos": img_cos.float(),
        "img_rope_sin": img_sin.float(),
    }


def _wrapper(model: Any) -> Any:
    import torch

    class FluxTransformer(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.has_guidance = bool(model.config.guidance_embeds)

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            pooled_projections: torch.Tensor,
            timestep: torch.Tensor,
            guidance: torch.Tensor,
            txt_rope_cos: torch.Tensor,
            txt_rope_sin: torch.Tensor,
            img_rope_cos: torch.Tensor,
            img_rope_sin: torch.Tensor,
        ) -> torch.Tensor:
            m = self.model
            hidden_states = m.x_embedder(hidden_states)
            # Same casts as the original: the pipeline passes t/1000 and guidance, scaled here.
            timestep = timestep.to(hidden_states.dtype) * 1000
            if self.has_guidance:
                temb = m.time_text_embed(timestep, guidance.to(hidden_states.dtype) * 1000, pooled_projections)
            else:  # schnell: guidance stays an (unused) graph input, so one spec serves both
                temb = m.time_text_embed(timestep, pooled_projections)
            encoder_hidden_states = m.context_embedder(encoder_hidden_states)
            rope = (torch.cat([txt_rope_cos, img_rope_cos]), torch.cat([txt_rope_sin, img_rope_sin]))
            for block in m.transformer_blocks:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    image_rotary_emb=rope,
                )
            for block in m.single_transformer_blocks:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    image_rotary_emb=rope,
                )
            return m.proj_out(m.norm_out(hidden_states, temb))

    return FluxTransformer(model)


def _reference_case(model: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch
    from diffusers import FluxPipeline

    cfg = model.config
    b, t = point.batch, point.text_len
    h, w = point.height // PIXELS_PER_TOKEN, point.width // PIXELS_PER_TOKEN
    hidden = torch.randn(b, h * w, cfg.in_channels, generator=generator).to(dtype)
    text = torch.randn(b, t, cfg.joint_attention_dim, generator=generator).to(dtype)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=generator).to(dtype)
    timestep = torch.rand(b, generator=generator)  # t/1000, as the pipeline passes it
    guidance = 1.0 + 4.0 * torch.rand(b, generator=generator)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h, w, "cpu", torch.float32)
    # The pipeline's text ids are all zero (cos 1, sin 0); random ones make the text rows of the
    # RoPE table matter, so a text/image mix-up in the wrapper shows as an error.
    txt_ids = torch.randint(0, 32, (t, 3), generator=generator).float()
    with torch.no_grad():
        (expected,) = model(
            hidden_states=hidden,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance if cfg.guidance_embeds else None,
            return_dict=False,
        )
    inputs = dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=timestep,
        guidance=guidance,
        **prep(dict(cfg), txt_ids, img_ids),
    )
    return ReferenceCase(inputs=inputs, expected={"sample": expected})


ROPE_CACHE_SIZE = 64  # (size, text length) entries the stand-in keeps


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from ..standin import EngineStandIn, PrepCache

    class FluxTransformerStandIn(EngineStandIn):
        """Called by FluxPipeline exactly like FluxTransformer2DModel; runs an engine, no weights."""

        def __init__(self) -> None:
            super().__init__(config, engine)
            self._rope = PrepCache(ROPE_CACHE_SIZE)

        def _rope_for(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> dict[str, torch.Tensor]:
            # Keyed by shape (size, text length); the ids are compared too, so callers that
            # offset them (e.g. reference images) never get a stale table.
            key = (tuple(txt_ids.shape), tuple(img_ids.shape), str(img_ids.device))
            hit = self._rope.get(key, lambda: (txt_ids.clone(), img_ids.clone(), prep(config, txt_ids, img_ids)))
            if torch.equal(hit[0], txt_ids) and torch.equal(hit[1], img_ids):
                return hit[2]
            return prep(config, txt_ids, img_ids)  # same shapes, other ids: not worth caching

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor = None,
            pooled_projections: torch.Tensor = None,
            timestep: torch.Tensor = None,
            img_ids: torch.Tensor = None,
            txt_ids: torch.Tensor = None,
            guidance: torch.Tensor = None,
            joint_attention_kwargs: dict[str, Any] | None = None,
            controlnet_block_samples: Any = None,
            controlnet_single_block_samples: Any = None,
            return_dict: bool = True,
            controlnet_blocks_repeat: bool = False,
        ) -> Any:
            if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
                raise NotImplementedError("ControlNet residuals are not part of the exported transformer")
            if joint_attention_kwargs and set(joint_attention_kwargs) - {"scale"}:
                raise NotImplementedError(f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported by the engine")
            b = hidden_states.shape[0]
            if guidance is None:
                if config.get("guidance_embeds"):
                    raise ValueError("this transformer embeds guidance: pass guidance")
                guidance = torch.zeros(b, device=hidden_states.device)
            feeds = {
                "hidden_states": hidden_states,
                "encoder_hidden_states": encoder_hidden_states.to(hidden_states.dtype),
                "pooled_projections": pooled_projections.to(hidden_states.dtype),
                # A 0-d timestep broadcasts in PyTorch; an engine takes one per sample.
                "timestep": timestep.float().reshape(-1).expand(b),
                "guidance": guidance.float().reshape(-1).expand(b),
                **self._rope_for(txt_ids, img_ids),
            }
            sample = self.engine(feeds)["sample"]
            return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)

    return FluxTransformerStandIn()


def transformer_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """Inputs/outputs of the exported Flux transformer. Static feature sizes are FLUX.1's unless
    a checkpoint's config is given (tiny test models differ)."""
    c = {**REAL, **{k: v for k, v in (config or {}).items() if k in REAL}}
    batch, img = {0: "batch"}, {0: "batch", 1: "image_tokens"}
    rope_dim = c["attention_head_dim"]
    return ComponentSpec(
        name="transformer",
        pipeline_attr="transformer",
        inputs=(
            TensorSpec("hidden_states", lambda p: (p.batch, _image_tokens(p), c["in_channels"]), img),
            # Text length is fixed (T5 prompts are padded to max_sequence_length): static.
            TensorSpec("encoder_hidden_states", lambda p: (p.batch, p.text_len, c["joint_attention_dim"]), batch),
            TensorSpec("pooled_projections", lambda p: (p.batch, c["pooled_projection_dim"]), batch),
            TensorSpec("timestep", lambda p: (p.batch,), batch, "float32"),
            TensorSpec("guidance", lambda p: (p.batch,), batch, "float32"),
            TensorSpec("txt_rope_cos", lambda p: (p.text_len, rope_dim), {}, "float32"),
            TensorSpec("txt_rope_sin", lambda p: (p.text_len, rope_dim), {}, "float32"),
            TensorSpec("img_rope_cos", lambda p: (_image_tokens(p), rope_dim), {0: "image_tokens"}, "float32"),
            TensorSpec("img_rope_sin", lambda p: (_image_tokens(p), rope_dim), {0: "image_tokens"}, "float32"),
        ),
        outputs=(TensorSpec("sample", lambda p: (p.batch, _image_tokens(p), c["in_channels"]), img),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
    )
