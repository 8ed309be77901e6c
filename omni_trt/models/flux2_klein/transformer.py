"""Flux2Transformer2DModel (FLUX.2 [klein]) as a tensor-only graph.

As for FLUX.1 (models/flux/transformer.py): the original forward computes its RoPE tables in
float64 from the 4-axis position ids (T, H, W, L) and takes Python-side KV-cache switches; here the
host computes the tables with the model's own Flux2PosEmbed (no weights) and passes real fp32
cos/sin in, text and image parts separately. The image part covers the generated tokens AND the
reference-image tokens the pipeline appends (its multi-reference conditioning), so "image_tokens"
is one dynamic dim spanning generations and edits: `Point.references` images at the point's size.
Everything else runs the model's own submodules; only the top-level loop is rewritten.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec

PIXELS_PER_TOKEN = 16  # VAE x8, then 2x2 latent patches packed into one token
ROPE_CACHE_SIZE = 64  # (ids shapes) entries the stand-in keeps

# black-forest-labs/FLUX.2-klein-4B transformer/config.json (the fields the specs read); a
# checkpoint's own config (transformer_spec(config)) overrides them.
REAL = dict(in_channels=128, out_channels=None, patch_size=1, joint_attention_dim=7680, attention_head_dim=128)


def tokens(p: Point) -> int:
    """Image tokens the transformer sees at a point: the generated image's and its references'."""
    return (p.height // PIXELS_PER_TOKEN) * (p.width // PIXELS_PER_TOKEN) * (1 + p.references)


def rope_embedder(config: Mapping[str, Any]) -> Any:
    """The model's own position embedder, built from its config (it has no weights)."""
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    return Flux2PosEmbed(theta=config.get("rope_theta", 2000), axes_dim=list(config.get("axes_dims_rope", (32, 32, 32, 32))))


def prep(config: Mapping[str, Any], txt_ids: Any, img_ids: Any) -> dict[str, Any]:
    """Host-side RoPE: fp32 cos/sin per text and image token (rows are per token, so embedding the
    parts separately equals the model's concatenation). Ids: (S, 4) or (B, S, 4); the model reads
    sample 0's, as here."""
    import torch

    embed = rope_embedder(config)
    with torch.no_grad():
        txt_cos, txt_sin = embed(txt_ids[0] if txt_ids.ndim == 3 else txt_ids)
        img_cos, img_sin = embed(img_ids[0] if img_ids.ndim == 3 else img_ids)
    return {"txt_rope_cos": txt_cos.float().cpu(), "txt_rope_sin": txt_sin.float().cpu(),
            "img_rope_cos": img_cos.float().cpu(), "img_rope_sin": img_sin.float().cpu()}


