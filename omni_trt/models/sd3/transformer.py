"""SD3Transformer2DModel (SD3 / SD3.5) as a tensor-only graph.

With the latent as (B, C, H, W), torch.export cannot keep H and W dynamic: the 2x2 patch conv
needs them even, and cropping the position table adds range guards (H/2 <= pos_embed_max_size,
and a special case where the crop is the whole table). So the latent comes in as the free view
(B, C, H/2, 2, W/2, 2): H/2 and W/2 are plain dims, the model's own conv sees 2*(H/2). The crop is
an index_select on the model's own table (no guards); the host checks the range as the original
does. Everything else runs the model's own submodules.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec

FACTOR = 8  # pixels per latent cell
PATCH = 2  # patch_size of every SD3 / SD3.5 checkpoint

# SD3 Medium and SD3.5 Large/Medium share these; transformer_spec(config) uses a checkpoint's own.
REAL = dict(in_channels=16, out_channels=16, joint_attention_dim=4096, pooled_projection_dim=2048)


def _patches(p: Point) -> tuple[int, int]:
    return p.height // (FACTOR * PATCH), p.width // (FACTOR * PATCH)


def to_patches(latent: Any, patch: int = PATCH) -> Any:
    """(B, C, H, W) -> the wrapper's (B, C, H/p, p, W/p, p): a view, no copy."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // patch, patch, w // patch, patch)


def check_size(config: Mapping[str, Any], height: int, width: int) -> None:
    """What the original forward rejects: odd latent sides, or more patches than its table."""
    p, limit = config["patch_size"], config["pos_embed_max_size"]
    if height % p or width % p:
        raise ValueError(f"latent {height}x{width} is not a multiple of the patch size {p}")
    if height // p > limit or width // p > limit:
        raise ValueError(f"latent {height}x{width} has more than pos_embed_max_size={limit} patches per side")


def _wrapper(model: Any) -> Any:
    import torch

    class SD3Transformer(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            pooled_projections: torch.Tensor,
            timestep: torch.Tensor,
        ) -> torch.Tensor:
            m = self.model
            embed = m.pos_embed
            b, c, h, p, w, _ = hidden_states.shape
            x = embed.proj(hidden_states.reshape(b, c, h * p, w * p)).flatten(2).transpose(1, 2)
            # PatchEmbed.cropped_pos_embed as a gather: the centred h x w window of the table.
            size = embed.pos_embed_max_size
            table = embed.pos_embed.reshape(size, size, -1)
            rows = torch.arange(h, device=x.device) + (size - h) // 2
            cols = torch.arange(w, device=x.device) + (size - w) // 2
            pos = table.index_select(0, rows).index_select(1, cols).reshape(1, h * w, -1)
            x = (x + pos).to(x.dtype)
            temb = m.time_text_embed(timestep, pooled_projections)
            encoder_hidden_states = m.context_embedder(encoder_hidden_states)
            for block in m.transformer_blocks:
                encoder_hidden_states, x = block(hidden_states=x, encoder_hidden_states=encoder_hidden_states, temb=temb)
            x = m.proj_out(m.norm_out(x, temb))
            x = x.reshape(b, h, w, p, p, m.out_channels)
            x = torch.einsum("nhwpqc->nchpwq", x)
            return x.reshape(b, m.out_channels, h * p, w * p)

    return SD3Transformer(model)


def _reference_case(model: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    cfg = model.config
    b, t = point.batch, point.text_len
    latent = torch.randn(b, cfg.in_channels, point.height // FACTOR, point.width // FACTOR, generator=generator).to(dtype)
    text = torch.randn(b, t, cfg.joint_attention_dim, generator=generator).to(dtype)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=generator).to(dtype)
    timestep = 1000.0 * torch.rand(b, generator=generator)  # the pipeline passes scheduler t in [0, 1000]
    with torch.no_grad():
        (expected,) = model(
            hidden_states=latent,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )
    inputs = dict(
        hidden_states=to_patches(latent, cfg.patch_size),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=timestep,
    )
    return ReferenceCase(inputs=inputs, expected={"sample": expected})


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from ..standin import EngineStandIn

    class SD3TransformerStandIn(EngineStandIn):
        """Called by StableDiffusion3Pipeline exactly like SD3Transformer2DModel; runs an engine,
        no weights."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor = None,
            pooled_projections: torch.Tensor = None,
            timestep: torch.Tensor = None,
            block_controlnet_hidden_states: list | None = None,
            joint_attention_kwargs: dict[str, Any] | None = None,
            return_dict: bool = True,
            skip_layers: list[int] | None = None,
        ) -> Any:
            if block_controlnet_hidden_states is not None:
                raise NotImplementedError("ControlNet residuals are not part of the exported transformer")
            if skip_layers:
                raise NotImplementedError("skip-layer guidance needs a graph without those layers")
            if joint_attention_kwargs and set(joint_attention_kwargs) - {"scale"}:
                raise NotImplementedError(f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported by the engine")
            b, _, h, w = hidden_states.shape
            check_size(config, h, w)
            feeds = {
                "hidden_states": to_patches(hidden_states, config["patch_size"]),
                "encoder_hidden_states": encoder_hidden_states.to(hidden_states.dtype),
                "pooled_projections": pooled_projections.to(hidden_states.dtype),
                # A 0-d timestep broadcasts in PyTorch; an engine takes one per sample.
                "timestep": timestep.float().reshape(-1).expand(b),
            }
            sample = self.engine(feeds)["sample"]
            return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)

    return SD3TransformerStandIn(config, engine)


def transformer_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """Inputs/outputs of the exported SD3 transformer. Static feature sizes are SD3.5's unless a
    checkpoint's config is given (tiny test models differ)."""
    c = {**REAL, **{k: v for k, v in (config or {}).items() if k in REAL}}
    batch = {0: "batch"}

    def latent(p: Point) -> tuple[int, ...]:
        h, w = _patches(p)
        return (p.batch, c["in_channels"], h, PATCH, w, PATCH)

    def sample(p: Point) -> tuple[int, ...]:
        return (p.batch, c["out_channels"], p.height // FACTOR, p.width // FACTOR)

    return ComponentSpec(
        name="transformer",
        pipeline_attr="transformer",
        inputs=(
            # patch_height/width: 2x2 latent patches per side (image side / 16).
            TensorSpec("hidden_states", latent, {0: "batch", 2: "patch_height", 4: "patch_width"}),
            # 77 CLIP + 256 T5 tokens, always padded: static.
            TensorSpec("encoder_hidden_states", lambda p: (p.batch, p.text_len, c["joint_attention_dim"]), batch),
            TensorSpec("pooled_projections", lambda p: (p.batch, c["pooled_projection_dim"]), batch),
            TensorSpec("timestep", lambda p: (p.batch,), batch, "float32"),
        ),
        outputs=(TensorSpec("sample", sample, {0: "batch", 2: "latent_height", 3: "latent_width"}),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
    )
