"""QwenImageTransformer2DModel with the edit configuration (Qwen-Image-Edit-2509/2511) as a
tensor-only graph.

Qwen-Image's export (models/qwen_image/transformer.py: host-side RoPE tables, the real-arithmetic
attention processor) plus what QwenImageEditPlusPipeline adds: the reference images' latent tokens
follow the generated ones in `hidden_states` (one dynamic "image_tokens" dim spanning both, as for
FLUX.2 klein), and with `zero_cond_t` in the checkpoint's config (2511) the reference tokens are
modulated at timestep 0. The model computes that per-token choice from the Python `img_shapes`
list and runs it on a doubled batch; here it is the bool input `is_reference` (image_tokens,),
which the stand-in derives from the same list, selecting between two modulation tables. Whether
t=0 is used comes from the config, never from a model name.
"""

from __future__ import annotations

from math import prod
from typing import Any, Mapping

from ..base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec
from ..qwen_image.transformer import (
    REAL_CONFIG,
    ROPE_CACHE_SIZE,
    RealRopeAttnProcessor,
    _processors,
    _shapes_key,
    image_grid,
    prep,
    rope_from_config,
)

# Qwen/Qwen-Image-Edit-2511 transformer/config.json: Qwen-Image's dims with zero_cond_t on.
REAL_EDIT_CONFIG: dict[str, Any] = dict(REAL_CONFIG, zero_cond_t=True)


def tokens(p: Point, patch_size: int = 2) -> int:
    """Image tokens at a point: the generated image's, then `p.references` references' at their own
    size (Point.reference_height/width; the pipeline resizes them to about 1024x1024 area)."""
    rows, cols = image_grid(p, patch_size)
    ref_rows, ref_cols = image_grid(p.at_reference_size(), patch_size)
    return rows * cols + p.references * ref_rows * ref_cols


def is_reference(img_shapes: Any) -> Any:
    """(image_tokens,) bool: True for the reference tokens, from sample 0's (frame, h, w) list
    (every sample of a call has the same layout); the model's modulate_index, as a mask."""
    import torch

    shapes = _shapes_key(img_shapes)
    return torch.tensor([False] * prod(shapes[0]) + [True] * sum(prod(s) for s in shapes[1:]))


def _modulate(x: Any, params: Any, params_ref: Any, ref: Any) -> Any:
    """QwenImageTransformerBlock._modulate with a per-token choice: the reference tokens (`ref`)
    take `params_ref`, the others `params`; both (B, 3*dim). Selecting between two (B, ...) tables
    keeps the batch a free dim (the model's doubled batch and chunk(2) pin it on export)."""
    import torch

    def pick(a: Any, b: Any) -> Any:
        return torch.where(ref[None, :, None], b[:, None], a[:, None])

    shift, scale, gate = params.chunk(3, dim=-1)
    shift_r, scale_r, gate_r = params_ref.chunk(3, dim=-1)
    return x * (1 + pick(scale, scale_r)) + pick(shift, shift_r), pick(gate, gate_r)


def _block(block: Any, hidden: Any, text: Any, mask: Any, temb: Any, temb_ref: Any, ref: Any, rope: Any) -> tuple[Any, Any]:
    """QwenImageTransformerBlock.forward with the reference tokens modulated by `temb_ref`; the
    block's own submodules, the text stream as the model runs it (on `temb`)."""
    import torch

    img1, img2 = block.img_mod(temb).chunk(2, dim=-1)
    img1_r, img2_r = block.img_mod(temb_ref).chunk(2, dim=-1)
    txt1, txt2 = block.txt_mod(temb).chunk(2, dim=-1)
    img_in, img_gate1 = _modulate(block.img_norm1(hidden), img1, img1_r, ref)
    txt_in, txt_gate1 = block._modulate(block.txt_norm1(text), txt1)
    img_attn, txt_attn = block.attn(hidden_states=img_in, encoder_hidden_states=txt_in,
                                    encoder_hidden_states_mask=mask, image_rotary_emb=rope)
    hidden = hidden + img_gate1 * img_attn
    text = text + txt_gate1 * txt_attn
    img_in2, img_gate2 = _modulate(block.img_norm2(hidden), img2, img2_r, ref)
    hidden = hidden + img_gate2 * block.img_mlp(img_in2)
    txt_in2, txt_gate2 = block._modulate(block.txt_norm2(text), txt2)
    text = text + txt_gate2 * block.txt_mlp(txt_in2)
    if text.dtype == torch.float16:
        text = text.clip(-65504, 65504)
    if hidden.dtype == torch.float16:
        hidden = hidden.clip(-65504, 65504)
    return text, hidden


