"""The Z-Image transformer (ZImageTransformer2DModel) as a tensor-only graph.

The original forward takes Python lists of per-sample latents and caption features, patchifies
and pads each to a multiple of 32 in Python, and looks up complex RoPE by position ids, so it
does not export. It is split in two:

- `ZImagePrep` (host, pure torch, no weights): patchify, caption padding, position ids -> real
  RoPE tables, pad/key masks. Everything except the patchify and the caption copy depends only
  on (latent size, caption lengths) and is cached.
- the wrapper (exported): the model's own embedders, refiners, layers and final layer over ONE
  padded batch `[image tokens | caption tokens]`; the pad tokens (weights) are applied in the
  graph from the masks; complex RoPE runs as real arithmetic on interleaved pairs.

Layout of the exported graph (the dynamic dims are batch, image_tokens, text_len):
  img_tokens  (batch, image_tokens, p*p*pf*C)  patchified latents; rows past the image are pad-to-32
  img_pad     (image_tokens,) bool               True on pad-to-32 rows (-> x_pad_token)
  timestep    (batch,) float32                   as the pipeline passes it, (1000 - t) / 1000
  cap_feats   (batch, text_len, cap_feat_dim)    captions, each padded at its end with zeros
  cap_pad     (batch, text_len) bool             True on each caption's pad-to-32 rows (-> cap_pad_token)
  cap_mask    (batch, text_len) bool             True on rows that are keys (the caption padded to 32)
  img_rope    (batch, image_tokens, hd/2, 2) f32 (cos, sin) per image token (depends on caption length)
  cap_rope    (text_len, hd/2, 2) f32            (cos, sin) per caption position (same for every sample)
  -> sample_tokens (batch, image_tokens, p*p*pf*C): the prediction in patch layout, pad rows zeroed;
     the stand-in unpatchifies it on the host (a view and a permute).

Point mapping: point.text_len = the caption tokens the transformer sees = the longest caption of
the batch rounded up to a multiple of 32 (512 max in the pipeline); image_tokens =
ceil32((height / 16) * (width / 16)).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ..base import ComponentSpec, Engine, Point, ReferenceCase, TensorSpec

if TYPE_CHECKING:  # torch is heavy; keep the module importable by the server's pure parts
    import torch

SEQ_MULTI_OF = 32  # the model pads image and caption sequences to this (diffusers SEQ_MULTI_OF)
VAE_FACTOR = 8  # pixels per latent cell

INPUTS = ("img_tokens", "img_pad", "timestep", "cap_feats", "cap_pad", "cap_mask", "img_rope", "cap_rope")
OUTPUT = "sample_tokens"


def _ceil(n: int, m: int = SEQ_MULTI_OF) -> int:
    return -(-n // m) * m


def image_tokens(point: Point, patch_size: int = 2) -> int:
    """Image tokens the transformer sees at `point` (patches, padded to a multiple of 32)."""
    cell = VAE_FACTOR * patch_size
    return _ceil((point.height // cell) * (point.width // cell))


# ---------------------------------------------------------------------------------------------
# Host side: prep (no weights)


class ZImagePrep:
    """Turns the pipeline's call (lists of latents and caption features, a timestep tensor)
    into the wrapper's tensors, and the wrapper's output back into the pipeline's list.

    Built from the transformer config alone; uses the model's weights-free helpers
    (RopeEmbedder, create_coordinate_grid) so positions follow the original exactly.
    """

    def __init__(self, config: Mapping[str, Any], cache_size: int = 32) -> None:
        from diffusers.models.transformers.transformer_z_image import RopeEmbedder

        self.patch = int(config["all_patch_size"][0])
        self.f_patch = int(config["all_f_patch_size"][0])
        self.channels = int(config["in_channels"])
        self.rope = RopeEmbedder(
            theta=config["rope_theta"], axes_dims=list(config["axes_dims"]), axes_lens=list(config["axes_lens"])
        )
        # Keyed by (latent size, caption lengths, device): a serving loop repeats these every step.
        self.layout = functools.lru_cache(maxsize=cache_size)(self._layout)

    # -- patch layout ------------------------------------------------------------------------
    def grid(self, size: Sequence[int]) -> tuple[int, int, int]:
        f, h, w = size
        return f // self.f_patch, h // self.patch, w // self.patch

    def patchify(self, images: "torch.Tensor") -> "torch.Tensor":
        """(B, C, F, H, W) -> (B, F_t*H_t*W_t, pf*p*p*C), the token order of the original."""
        b, c, f, h, w = images.shape
        ft, ht, wt = self.grid((f, h, w))
        p, pf = self.patch, self.f_patch
        x = images.reshape(b, c, ft, pf, ht, p, wt, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, ft * ht * wt, pf * p * p * c)

    def unpatchify(self, tokens: "torch.Tensor", size: Sequence[int]) -> "torch.Tensor":
        """(B, >=n, pf*p*p*C) -> (B, C, F, H, W); rows past the image (padding) are dropped."""
        f, h, w = size
        ft, ht, wt = self.grid(size)
        p, pf, c = self.patch, self.f_patch, self.channels
        b = tokens.shape[0]
        x = tokens[:, : ft * ht * wt].reshape(b, ft, ht, wt, pf, p, p, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f, h, w)

    # -- cached part: masks and RoPE -----------------------------------------------------------
    def _rope_table(self, ids: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.view_as_real(self.rope(ids)).contiguous()  # complex (N, hd/2) -> (N, hd/2, 2) f32

    def _layout(self, size: tuple[int, int, int], cap_lens: tuple[int, ...], device: Any) -> dict[str, Any]:
        import torch
        from diffusers.models.transformers.transformer_z_image import (
            ZImageTransformer2DModel,
        )

        grid_fn = ZImageTransformer2DModel.create_coordinate_grid
        ft, ht, wt = self.grid(size)
        n_img = ft * ht * wt
        n_tok = _ceil(n_img)
        padded = [_ceil(n) for n in cap_lens]
        text_len = max(padded)

        pos = torch.arange(text_len)
        lens = torch.tensor(cap_lens)[:, None]
        lens32 = torch.tensor(padded)[:, None]
        # Caption ids: (1 + k, 0, 0); the same table for every sample (only the valid prefix is used).
        cap_rope = self._rope_table(grid_fn((text_len, 1, 1), (1, 0, 0)).flatten(0, 2))
        # Image ids start after the sample's padded caption on axis 0; pad rows get (0, 0, 0).
        img_rope = {}
        for n in sorted(set(padded)):
            ids = grid_fn((ft, ht, wt), (n + 1, 0, 0)).flatten(0, 2)
            ids = torch.cat([ids, torch.zeros((n_tok - n_img, 3), dtype=ids.dtype)])
            img_rope[n] = self._rope_table(ids)
        out = {
            "img_pad": torch.arange(n_tok) >= n_img,
            "cap_pad": (pos[None] >= lens) & (pos[None] < lens32),
            "cap_mask": pos[None] < lens32,
            "img_rope": torch.stack([img_rope[n] for n in padded]),
            "cap_rope": cap_rope,
        }
        return {k: v.to(device) for k, v in out.items()}

    # -- per call ------------------------------------------------------------------------------
    def __call__(
        self,
        x: Sequence["torch.Tensor"],
        t: "torch.Tensor",
        cap_feats: Sequence["torch.Tensor"],
        dtype: "torch.dtype | None" = None,
    ) -> dict[str, "torch.Tensor"]:
        """x: per-sample latents (C, F, H, W), all one size; t: (B,) or scalar; cap_feats:
        per-sample (L_i, cap_feat_dim). Returns the wrapper inputs by name."""
        import torch

        if len(x) != len(cap_feats):
            raise ValueError(f"{len(x)} latents but {len(cap_feats)} captions")
        size = tuple(x[0].shape[1:])
        if any(tuple(xi.shape[1:]) != size for xi in x):
            raise ValueError("Z-Image engine batches need one latent size for every sample")
        dtype = dtype or x[0].dtype
        device = x[0].device
        cap_lens = tuple(int(c.shape[0]) for c in cap_feats)
        feeds = dict(self.layout(size, cap_lens, device))

        tokens = self.patchify(torch.stack(list(x)).to(dtype))
        n_tok = feeds["img_pad"].shape[0]
        feeds["img_tokens"] = torch.nn.functional.pad(tokens, (0, 0, 0, n_tok - tokens.shape[1]))
        text_len = feeds["cap_mask"].shape[1]
        caps = torch.zeros((len(cap_feats), text_len, cap_feats[0].shape[-1]), dtype=dtype, device=device)
        for i, c in enumerate(cap_feats):
            caps[i, : c.shape[0]] = c.to(device=device, dtype=dtype)
        feeds["cap_feats"] = caps
        t = torch.as_tensor(t, device=device).float().reshape(-1)
        feeds["timestep"] = t.expand(len(x)).contiguous() if t.numel() == 1 else t
        return {name: feeds[name] for name in INPUTS}


# ---------------------------------------------------------------------------------------------
# Exported side: the wrapper


def _apply_rope(x: "torch.Tensor", rope: "torch.Tensor") -> "torch.Tensor":
    """x * freqs_cis on interleaved (re, im) pairs, with freqs as real (cos, sin):
    (xr + i xi)(cos + i sin) = (xr cos - xi sin) + i (xr sin + xi cos). x: (B, N, H, D);
    rope: (B, N, D/2, 2). fp32 like the original."""
    import torch

    xf = x.float().unflatten(-1, (-1, 2))
    xr, xi = xf[..., 0], xf[..., 1]
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(3)
    return out.type_as(x)


class RealRopeAttnProcessor:
    """ZSingleStreamAttnProcessor with real RoPE: same submodules (to_q/k/v, norms, to_out),
    plain SDPA with a boolean key mask."""

    def __call__(
        self,
        attn: Any,
        hidden_states: "torch.Tensor",
        encoder_hidden_states: "torch.Tensor | None" = None,
        attention_mask: "torch.Tensor | None" = None,
        freqs_cis: "torch.Tensor | None" = None,
    ) -> "torch.Tensor":
        import torch.nn.functional as F

        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = _apply_rope(q, freqs_cis), _apply_rope(k, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask
        ).transpose(1, 2)
        out = attn.to_out[0](out.flatten(2, 3).to(q.dtype))
        if len(attn.to_out) > 1:  # dropout
            out = attn.to_out[1](out)
        return out


def _wrapper(model: Any) -> Any:
    import torch

    class ZImageTransformerGraph(torch.nn.Module):
        """Tensor-only forward over the model's own submodules; only the top-level loop of
        ZImageTransformer2DModel.forward is rewritten (basic mode: one image per sample)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            key = f"{model.config.all_patch_size[0]}-{model.config.all_f_patch_size[0]}"
            self.x_embedder = model.all_x_embedder[key]
            self.final_layer = model.all_final_layer[key]

        @contextlib.contextmanager
        def _real_rope(self) -> Iterator[None]:
            # Swap the processors only for this call, so the original model keeps its own.
            m = self.model
            attns = [blk.attention for blk in (*m.noise_refiner, *m.context_refiner, *m.layers)]
            saved = [a.processor for a in attns]
            real = RealRopeAttnProcessor()
            try:
                for a in attns:
                    a.processor = real
                yield
            finally:
                for a, p in zip(attns, saved):
                    a.processor = p

        def forward(
            self,
            img_tokens: torch.Tensor,
            img_pad: torch.Tensor,
            timestep: torch.Tensor,
            cap_feats: torch.Tensor,
            cap_pad: torch.Tensor,
            cap_mask: torch.Tensor,
            img_rope: torch.Tensor,
            cap_rope: torch.Tensor,
        ) -> torch.Tensor:
            m = self.model
            with self._real_rope():
                # The pipeline passes (1000 - t) / 1000; the model scales by t_scale itself.
                adaln = m.t_embedder(timestep * m.t_scale).type_as(img_tokens)

                x = self.x_embedder(img_tokens)
                x = torch.where(img_pad[None, :, None], m.x_pad_token, x)
                for layer in m.noise_refiner:  # every sample has the same image length: no mask
                    x = layer(x, None, img_rope, adaln)

                cap_rope = cap_rope.unsqueeze(0).expand(cap_feats.shape[0], -1, -1, -1)
                c = m.cap_embedder(cap_feats)
                c = torch.where(cap_pad[..., None], m.cap_pad_token, c)
                for layer in m.context_refiner:
                    c = layer(c, cap_mask, cap_rope)

                # [image | caption] per sample; batch padding sits at the end of each caption.
                n_img = x.shape[1]
                img_keys = torch.ones_like(img_pad).unsqueeze(0).expand(x.shape[0], -1)
                u = torch.cat([x, c], dim=1)
                mask = torch.cat([img_keys, cap_mask], dim=1)
                rope = torch.cat([img_rope, cap_rope], dim=1)
                for layer in m.layers:
                    u = layer(u, mask, rope, adaln)
                u = self.final_layer(u[:, :n_img], c=adaln)
            # Pad rows carry no prediction: zero them so the output is fully defined.
            return torch.where(img_pad[None, :, None], torch.zeros_like(u), u)

    return ZImageTransformerGraph(model)


