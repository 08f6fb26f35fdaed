"""LatentCodec over a tiny Flux-architecture AutoencoderKL: normalisation against diffusers' own
encode/decode formulas, mixed sizes, frozen state, and tiled decoding."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lumina_illus.config import ConfigError, from_dict
from lumina_illus.models.tiny import make_tiny_flux_vae
from lumina_illus.models.vae import LatentCodec, VAEConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_flux_vae(tmp_path_factory.mktemp("vae"))


def test_tiny_vae_has_flux_architecture(vae_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert vae.config.latent_channels == 16
    assert vae.config.use_quant_conv is False and vae.config.use_post_quant_conv is False
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    # deterministic by seed
    again = AutoencoderKL.from_pretrained(make_tiny_flux_vae(vae_dir.parent / "again"))
    for a, b in zip(vae.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_encode_decode_match_diffusers_formulas(vae_dir):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(vae_dir).eval()
    codec = LatentCodec(VAEConfig(path=str(vae_dir)))
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 32, 48, generator=g) * 2 - 1, torch.rand(3, 64, 32, generator=g) * 2 - 1]
    lat = codec.encode(imgs)
    assert [tuple(z.shape) for z in lat] == [(16, 4, 6), (16, 8, 4)]
    with torch.no_grad():
        for img, z in zip(imgs, lat):
            mean = ref.encode(img[None]).latent_dist.mean[0]
            assert torch.allclose(z, (mean - 0.1159) * 0.3611, atol=1e-6)
            # what Lumina2Pipeline does before decoding: latents / scaling_factor + shift_factor
            expected = ref.decode(z[None] / 0.3611 + 0.1159).sample[0].clamp(-1, 1)
            assert torch.allclose(codec.decode([z])[0], expected, atol=1e-6)


def test_sdxl_normalisation_and_posterior_sampling(vae_dir):
    codec = LatentCodec(VAEConfig(path=str(vae_dir), scaling_factor=0.13025, shift_factor=0.0))
    sampled = LatentCodec(VAEConfig(path=str(vae_dir), sample_posterior=True))
    img = torch.zeros(3, 16, 16)
    z = codec.encode([img])[0]
    flux_z = sampled.encode([img], torch.Generator().manual_seed(0))[0]
    assert not torch.allclose(flux_z, (z / 0.13025 - 0.1159) * 0.3611)  # a sample, not the mean
    again = sampled.encode([img], torch.Generator().manual_seed(0))[0]
    assert torch.equal(flux_z, again)


def test_codec_is_frozen(vae_dir):
    codec = LatentCodec(VAEConfig(path=str(vae_dir)))
    codec.train()
    assert not codec.vae.training
    assert not any(p.requires_grad for p in codec.parameters())
    img = torch.zeros(3, 16, 16, requires_grad=True)
    assert not codec.encode([img])[0].requires_grad


def test_bad_inputs_and_paths_give_clear_errors(vae_dir, tmp_path):
    codec = LatentCodec(VAEConfig(path=str(vae_dir)))
    with pytest.raises(ValueError, match="image 0 size .* not a multiple of 8"):
        codec.encode([torch.zeros(3, 20, 16)])
    with pytest.raises(ValueError, match=r"must be \(3, H, W\)"):
        codec.encode([torch.zeros(1, 3, 16, 16)])
    with pytest.raises(FileNotFoundError, match="vae.path: .* has no config.json"):
        LatentCodec(VAEConfig(path=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.vae.*dtype"):
        from_dict(VAEConfig, {"dtype": "fp8"}, where="run.yaml", prefix="model.vae.")


class _LocalDecoder(nn.Module):
    """A decoder whose output pixel depends only on its own latent pixel: tiling must be exact."""

    config = SimpleNamespace(block_out_channels=(1, 1, 1, 1), latent_channels=4)

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        img = torch.einsum("oc,bchw->bohw", self.w, z).tanh()  # (B, 3, h, w)
        return SimpleNamespace(sample=img.repeat_interleave(8, -2).repeat_interleave(8, -1))


def test_tiled_decode_blends_tiles_exactly():
    cfg = VAEConfig(path="unused", scaling_factor=1.0, shift_factor=0.0, tile_decode_pixels=0, tile_latent=8, tile_overlap=2)
    codec = LatentCodec(cfg, vae=_LocalDecoder())
    z = torch.randn(4, 21, 13, generator=torch.Generator().manual_seed(0))  # not a multiple of the tile
    tiled = codec.decode([z])[0]
    full = codec.vae.decode(z[None]).sample[0].clamp(-1, 1)
    assert tiled.shape == (3, 168, 104)
    assert torch.allclose(tiled, full, atol=1e-5)


def test_tiled_decode_equals_full_decode_when_one_tile_covers_image(vae_dir):
    full = LatentCodec(VAEConfig(path=str(vae_dir)))
    tiled = LatentCodec(VAEConfig(path=str(vae_dir), tile_decode_pixels=0, tile_latent=8, tile_overlap=2))
    z = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(tiled.decode([z])[0], full.decode([z])[0], atol=1e-5)


def test_bf16_codec_returns_fp32_latents_close_to_fp32(vae_dir):
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    full = LatentCodec(VAEConfig(path=str(vae_dir))).encode([img])[0]
    half = LatentCodec(VAEConfig(path=str(vae_dir), dtype="bf16"))
    assert next(half.vae.parameters()).dtype == torch.bfloat16
    z = half.encode([img])[0]
    assert z.dtype == torch.float32 and (z - full).abs().max() < 0.05 * full.abs().max()
    assert half.decode([z])[0].dtype == torch.float32
