"""The stand-ins' shared prep cache (reused while hot, bounded for a long-running server), and the
VAE stand-in that answers both decode and encode."""

import pytest
import torch

from omni_trt.errors import ComponentNotBuilt
from omni_trt.models import FAMILIES
from omni_trt.models.base import Point
from omni_trt.models.standin import PrepCache


def test_prep_cache_reuses_and_evicts_the_least_recently_used():
    made = []
    cache = PrepCache(size=2)

    def make(key):
        return lambda: made.append(key) or f"tables-{key}"

    assert cache.get("a", make("a")) == "tables-a"
    assert cache.get("b", make("b")) == "tables-b"
    assert cache.get("a", make("a")) == "tables-a"  # hit: nothing made
    cache.get("c", make("c"))  # evicts b, the least recently used
    assert len(cache) == 2 and made == ["a", "b", "c"]
    cache.get("a", make("a"))
    cache.get("b", make("b"))
    assert made == ["a", "b", "c", "b"]


# ---- the VAE stand-in: decoder and encoder engines behind one `vae` ----


class _Fixed:
    """An engine that returns fixed tensors and records what it was fed."""

    def __init__(self, **outputs):
        self.outputs, self.fed = outputs, []
        self.output_names = tuple(outputs)

    def __call__(self, feeds):
        self.fed.append({k: tuple(v.shape) for k, v in feeds.items()})
        return dict(self.outputs)


QWEN_VAE = {"z_dim": 4, "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
AKL_VAE = {"latent_channels": 4, "scaling_factor": 0.5, "shift_factor": 0.1, "block_out_channels": [8, 8, 8, 8]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_vae_standin_answers_decode_and_encode(family):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    fam = FAMILIES[family]
    # Shapes from the spec (Qwen-Image's have a frame axis), at 4 latent channels.
    point = Point(2, 24, 40, 1)
    image, spec_latent = fam.components["vae_encoder"].shapes(point)["image"], fam.components["vae_decoder"].shapes(point)["latent"]
    latent = (spec_latent[0], 4, *spec_latent[2:])
    mean, logvar = torch.randn(latent), torch.full(latent, -2.0)
    decoder, encoder = _Fixed(image=torch.zeros(image)), _Fixed(mean=mean, logvar=logvar)
    config = QWEN_VAE if len(image) == 5 else AKL_VAE
    standins = fam.standins({"vae": config}, {"vae_decoder": decoder, "vae_encoder": encoder})
    assert list(standins) == ["vae"]  # both components, one module for the pipeline's `vae`
    vae = standins["vae"]
    x = torch.zeros(image)
    dist = vae.encode(x).latent_dist
    assert isinstance(dist, DiagonalGaussianDistribution) and torch.equal(dist.mode(), mean)
    sampled = dist.sample(torch.Generator().manual_seed(0))
    want = mean + torch.exp(0.5 * logvar) * torch.randn(latent, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sampled, want)  # the pipeline's generator draws the noise, on the host
    assert isinstance(vae.encode(x, return_dict=False)[0], DiagonalGaussianDistribution)
    # SD3's inpaint pipeline passes a generator to decode, as AutoencoderKL.decode takes one.
    assert vae.decode(torch.zeros(latent), return_dict=False, generator=None)[0].shape == x.shape
    assert vae.decode(torch.zeros(latent)).sample.shape == x.shape
    assert encoder.fed == [{"image": x.shape}] * 2 and decoder.fed == [{"latent": latent}] * 2
    if len(image) == 5:  # a frame axis: one frame only
        with pytest.raises(ValueError, match="one frame"):
            vae.encode(torch.zeros(2, 3, 2, 24, 40))


def test_vae_standin_without_encoder_says_what_to_build_and_keeps_its_dtype():
    vae = FAMILIES["flux"].standins({"vae": AKL_VAE}, {"vae_decoder": _Fixed(image=torch.zeros(1))})["vae"]
    with pytest.raises(ComponentNotBuilt, match="omni build-engine MODEL --engine-dir DIR --components vae_encoder") as e:
        vae.encode(torch.zeros(1, 3, 8, 8))
    assert e.value.status == 501
    # An engine's precision is fixed when it is built: from_pipe's .to(dtype) must not change it.
    vae.with_dtype(torch.bfloat16)
    assert vae.to(torch.float32).dtype == torch.bfloat16 and vae.to("cpu", torch.float16).dtype == torch.bfloat16
    assert vae.to(device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="run inside the stand-in of vae_decoder"):
        FAMILIES["flux"].standins({"vae": AKL_VAE}, {"vae_encoder": _Fixed()})
