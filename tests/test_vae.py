"""Autoencoders: the Wan VAE wrapper (tiny random AutoencoderKLWan) and the ShapeWorld pixel (un)shuffle."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from PIL import Image, ImageDraw

from duetgen.models.vae import (
    PixelShuffleAE,
    PixelShuffleConfig,
    WanImageVAE,
    tiny_wan_vae_config,
    uint8_to_unit,
    unit_to_uint8,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def wan() -> WanImageVAE:
    torch.manual_seed(0)
    return WanImageVAE(AutoencoderKLWan(**tiny_wan_vae_config()).eval())


def random_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- Wan VAE


def test_wan_shapes_and_interface(wan):
    images = random_images(2, 16, 24)
    latents = wan.encode(images)
    assert wan.spatial_factor == 2 and wan.latent_channels == 4
    assert latents.shape == (2, 4, 8, 12) and latents.dtype == torch.float32
    decoded = wan.decode(latents)
    assert decoded.shape == (2, 3, 16, 24)
    assert decoded.min() >= -1 and decoded.max() <= 1  # the Wan decoder clamps to the image range


def test_wan_normalisation_is_the_pipelines_and_inverts(wan):
    """encode = (mode - latents_mean) / latents_std; decode undoes it before the raw decoder."""
    images = random_images(2, 16, 16, seed=1)
    config = wan.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
    with torch.no_grad():
        raw = wan.vae.encode(images.unsqueeze(2)).latent_dist.mode().squeeze(2)  # (B, z, h, w)
        expected = (raw - mean) / std
        latents = wan.encode(images)
        torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
        # The normalisation is not the identity for this config, so this checks a real inverse:
        assert (latents - raw).abs().max() > 0.1
        raw_decoded = wan.vae.decode(raw.unsqueeze(2)).sample.squeeze(2)
        torch.testing.assert_close(wan.decode(latents), raw_decoded, rtol=1e-5, atol=1e-5)
        # And de-normalisation recovers exactly the raw latents the decoder receives.
        torch.testing.assert_close(latents * std + mean, raw, rtol=1e-5, atol=1e-6)


def test_wan_images_are_independent_frames(wan):
    """A batch encodes each image on its own (one-frame videos): same as encoding one at a time."""
    images = random_images(3, 16, 16, seed=2)
    together = wan.encode(images)
    alone = torch.cat([wan.encode(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_wan_mixed_sizes_grouped_in_order(wan):
    sizes = [(16, 16), (8, 24), (16, 16), (24, 8), (8, 24)]
    images = [random_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    wan.max_batch = 1  # exercise chunking as well as grouping
    try:
        latents = wan.encode_list(images)
    finally:
        wan.max_batch = 16
    assert [tuple(z.shape) for z in latents] == [(4, h // 2, w // 2) for h, w in sizes]
    for image, z in zip(images, latents):
        torch.testing.assert_close(z, wan.encode(image[None])[0], rtol=1e-5, atol=1e-5)
    decoded = wan.decode_list(latents)
    assert [tuple(x.shape) for x in decoded] == [(3, h, w) for h, w in sizes]


def test_wan_bad_inputs_named(wan):
    with pytest.raises(ValueError, match="not a multiple"):
        wan.encode(random_images(1, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        wan.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4"):
        wan.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="scale_factor_spatial"):
        WanImageVAE(AutoencoderKLWan(**{**tiny_wan_vae_config(), "scale_factor_spatial": 8}))
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        WanImageVAE(torch.nn.Linear(2, 2))


def test_wan_from_pretrained_local_safetensors(wan, tmp_path):
    wan.vae.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=True)
    assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = WanImageVAE.from_pretrained(tmp_path / "pipe", subfolder="vae")
    images = random_images(1, 16, 16, seed=3)
    torch.testing.assert_close(loaded.encode(images), wan.encode(images))
    with pytest.raises(FileNotFoundError, match="no Wan VAE"):
        WanImageVAE.from_pretrained(tmp_path / "missing")


# ----------------------------------------------------------------------------- ShapeWorld pixel autoencoder

COLOURS = [(220, 40, 40), (40, 170, 70), (40, 90, 220), (235, 200, 40), (150, 70, 190), (245, 140, 30)]


def shapeworld_canvas(seed: int) -> torch.Tensor:
    """A canvas drawn as DESIGN section 9 says (white 64x64, PIL shapes without anti-aliasing), (3, 64, 64) uint8."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cells = torch.randperm(9, generator=g)[:4].tolist()
    for k, cell in enumerate(cells):
        cx, cy = (12, 32, 52)[cell % 3], (12, 32, 52)[cell // 3]
        colour = COLOURS[(seed + k) % 6]
        kind = (seed + 2 * k) % 3
        if kind == 0:
            draw.ellipse([cx - 7, cy - 7, cx + 7, cy + 7], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - 7, cy - 7, cx + 7, cy + 7], fill=colour)
        else:
            draw.polygon([(cx, cy - 7), (cx - 7, cy + 7), (cx + 7, cy + 7)], fill=colour)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(64, 64, 3).permute(2, 0, 1)


@pytest.mark.parametrize("config", [PixelShuffleConfig(), PixelShuffleConfig(factor=2, shift=0.8, scale=2.5)])
def test_pixel_shuffle_round_trip_is_bit_exact(config):
    canvases = torch.stack([shapeworld_canvas(s) for s in range(6)])  # (6, 3, 64, 64) uint8
    assert len(torch.unique(canvases)) > 5  # real colours, not a blank canvas
    ae = PixelShuffleAE(config)
    latents = ae.encode(uint8_to_unit(canvases))
    f = config.factor
    assert latents.shape == (6, 3 * f * f, 64 // f, 64 // f)
    assert torch.equal(unit_to_uint8(ae.decode(latents)), canvases)


def test_pixel_shuffle_layout_and_affine():
    """latent[c * f^2 + dy * f + dx, y, x] = (pixel[c, f y + dy, f x + dx] - shift) * scale."""
    ae = PixelShuffleAE(PixelShuffleConfig(factor=4, shift=0.5, scale=2.0))
    images = random_images(2, 64, 64, seed=4)
    latents = ae.encode(images)
    assert (ae.latent_channels, ae.spatial_factor) == (48, 4)
    for b, c, dy, dx, y, x in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 15, 7), (0, 1, 2, 3, 5, 11)]:
        expected = (images[b, c, 4 * y + dy, 4 * x + dx] - 0.5) * 2.0
        assert latents[b, c * 16 + dy * 4 + dx, y, x] == pytest.approx(expected.item(), abs=1e-6)


def test_pixel_shuffle_default_latent_range_and_errors():
    ae = PixelShuffleAE()
    latents = ae.encode(uint8_to_unit(shapeworld_canvas(0)[None]))
    assert latents.min() >= -1 and latents.max() <= 1  # identity affine: latents are pixels in [-1, 1]
    mixed = ae.encode_list([uint8_to_unit(shapeworld_canvas(1)), torch.zeros(3, 32, 16)])
    assert [tuple(z.shape) for z in mixed] == [(48, 16, 16), (48, 8, 4)]
    with pytest.raises(ValueError, match="not a multiple"):
        ae.encode(torch.zeros(1, 3, 62, 64))
    with pytest.raises(ValueError, match="non-zero"):
        PixelShuffleAE(PixelShuffleConfig(scale=0.0))
    with pytest.raises(ValueError, match="uint8"):
        uint8_to_unit(torch.zeros(1, 3, 4, 4))