# ---------------------------------------------------------------------------------------------
# Validation target


def caption_lengths(batch: int, text_len: int) -> list[int]:
    """Distinct caption lengths for a reference batch: the first fills `text_len` (after padding
    to 32); the others end in different 32-blocks where there are several, so the batch has
    both pad-to-32 rows and batch padding."""
    if text_len % SEQ_MULTI_OF:
        raise ValueError(f"text_len {text_len} is not a multiple of {SEQ_MULTI_OF}")
    blocks = text_len // SEQ_MULTI_OF
    return [(blocks - i % blocks) * SEQ_MULTI_OF - (5 + 7 * i) % SEQ_MULTI_OF for i in range(batch)]


def _reference_case(module: Any, point: Point, dtype: Any, generator: Any) -> ReferenceCase:
    import torch

    cfg = module.config
    prep = ZImagePrep(cfg)
    h, w = point.height // VAE_FACTOR, point.width // VAE_FACTOR
    latents = [torch.randn((cfg.in_channels, 1, h, w), generator=generator).to(dtype) for _ in range(point.batch)]
    t = torch.rand((point.batch,), generator=generator)  # per-sample t: stricter than the pipeline
    caps = [
        torch.randn((n, cfg.cap_feat_dim), generator=generator).to(dtype)
        for n in caption_lengths(point.batch, point.text_len)
    ]
    with torch.no_grad():
        out = module(list(latents), t, list(caps), return_dict=False)[0]
    inputs = prep(latents, t, caps, dtype=dtype)
    expected = torch.zeros_like(inputs["img_tokens"])
    tokens = prep.patchify(torch.stack(out))
    expected[:, : tokens.shape[1]] = tokens
    return ReferenceCase(inputs=inputs, expected={OUTPUT: expected})