def _wrapper(model: Any) -> Any:
    import torch

    cfg = model.config
    unsupported = [k for k in ("use_additional_t_cond", "guidance_embeds", "use_layer3d_rope") if cfg.get(k, False)]
    if unsupported:
        raise NotImplementedError(f"QwenImageTransformer2DModel edit export does not support {unsupported}")
    zero_cond_t = bool(cfg.get("zero_cond_t", False))

    class QwenImageEditTransformer(torch.nn.Module):
        """Tensor-only forward; QwenImageTransformer2DModel.forward's loop over its own submodules."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.processor = RealRopeAttnProcessor()

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    encoder_hidden_states_mask: torch.Tensor, timestep: torch.Tensor, is_reference: torch.Tensor,
                    img_cos: torch.Tensor, img_sin: torch.Tensor, txt_cos: torch.Tensor, txt_sin: torch.Tensor) -> torch.Tensor:
            m = self.model
            hidden_states = m.img_in(hidden_states)
            timestep = timestep.to(hidden_states.dtype)
            encoder_hidden_states = m.txt_in(m.txt_norm(encoder_hidden_states))
            temb = m.time_text_embed(timestep, hidden_states)
            # zero_cond_t: the reference tokens are modulated at t=0; otherwise as the rest (the
            # same table twice, so every config has one signature).
            temb_ref = m.time_text_embed(timestep * 0, hidden_states) if zero_cond_t else temb
            rope = ((img_cos, img_sin), (txt_cos, txt_sin))
            with _processors(m.transformer_blocks, self.processor):
                for block in m.transformer_blocks:
                    encoder_hidden_states, hidden_states = _block(
                        block, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, temb_ref,
                        is_reference, rope)
            return m.proj_out(m.norm_out(hidden_states, temb))

    return QwenImageEditTransformer(model)


def _reference_case(model: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    cfg = model.config
    rows, cols = image_grid(point, cfg.patch_size)
    b, t = point.batch, point.text_len
    hidden_states = torch.randn((b, tokens(point, cfg.patch_size), cfg.in_channels), generator=generator).to(dtype)
    encoder_hidden_states = torch.randn((b, t, cfg.joint_attention_dim), generator=generator).to(dtype)
    valid = [t] + [int(v) for v in torch.randint(1, t + 1, (b - 1,), generator=generator)]
    mask = torch.arange(t)[None, :] < torch.tensor(valid)[:, None]
    timestep = torch.rand((b,), generator=generator).to(dtype)
    refs = [(1, *image_grid(point.at_reference_size(), cfg.patch_size))] * point.references
    img_shapes = [[(1, rows, cols), *refs]] * b  # the pipeline's list: output, then references
    with torch.no_grad():
        sample = model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                       encoder_hidden_states_mask=mask, timestep=timestep, img_shapes=img_shapes, return_dict=False)[0]
    inputs = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
              "encoder_hidden_states_mask": mask, "timestep": timestep, "is_reference": is_reference(img_shapes),
              **prep(model.pos_embed, img_shapes, t)}
    return ReferenceCase(inputs=inputs, expected={"sample": sample})


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from ..standin import EngineStandIn, PrepCache

    class QwenImageEditTransformerStandIn(EngineStandIn):
        """Answers QwenImageEditPlusPipeline's transformer calls from an engine; no weights. The
        Python `img_shapes` list becomes RoPE tables and the reference mask (cached per layout)."""

        def __init__(self) -> None:
            super().__init__(config, engine)
            self.pos_embed = rope_from_config(config)
            self._prep = PrepCache(ROPE_CACHE_SIZE)

        def _tables(self, img_shapes: Any, text_len: int, device: torch.device) -> dict[str, torch.Tensor]:
            def build() -> dict[str, torch.Tensor]:
                tables = {**prep(self.pos_embed, img_shapes, text_len), "is_reference": is_reference(img_shapes)}
                return {k: v.to(device) for k, v in tables.items()}

            return self._prep.get((_shapes_key(img_shapes), int(text_len), str(device)), build)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                    encoder_hidden_states_mask: torch.Tensor | None = None, timestep: torch.Tensor = None,
                    img_shapes: list | None = None, guidance: torch.Tensor | None = None,
                    attention_kwargs: dict[str, Any] | None = None, controlnet_block_samples: Any = None,
                    additional_t_cond: torch.Tensor | None = None, return_dict: bool = True) -> Any:
            if guidance is not None or controlnet_block_samples is not None or additional_t_cond is not None:
                raise NotImplementedError("guidance, controlnet_block_samples, additional_t_cond: not in the engine")
            if attention_kwargs:
                raise NotImplementedError(f"attention_kwargs {sorted(attention_kwargs)} cannot change an engine")
            b, t = hidden_states.shape[0], encoder_hidden_states.shape[1]
            if encoder_hidden_states_mask is None:
                mask = torch.ones((b, t), dtype=torch.bool, device=hidden_states.device)
            else:
                mask = encoder_hidden_states_mask.to(torch.bool).expand(b, t)
            feeds = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states.expand(b, t, -1),
                     "encoder_hidden_states_mask": mask, "timestep": timestep.reshape(-1).expand(b).to(hidden_states.dtype),
                     **self._tables(img_shapes, t, hidden_states.device)}
            sample = self.engine(feeds)["sample"]
            return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)

    return QwenImageEditTransformerStandIn()


def transformer_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """The edit transformer component; `config` fixes the static feature dims (None: the released
    Qwen-Image-Edit-2511)."""
    cfg = {**REAL_EDIT_CONFIG, **(config or {})}
    patch, half_head = cfg["patch_size"], cfg["attention_head_dim"] // 2
    out_features = patch * patch * (cfg["out_channels"] or cfg["in_channels"])
    text_dim = cfg["joint_attention_dim"]
    n = lambda p: tokens(p, patch)  # noqa: E731
    batch_tokens, batch_text = {0: "batch", 1: "image_tokens"}, {0: "batch", 1: "text_len"}
    return ComponentSpec(
        name="transformer",
        pipeline_attr="transformer",
        inputs=(
            TensorSpec("hidden_states", lambda p: (p.batch, n(p), cfg["in_channels"]), batch_tokens),
            TensorSpec("encoder_hidden_states", lambda p: (p.batch, p.text_len, text_dim), batch_text),
            TensorSpec("encoder_hidden_states_mask", lambda p: (p.batch, p.text_len), batch_text, dtype="bool"),
            TensorSpec("timestep", lambda p: (p.batch,), {0: "batch"}),
            TensorSpec("is_reference", lambda p: (n(p),), {0: "image_tokens"}, dtype="bool"),
            TensorSpec("img_cos", lambda p: (n(p), half_head), {0: "image_tokens"}, dtype="float32"),
            TensorSpec("img_sin", lambda p: (n(p), half_head), {0: "image_tokens"}, dtype="float32"),
            TensorSpec("txt_cos", lambda p: (p.text_len, half_head), {0: "text_len"}, dtype="float32"),
            TensorSpec("txt_sin", lambda p: (p.text_len, half_head), {0: "text_len"}, dtype="float32"),
        ),
        outputs=(TensorSpec("sample", lambda p: (p.batch, n(p), out_features), batch_tokens),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
    )
