"""The torchvision-free Qwen2-VL image processor equals transformers' own PIL-backend processor."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from duetgen.models.image_processor import ImageProcessor


def random_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    x = (rng.random((h, w, channels)) * 255).astype(np.uint8)
    return Image.fromarray(x[..., 0] if channels == 1 else x, mode=mode)


SETTINGS = {  # name -> (patch, merge, temporal, min_pixels, max_pixels)
    "qwen2.5-vl": (14, 2, 2, 56 * 56, 28 * 28 * 1280),
    "toy": (8, 2, 2, 16 * 16, 128 * 128),
    "tiny": (4, 2, 1, 8 * 8, 48 * 48),
}
SIZES = [(50, 70), (300, 200), (64, 64), (33, 97), (1000, 900), (7, 9)]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("size", SIZES)
def test_equals_transformers_pil_processor(setting, size):
    p, m, t, lo, hi = SETTINGS[setting]
    images = [random_image(*size, seed=1), random_image(size[1], size[0], seed=2)]
    ref = Qwen2VLImageProcessorPil(
        patch_size=p, merge_size=m, temporal_patch_size=t, size={"shortest_edge": lo, "longest_edge": hi}
    )(images=images, return_tensors="np")
    ours = ImageProcessor(patch_size=p, merge_size=m, temporal_patch_size=t, min_pixels=lo, max_pixels=hi, max_side=None)
    pixel_values, grid = ours(images)
    assert pixel_values.dtype == torch.float32 and grid.dtype == torch.int64
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert np.array_equal(pixel_values.numpy(), ref["pixel_values"])  # bit-identical
    for (gt, gh, gw), (h, w) in zip(grid.tolist(), [size, size[::-1]]):
        assert ours.num_tokens(h, w) == gt * gh * gw // m**2


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_modes_match(mode):
    image = random_image(45, 61, mode=mode, seed=3)
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    pixel_values, _ = ImageProcessor(max_side=None)([image])
    assert np.array_equal(pixel_values.numpy(), ref["pixel_values"])


def test_patch_layout_by_hand():
    """Independent check of the flattening: row = merge-block-major order, columns = (C, T, P, P)."""
    ip = ImageProcessor(patch_size=2, merge_size=2, temporal_patch_size=3, min_pixels=4, max_pixels=10_000, max_side=None)
    x = np.random.default_rng(0).standard_normal((3, 8, 12)).astype(np.float32)  # (C, H, W)
    patches, (t, gh, gw) = ip.patchify(x)
    assert (t, gh, gw) == (1, 4, 6) and patches.shape == (24, 3 * 3 * 2 * 2)
    row = 0
    for bh in range(gh // 2):
        for bw in range(gw // 2):
            for mh in range(2):
                for mw in range(2):
                    ph, pw = bh * 2 + mh, bw * 2 + mw
                    patch = x[:, ph * 2:ph * 2 + 2, pw * 2:pw * 2 + 2]  # (C, P, P)
                    want = np.stack([patch] * 3, axis=1).reshape(-1)  # (C, T, P, P)
                    assert np.array_equal(patches[row], want)
                    row += 1


def test_max_side_caps_the_longer_side():
    ip = ImageProcessor(max_side=480)  # paper section 4.1
    for h, w in [(1000, 700), (700, 1000), (2000, 300), (481, 481), (3000, 3000)]:
        th, tw = ip.target_size(h, w)
        assert max(th, tw) <= 480 and th % 28 == 0 and tw % 28 == 0
        scale = 480 / max(h, w)
        assert abs(th - h * scale) <= 28 and abs(tw - w * scale) <= 28  # each side within one factor of exact
    # no effect below the cap: same as transformers' smart_resize
    assert ip.target_size(300, 200) == ImageProcessor(max_side=None).target_size(300, 200) == (308, 196)
    pixel_values, grid = ip([random_image(900, 1200)])
    assert grid.tolist() == [[1, 26, 34]]  # 364 x 476 pixels: 360 x 480 rounded to multiples of 28
    assert pixel_values.shape == (26 * 34, 3 * 2 * 14 * 14)


def test_save_and_load_round_trip(tmp_path):
    ip = ImageProcessor(patch_size=8, merge_size=2, min_pixels=256, max_pixels=128 * 128, max_side=96)
    ip.save_pretrained(tmp_path)
    assert ImageProcessor.from_pretrained(tmp_path) == ip
    # plain transformers reads the same file
    ref = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    image = random_image(60, 90)
    assert np.array_equal(ref(images=[image], return_tensors="np")["pixel_values"], ip([image])[0].numpy())


def test_bad_inputs():
    with pytest.raises(ValueError, match="aspect ratio"):
        ImageProcessor().target_size(2, 1000)
    with pytest.raises(ValueError, match="max_side=10"):
        ImageProcessor(max_side=10)
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor(min_pixels=100, max_pixels=10)
    with pytest.raises(TypeError, match=r"images\[1\] is ndarray"):
        ImageProcessor()([random_image(30, 30), np.zeros((30, 30, 3))])
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained("/nonexistent-dir")