# ---------------------------------------------------------------------------------------------
# Stand-in for the pipeline


def _standin(config: Mapping[str, Any], engine: Engine) -> Any:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from ..standin import EngineStandIn

    class ZImageTransformerStandIn(EngineStandIn):
        """Answers ZImagePipeline's `transformer(x_list, t, cap_list, return_dict=False)[0]`
        (a list of (C, 1, H, W)) from an engine; no weights. Cast with .to(dtype) to the
        engine's compute dtype."""

        def __init__(self) -> None:
            super().__init__(config, engine)
            self.in_channels = self.out_channels = int(config["in_channels"])
            self.prep = ZImagePrep(config)

        def forward(
            self,
            x: list[torch.Tensor],
            t: torch.Tensor,
            cap_feats: list[torch.Tensor],
            return_dict: bool = True,
            controlnet_block_samples: Any = None,
            siglip_feats: Any = None,
            image_noise_mask: Any = None,
            patch_size: int = 2,
            f_patch_size: int = 1,
            joint_attention_kwargs: Any = None,
        ) -> Any:
            if isinstance(x[0], list) or siglip_feats is not None or image_noise_mask is not None:
                raise NotImplementedError("the Z-Image engine covers basic mode only (no omni / SigLIP)")
            if controlnet_block_samples is not None:
                raise NotImplementedError("the Z-Image engine has no ControlNet inputs")
            if (patch_size, f_patch_size) != (self.prep.patch, self.prep.f_patch):
                raise ValueError(f"engine exported for patch {self.prep.patch}-{self.prep.f_patch}")
            feeds = self.prep(x, t, cap_feats, dtype=self.dtype)
            tokens = self.engine(feeds)[OUTPUT]
            out = list(self.prep.unpatchify(tokens, tuple(x[0].shape[1:])).unbind(0))
            return (out,) if not return_dict else Transformer2DModelOutput(sample=out)

    return ZImageTransformerStandIn()


