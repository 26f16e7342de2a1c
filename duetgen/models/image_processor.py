"""Qwen2-VL image processing without torchvision (DESIGN section 8).

Turns PIL images into what ``Qwen2_5_VLForConditionalGeneration`` eats: ``pixel_values``
(all patches of all images, concatenated) and ``image_grid_thw`` (one ``(t, h, w)`` patch grid per
image). It reimplements ``transformers``' PIL-backend ``Qwen2VLImageProcessorPil`` step by step,
so the output is bit-identical to it (tests/test_mllm.py checks this), plus one addition:

Design choices:
- Resize with ``smart_resize``: both sides a multiple of ``patch_size * merge_size`` (one LLM
  token = one merge x merge block of patches), total pixels within [min_pixels, max_pixels],
  aspect ratio kept as closely as possible. Bicubic resampling by PIL, as transformers does.
- ``max_side`` caps the longer side after rounding (paper section 4.1: "we cap the maximum side
  length of images fed into the MLLM at 480 pixels" to avoid OOM). When the cap binds, the image
  is scaled so its longer side is ``max_side`` and each side rounded to the nearest multiple of
  the factor, one factor down if that would pass the cap. ``None`` turns the cap off.
- Rescale to [0, 1] in float64 then cast to float32, normalise with the OpenAI CLIP mean/std in
  float32 — the exact arithmetic of transformers' numpy helpers.
- Patchify: (C, H, W) -> (gh*gw, C*temporal_patch*patch*patch) with patches ordered merge-block
  by merge-block (so the vision merger's 2x2 groups are contiguous), the still image repeated
  ``temporal_patch_size`` times along time (grid_t = 1).
- Transparent images are composited on white before dropping alpha (transformers' convert_to_rgb:
  `duetgen.data.images.to_rgb`, the project's one RGB rule).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from duetgen.data.images import to_rgb

from duetgen.data.dataset import atomic_write_bytes

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessor:
    patch_size: int = 14  # vision patch side in pixels (vision_config.patch_size)
    merge_size: int = 2  # merge x merge patches become one LLM token (vision_config.spatial_merge_size)
    temporal_patch_size: int = 2  # still images are repeated this many times along time
    min_pixels: int = 56 * 56  # Qwen2-VL defaults (preprocessor_config.json of Qwen2.5-VL-7B)
    max_pixels: int = 28 * 28 * 1280
    max_side: int | None = 480  # paper section 4.1; None = no cap
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)

    def __post_init__(self):
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageProcessor.{name}={value!r}: must be a positive int")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"ImageProcessor: min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < self.factor):
            raise ValueError(f"ImageProcessor.max_side={self.max_side!r}: must be an int >= patch_size*merge_size="
                             f"{self.factor}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("ImageProcessor: image_mean and image_std need 3 values (RGB)")
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)

    @property
    def factor(self) -> int:
        """Side multiple: one LLM token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    # ------------------------------------------------------------------------- sizes
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        if self.max_side is not None and max(h, w) > self.max_side:
            scale = self.max_side / max(height, width)
            h, w = self._capped(height * scale), self._capped(width * scale)
        return h, w

    def _capped(self, side: float) -> int:
        """Nearest multiple of the factor to ``side`` (<= max_side), at least one factor."""
        rounded = round(side / self.factor) * self.factor
        if rounded > self.max_side:
            rounded -= self.factor
        return max(self.factor, rounded)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """Patch grid (t, h, w) for an image of this size (before merging)."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        """How many ``<|image_pad|>`` tokens an image of this size becomes in the LLM sequence."""
        t, gh, gw = self.grid_thw(height, width)
        return t * gh * gw // (self.merge_size**2)

    # ------------------------------------------------------------------------- processing
    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (pixel_values (N_patches, C*T*P*P) float32, image_grid_thw (n_images, 3) int64)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("ImageProcessor: no images given")
        all_patches, grids = [], []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"ImageProcessor: images[{i}] is {type(image).__name__}, expected a PIL image")
            patches, grid = self.process_one(image)
            all_patches.append(patches)
            grids.append(grid)
        pixel_values = torch.from_numpy(np.concatenate(all_patches, axis=0))
        return pixel_values, torch.tensor(grids, dtype=torch.long)

    def process_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches (gh*gw, C*T*P*P) float32, (1, gh, gw))."""
        rgb = to_rgb(image)
        h, w = self.target_size(rgb.height, rgb.width)
        rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)  # PIL returns a copy when the size is unchanged
        x = np.asarray(rgb)  # (H, W, 3) uint8
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale
        mean = np.array(self.image_mean, dtype=np.float32)
        std = np.array(self.image_std, dtype=np.float32)
        x = (x - mean) / std  # (H, W, 3) float32
        x = x.transpose(2, 0, 1)  # (3, H, W)
        return self.patchify(x)

    def patchify(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(C, H, W) -> (gh*gw, C*T*P*P), patches in merge-block order, the frame repeated T times."""
        c, h, w = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # (gh/m, gw/m, m, m, C, T, P, P)
        return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32), (1, gh, gw)

    # ------------------------------------------------------------------------- construction / IO
    @classmethod
    def for_model(cls, config, **overrides) -> "ImageProcessor":
        """Patch settings taken from a Qwen2.5-VL config's ``vision_config``; sizes from ``overrides``."""
        vc = config.vision_config
        return cls(
            patch_size=vc.patch_size,
            merge_size=vc.spatial_merge_size,
            temporal_patch_size=vc.temporal_patch_size,
            **overrides,
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, max_side: int | None = 480) -> "ImageProcessor":
        """Read a Qwen2-VL ``preprocessor_config.json`` (the one shipped with real Qwen2.5-VL weights)."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no preprocessor_config.json in the model directory")
        try:
            cfg = json.loads(path.read_text())
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("size") or {}, dict):
            raise ValueError(f"{path}: must hold a JSON object (and its size, if any, an object)")
        size = cfg.get("size") or {}
        try:
            return cls(
                patch_size=int(cfg.get("patch_size", 14)),
                merge_size=int(cfg.get("merge_size", 2)),
                temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
                min_pixels=int(cfg.get("min_pixels", size.get("shortest_edge", 56 * 56))),
                max_pixels=int(cfg.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
                max_side=cfg.get("duetgen_max_side", max_side),
                image_mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
                image_std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            )
        except (TypeError, ValueError) as e:  # a field of the wrong type or out of range
            raise ValueError(f"{path}: {e}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` in the Qwen2-VL format (plain transformers can read it)."""
        d = asdict(self)
        cfg = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "resample": 3,  # PIL bicubic
            "image_mean": list(d["image_mean"]), "image_std": list(d["image_std"]),
            "patch_size": d["patch_size"], "merge_size": d["merge_size"],
            "temporal_patch_size": d["temporal_patch_size"],
            "size": {"shortest_edge": d["min_pixels"], "longest_edge": d["max_pixels"]},
            "duetgen_max_side": d["max_side"],  # ours; transformers' processor has no side cap
        }
        path = Path(directory) / "preprocessor_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(cfg, indent=2).encode())
        return path


MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses longer / shorter side above this


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' ``smart_resize`` (Qwen2-VL): sides multiple of ``factor``, pixels in range, aspect kept."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {width}x{height}: both sides must be >= 1 pixel")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image size {width}x{height}: aspect ratio {max(height, width) / min(height, width):.0f} "
                         f"exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