def _wrapper(model: Any) -> Any:
    import torch

    class Flux2Transformer(torch.nn.Module):
        """Tensor-only forward: Flux2Transformer2DModel.forward without guidance or KV caching
        (Flux2KleinPipeline passes guidance=None and no cache)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                    txt_rope_cos: torch.Tensor, txt_rope_sin: torch.Tensor, img_rope_cos: torch.Tensor,
                    img_rope_sin: torch.Tensor) -> torch.Tensor:
            m = self.model
            text_len = encoder_hidden_states.shape[1]
            temb = m.time_guidance_embed(timestep.to(hidden_states.dtype) * 1000, None)
            mod_img, mod_txt = m.double_stream_modulation_img(temb), m.double_stream_modulation_txt(temb)
            mod_single = m.single_stream_modulation(temb)
            hidden_states = m.x_embedder(hidden_states)
            encoder_hidden_states = m.context_embedder(encoder_hidden_states)
            rope = (torch.cat([txt_rope_cos, img_rope_cos]), torch.cat([txt_rope_sin, img_rope_sin]))
            for block in m.transformer_blocks:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                    temb_mod_img=mod_img, temb_mod_txt=mod_txt, image_rotary_emb=rope)
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
            for block in m.single_transformer_blocks:
                hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=None, temb_mod=mod_single,
                                      image_rotary_emb=rope)
            return m.proj_out(m.norm_out(hidden_states[:, text_len:], temb))

    return Flux2Transformer(model)


def _reference_case(model: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch
    from diffusers import Flux2KleinPipeline

    cfg = model.config
    b, t = point.batch, point.text_len
    rows, cols = point.height // PIXELS_PER_TOKEN, point.width // PIXELS_PER_TOKEN
    hidden = torch.randn(b, tokens(point), cfg.in_channels, generator=generator).to(dtype)
    text = torch.randn(b, t, cfg.joint_attention_dim, generator=generator).to(dtype)
    timestep = torch.rand(b, generator=generator)  # t/1000, as the pipeline passes it
    # The pipeline's own ids: the generated grid at T=0, each reference at its own T offset.
    grid = torch.zeros(1, 1, rows, cols)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(grid)[0]
    if point.references:
        refs = Flux2KleinPipeline._prepare_image_ids([grid] * point.references)[0]
        img_ids = torch.cat([img_ids, refs])
    # Text ids are (0, 0, 0, l) in the pipeline; random ones make the text rows of the table matter.
    txt_ids = torch.randint(0, 32, (t, 4), generator=generator)
    with torch.no_grad():
        (expected,) = model(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, img_ids=img_ids,
                            txt_ids=txt_ids, guidance=None, return_dict=False)
    inputs = dict(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, **prep(dict(cfg), txt_ids, img_ids))
    return ReferenceCase(inputs=inputs, expected={"sample": expected})


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from ..standin import EngineStandIn, PrepCache

    class Flux2TransformerStandIn(EngineStandIn):
        """Called by Flux2KleinPipeline exactly like Flux2Transformer2DModel; runs an engine, no weights."""

        def __init__(self) -> None:
            super().__init__(config, engine)
            self._rope = PrepCache(ROPE_CACHE_SIZE)

        def _rope_for(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> dict[str, torch.Tensor]:
            # Keyed by shape; the ids are compared too, so other reference layouts never get a stale table.
            key = (tuple(txt_ids.shape), tuple(img_ids.shape), str(img_ids.device))
            hit = self._rope.get(key, lambda: (txt_ids.clone(), img_ids.clone(), prep(config, txt_ids, img_ids)))
            tables = hit[2] if torch.equal(hit[0], txt_ids) and torch.equal(hit[1], img_ids) else prep(config, txt_ids, img_ids)
            return {k: v.to(img_ids.device) for k, v in tables.items()}

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None, timestep: torch.Tensor = None,
                    img_ids: torch.Tensor = None, txt_ids: torch.Tensor = None, guidance: torch.Tensor = None,
                    joint_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True, kv_cache: Any = None,
                    kv_cache_mode: str | None = None, num_ref_tokens: int = 0, ref_fixed_timestep: float = 0.0) -> Any:
            if guidance is not None or kv_cache_mode is not None:
                raise NotImplementedError("guidance embeddings and KV caching are not part of the exported transformer")
            if joint_attention_kwargs and set(joint_attention_kwargs) - {"scale"}:
                raise NotImplementedError(f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported by the engine")
            b = hidden_states.shape[0]
            feeds = {
                "hidden_states": hidden_states,
                "encoder_hidden_states": encoder_hidden_states.to(hidden_states.dtype),
                "timestep": timestep.float().reshape(-1).expand(b),  # a 0-d timestep broadcasts in PyTorch
                **self._rope_for(txt_ids, img_ids),
            }
            sample = self.engine(feeds)["sample"]
            return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)

    return Flux2TransformerStandIn()


def transformer_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """Inputs/outputs of the exported FLUX.2 transformer; static feature sizes are klein 4B's
    unless a checkpoint's config is given (the tiny test model differs)."""
    c = {**REAL, **{k: v for k, v in (config or {}).items() if k in REAL}}
    out = c["patch_size"] ** 2 * (c["out_channels"] or c["in_channels"])
    batch, img = {0: "batch"}, {0: "batch", 1: "image_tokens"}
    rope_dim = c["attention_head_dim"]
    return ComponentSpec(
        name="transformer",
        pipeline_attr="transformer",
        inputs=(
            TensorSpec("hidden_states", lambda p: (p.batch, tokens(p), c["in_channels"]), img),
            # Prompts are padded to max_sequence_length (512): the text length is static.
            TensorSpec("encoder_hidden_states", lambda p: (p.batch, p.text_len, c["joint_attention_dim"]), batch),
            TensorSpec("timestep", lambda p: (p.batch,), batch, "float32"),
            TensorSpec("txt_rope_cos", lambda p: (p.text_len, rope_dim), {}, "float32"),
            TensorSpec("txt_rope_sin", lambda p: (p.text_len, rope_dim), {}, "float32"),
            TensorSpec("img_rope_cos", lambda p: (tokens(p), rope_dim), {0: "image_tokens"}, "float32"),
            TensorSpec("img_rope_sin", lambda p: (tokens(p), rope_dim), {0: "image_tokens"}, "float32"),
        ),
        outputs=(TensorSpec("sample", lambda p: (p.batch, tokens(p), out), img),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
    )