# ---------------------------------------------------------------------------------------------


# Z-Image-Turbo's config: the static feature dims of the shapes unless a checkpoint's config is given.
REAL_CONFIG: dict[str, Any] = {
    "in_channels": 16,
    "cap_feat_dim": 2560,
    "axes_dims": [32, 48, 48],
    "all_patch_size": [2],
    "all_f_patch_size": [1],
}


def transformer_spec(config: Mapping[str, Any] | None = None) -> ComponentSpec:
    """The transformer component. `config` fixes the static feature dims of the shapes (profiles,
    range checks); None means Z-Image-Turbo. The dynamic dims come from the Point."""
    cfg = {**REAL_CONFIG, **{k: v for k, v in (config or {}).items() if k in REAL_CONFIG}}
    patch_size, f_patch_size = int(cfg["all_patch_size"][0]), int(cfg["all_f_patch_size"][0])
    patch_dim = f_patch_size * patch_size * patch_size * int(cfg["in_channels"])
    cap_feat_dim = int(cfg["cap_feat_dim"])
    half = sum(cfg["axes_dims"]) // 2

    def img(p: Point) -> int:
        return image_tokens(p, patch_size)

    b, n, t = "batch", "image_tokens", "text_len"
    inputs = (
        TensorSpec("img_tokens", lambda p: (p.batch, img(p), patch_dim), {0: b, 1: n}),
        TensorSpec("img_pad", lambda p: (img(p),), {0: n}, dtype="bool"),
        TensorSpec("timestep", lambda p: (p.batch,), {0: b}, dtype="float32"),
        TensorSpec("cap_feats", lambda p: (p.batch, p.text_len, cap_feat_dim), {0: b, 1: t}),
        TensorSpec("cap_pad", lambda p: (p.batch, p.text_len), {0: b, 1: t}, dtype="bool"),
        TensorSpec("cap_mask", lambda p: (p.batch, p.text_len), {0: b, 1: t}, dtype="bool"),
        TensorSpec("img_rope", lambda p: (p.batch, img(p), half, 2), {0: b, 1: n}, dtype="float32"),
        TensorSpec("cap_rope", lambda p: (p.text_len, half, 2), {0: t}, dtype="float32"),
    )
    assert tuple(i.name for i in inputs) == INPUTS
    return ComponentSpec(
        name="transformer",
        pipeline_attr="transformer",
        inputs=inputs,
        outputs=(TensorSpec(OUTPUT, lambda p: (p.batch, img(p), patch_dim), {0: b, 1: n}),),
        wrapper=_wrapper,
        reference_case=_reference_case,
        standin=_standin,
    )
