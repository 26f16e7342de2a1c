"""Image autoencoders: the Wan2.1 VAE for real images, a parameter-free pixel (un)shuffle for ShapeWorld.

Both share one small interface, so the DiT, the trainer and the inference engine never ask which one
they hold:

    encode(images (B, 3, H, W) in [-1, 1]) -> latents (B, latent_channels, H / f, W / f)   # normalised
    decode(latents)                        -> images (B, 3, H, W) in [-1, 1]
    encode_list / decode_list              -> the same for images of different sizes (grouped by size)
    latent_channels, spatial_factor        -> f and the channel count

Design choices:
- One image is a one-frame video (B, C, 1, H, W) for the Wan VAE (DESIGN section 5): the causal 3D
  VAE encodes a first frame on its own, so an image's latent never depends on its neighbours.
- Latents are normalised exactly as diffusers' Wan / Cosmos-Predict2.5 pipelines do it:
  `z = (mu - latents_mean) * (1 / latents_std)`, decoded as `z / (1 / latents_std) + latents_mean`
  (`pipeline_cosmos2_5_predict.py`, `pipeline_wan_i2v.py`). Encoding takes the posterior mode
  (their `sample_mode="argmax"`), so encoding is deterministic and a training target is stable.
- Weights load from a local directory only, safetensors only (`local_files_only=True,
  use_safetensors=True`): no hub download, no pickle.
- The pixel autoencoder is a permutation (pixel_unshuffle) plus a fixed affine map, so the round trip
  is exact: uint8 canvas -> latent -> uint8 canvas gives the same bytes (tested). Its default affine
  map is the identity on [-1, 1] pixel values, the range pixel-space diffusion models commonly use;
  `shift` / `scale` exist for experiments that want centred latents.
- Images of different sizes are grouped by size and encoded in chunks of at most `max_batch` images,
  so one call never holds more than one chunk of activations.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- shared interface


class ImageAutoencoder(nn.Module):
    """Base of both autoencoders: subclasses implement `encode` / `decode` on same-size batches."""

    latent_channels: int
    spatial_factor: int
    max_batch: int = 16  # images per encoder/decoder call in encode_list / decode_list (memory cap)

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming the problem unless `images` is (B, 3, H, W) with H, W multiples of f."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        f = self.spatial_factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the autoencoder's spatial factor {f}")

    def check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w); got shape {tuple(latents.shape)}"
            )

    def encode_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encode images of different sizes, each (3, H_i, W_i) -> (latent_channels, H_i / f, W_i / f)."""
        return _map_grouped_by_size(self.encode, images, self.max_batch)

    def decode_list(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decode latents of different sizes, each (latent_channels, h_i, w_i) -> (3, h_i * f, w_i * f)."""
        return _map_grouped_by_size(self.decode, latents, self.max_batch)


def _map_grouped_by_size(fn, items: list[torch.Tensor], max_batch: int) -> list[torch.Tensor]:
    """Apply a batched `fn` to unbatched tensors of mixed shapes: group equal shapes, chunk, restore order."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if item.ndim != 3:
            raise ValueError(f"item {i} must be an unbatched (C, H, W) tensor; got shape {tuple(item.shape)}")
        groups[tuple(item.shape)].append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for indices in groups.values():
        for start in range(0, len(indices), max_batch):
            chunk = indices[start : start + max_batch]
            result = fn(torch.stack([items[i] for i in chunk]))  # (n, C', H', W')
            for i, r in zip(chunk, result):
                out[i] = r
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- pixel range helpers


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [-1, 1] (the autoencoders' input range)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor; got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255], rounding to the nearest level (inverse of uint8_to_unit)."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------- ShapeWorld: pixel (un)shuffle


@dataclass
class PixelShuffleConfig:
    factor: int = 4  # spatial factor f: (3, 64, 64) -> (3 * f * f = 48, 16, 16)
    shift: float = 0.0  # latent = (pixel - shift) * scale, pixels in [-1, 1]; identity by default
    scale: float = 1.0


class PixelShuffleAE(ImageAutoencoder):
    """Parameter-free autoencoder for ShapeWorld: pixel_unshuffle by f and a fixed affine map; exact inverse."""

    def __init__(self, config: PixelShuffleConfig | None = None):
        super().__init__()
        self.config = config or PixelShuffleConfig()
        if self.config.factor < 1:
            raise ValueError(f"PixelShuffleConfig.factor must be >= 1; got {self.config.factor}")
        if self.config.scale == 0:
            raise ValueError("PixelShuffleConfig.scale must be non-zero (the map must be invertible)")
        self.spatial_factor = self.config.factor
        self.latent_channels = 3 * self.config.factor**2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3 f^2, H / f, W / f)."""
        self.check_images(images)
        latents = F.pixel_unshuffle(images.float(), self.config.factor)  # (B, 3 f^2, H/f, W/f)
        return (latents - self.config.shift) * self.config.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3 f^2, h, w) -> (B, 3, h f, w f) in pixel units (not clamped: the inverse is exact)."""
        self.check_latents(latents)
        pixels = latents.float() / self.config.scale + self.config.shift
        return F.pixel_shuffle(pixels, self.config.factor)  # (B, 3, h f, w f)


# ----------------------------------------------------------------------------- real images: Wan2.1 VAE


class WanImageVAE(ImageAutoencoder):
    """diffusers `AutoencoderKLWan` used on one-frame videos, with the model's latent normalisation."""

    def __init__(self, vae):
        super().__init__()
        from diffusers import AutoencoderKLWan

        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"WanImageVAE wraps a diffusers AutoencoderKLWan; got {type(vae).__name__}")
        self.vae = vae
        config = vae.config
        if config.latents_mean is None or config.latents_std is None:
            raise ValueError("the Wan VAE config has no latents_mean / latents_std; cannot normalise latents")
        if not (len(config.latents_mean) == len(config.latents_std) == config.z_dim):
            raise ValueError(
                f"latents_mean ({len(config.latents_mean)}) and latents_std ({len(config.latents_std)}) "
                f"must both have z_dim = {config.z_dim} entries"
            )
        # Spatial factor from the structure (one 2x downsample per stage, times the input patchify of
        # the Wan2.2 VAE), checked against the config so a hand-edited config fails here, not in a shape.
        structural = 2 ** len(config.temperal_downsample) * (config.patch_size or 1)
        if config.scale_factor_spatial is not None and config.scale_factor_spatial != structural:
            raise ValueError(
                f"Wan VAE config scale_factor_spatial={config.scale_factor_spatial} disagrees with its structure "
                f"(2 ** {len(config.temperal_downsample)} downsamples x patch {config.patch_size or 1} = {structural})"
            )
        self.spatial_factor = structural
        self.latent_channels = config.z_dim
        mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("latents_mean", mean, persistent=False)  # (1, z, 1, 1)
        self.register_buffer("latents_inv_std", inv_std, persistent=False)  # (1, z, 1, 1)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32
    ) -> "WanImageVAE":
        """Load from a local diffusers directory (a VAE dir, or a pipeline dir with subfolder="vae")."""
        from diffusers import AutoencoderKLWan

        root = Path(path)
        model_dir = root / subfolder if subfolder else root
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no Wan VAE at {model_dir}: expected a local directory with config.json")
        vae = AutoencoderKLWan.from_pretrained(
            str(root), subfolder=subfolder, torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True
        )
        return cls(vae.eval())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, z, H / f, W / f), float32."""
        self.check_images(images)
        video = images.to(self.vae.dtype).unsqueeze(2)  # (B, 3, 1, H, W): one image = one frame
        mu = self.vae.encode(video).latent_dist.mode()  # (B, z, 1, h, w); "argmax" as the pipelines do
        mu = mu.squeeze(2).float()  # (B, z, h, w)
        return (mu - self.latents_mean) * self.latents_inv_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z, h, w) -> images (B, 3, h f, w f) in [-1, 1], float32."""
        self.check_latents(latents)
        raw = latents.float() / self.latents_inv_std + self.latents_mean  # (B, z, h, w)
        video = self.vae.decode(raw.to(self.vae.dtype).unsqueeze(2)).sample  # (B, 3, 1, H, W)
        return video.squeeze(2).float()


def tiny_wan_vae_config() -> dict:
    """A tiny random AutoencoderKLWan config for tests: 4 latent channels, spatial factor 2."""
    return dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
        scale_factor_spatial=2,
    )
