"""LatentCodec over a tiny Flux-architecture AutoencoderKL: normalisation against diffusers' own
encode/decode formulas, mixed sizes, frozen state, and tiled decoding."""

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


def _conv_only(vae: nn.Module) -> nn.Module:
    """The tiny Flux VAE with its GroupNorms and mid-block attention taken out of the decoder: what is
    left (conv_in, resnets, upsamplers, conv_out) makes each pixel depend on a bounded neighbourhood of
    latents (its receptive field) and on nothing global, so a tiled decode can match the untiled one."""
    for module in list(vae.decoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())
    vae.decoder.mid_block.attentions = nn.ModuleList([None])
    return vae


def test_tiled_decode_matches_untiled_decode_of_a_conv_decoder(vae_dir):
    from diffusers import AutoencoderKL

    vae = _conv_only(AutoencoderKL.from_pretrained(vae_dir))
    plain = {"path": "unused", "scaling_factor": 1.0, "shift_factor": 0.0}
    full_codec = LatentCodec(VAEConfig(**plain), vae=vae)
    # 16-latent tiles overlapping by 6: 3 rows (the last one clamped to the bottom) x 2 columns
    tiled_codec = LatentCodec(VAEConfig(**plain, tile_decode_pixels=0, tile_latent=16, tile_overlap=6), vae=vae)
    z = torch.randn(16, 28, 22, generator=torch.Generator().manual_seed(0))
    full, tiled = full_codec.decode([z])[0], tiled_codec.decode([z])[0]
    assert tiled.shape == full.shape == (3, 224, 176)
    # A tile's pixels within the receptive field of its inner edges see zero padding instead of the
    # neighbouring latents; the linear ramps give exactly those pixels little weight. Measured: 4-5% of
    # the image's peak with the right ramps, 45-55% with flat ramps (ones), 10-12% with sqrt(ramp).
    # (Sharper ramps such as ramp**5 come out closer still: with no global statistics the seam may
    # be anywhere in the overlap; the ramp shape itself is pinned by the test below.)
    err = (tiled - full).abs().max() / full.abs().max()
    assert err < 0.075, f"tiled decode differs from the untiled one by {err:.1%} of the peak"


def test_tiled_decode_blends_overlaps_with_linear_ramps(vae_dir):
    """With GroupNorm and attention (the real architecture) every tile decodes differently from its
    neighbours over their whole overlap, so the blend weights show in the output: each overlap pixel
    must be the linear cross-fade of the two tiles, written here from the rule itself."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    cfg = VAEConfig(path="unused", scaling_factor=1.0, shift_factor=0.0, tile_decode_pixels=0, tile_latent=12,
                    tile_overlap=4)
    z = torch.randn(16, 20, 20, generator=torch.Generator().manual_seed(3))
    tiled = LatentCodec(cfg, vae=vae).decode([z])[0]  # (3, 160, 160)
    # 2 x 2 tiles of 12 latents at latent offsets 0 and 8: pixels 0-95 and 64-159, overlapping on 64-95
    with torch.no_grad():
        tiles = {(r, c): vae.decode(z[None, :, r : r + 12, c : c + 12]).sample[0] for r in (0, 8) for c in (0, 8)}
    fade = 1 - (torch.arange(32) + 0.5) / 32  # first tile's weight across the 32 overlap pixels, 1 -> 0
    first = torch.cat([torch.ones(64), fade, torch.zeros(64)])  # (160,) weight of the tile at offset 0
    axis = {0: first, 8: 1 - first}  # linear ramps sum to 1: no renormalisation needed
    expected = torch.zeros(3, 160, 160)
    for (r, c), img in tiles.items():
        weight = axis[r][:, None] * axis[c][None, :]  # (160, 160)
        expected[:, r * 8 : r * 8 + 96, c * 8 : c * 8 + 96] += img * weight[r * 8 : r * 8 + 96, c * 8 : c * 8 + 96]
    # positive control: the tiles disagree on the overlap, so wrong weights cannot go unseen
    assert (tiles[0, 0][:, 64:96] - tiles[8, 0][:, :32]).abs().mean() > 0.01
    torch.testing.assert_close(tiled, expected.clamp(-1, 1), atol=1e-5, rtol=0)


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
