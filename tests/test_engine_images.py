"""Data engine: image rules (size, aspect, uniform, QR, icon, logo, ad) and pHash near-duplicates."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "engine"))
import howto_site as site  # noqa: E402

from duetgen.data.engine.images import ImageRuleConfig, hamming, image_rule, phash  # noqa: E402

CFG = ImageRuleConfig()


def im(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def verdict(data, hints=""):
    img = im(data)
    v = image_rule(img.size, img.convert("L"), hints, CFG)
    return v and v[0]


def test_step_photos_pass_every_rule():
    for seed in range(1, 13):
        assert verdict(site.photo(seed), f"step{seed}.jpg photo of step {seed}") is None


def test_each_rule_fires_with_its_reason():
    assert verdict(site.icon(), "icon-print.png") == "icon"
    assert verdict(site.icon(), "print.png") == "too_small"
    assert verdict(site.banner_ad(), "sale-728x90.png summer sale") == "banner_ad"  # IAB 728x90
    assert verdict(site.photo(3, 600, 150), "divider.jpg") == "extreme_aspect"
    assert verdict(site.photo(3, 400, 300), "/ads/creative.jpg") == "banner_ad"
    assert verdict(site.logo(), "site-logo.png") == "logo"
    assert verdict(site.photo(42, 300, 300), "avatar author") == "icon"
    assert verdict(site.spacer(), "spacer.png") == "near_uniform"
    assert verdict(site.qr_code(), "get-app.png") == "qr_code"  # no hint words: the detector finds it
    # words inside other words do not fire: "add", "head", "shadow"
    assert verdict(site.photo(8), "add-water head shadow.jpg") is None


def test_qr_code_detected_inside_a_larger_photo():
    base = im(site.photo(6, 640, 480))
    qr = im(site.qr_code()).resize((200, 200), Image.Resampling.NEAREST)
    base.paste(qr, (400, 240))
    buf = io.BytesIO()
    base.save(buf, format="PNG")
    assert verdict(buf.getvalue(), "poster.png") == "qr_code"


def grey(data: bytes) -> Image.Image:
    return im(data).convert("L")


def test_phash_near_duplicate_vs_distinct():
    a, a2 = grey(site.photo(2)), grey(site.near_duplicate(2))
    assert hamming(phash(a), phash(a2)) <= 8  # resized + re-encoded copy
    distances = [hamming(phash(grey(site.photo(i))), phash(grey(site.photo(j)))) for i in range(1, 9) for j in range(i + 1, 9)]
    assert min(distances) > 8, distances  # different step photos stay apart
    assert phash(a) == phash(a.copy()) and 0 <= phash(a) < 2**64
    flipped = Image.fromarray(np.asarray(a)[:, ::-1])
    assert hamming(phash(a), phash(flipped)) > 8


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_a_funnel_thumbnail_of_an_undecoded_image_decodes_a_jpeg_at_a_dct_scale():
    """A funnel example of an image a header rule dropped (never decoded) decodes it for its 64 px thumbnail: a
    JPEG at the DCT scale the thumbnail needs (1/8 of 1600x1200; was every pixel), under its own size as the cap
    (its header passed the run's; was the default cap)."""
    from duetgen.data.engine.document import ImageItem
    from duetgen.data.engine.fetch import FetchConfig, ImageFetcher

    data, _ = ImageFetcher(FetchConfig())._decode(site.photo(5, 1600, 1200), None, "ad.jpg", decode=False)
    preview = ImageItem("ad.jpg", data=data).preview()  # for a 64 px thumbnail
    assert preview.size == (200, 150)


def test_large_jpeg_is_decoded_at_a_dct_scale_and_judged_by_its_own_size():
    """Issue 18: no check reads more than 1,280 px, so a JPEG twice that is decoded at 1/2 (1/4, 1/8); the
    size rules still read the file's own size (decoded, this 2600x190 strip would be 1300x95: too_small)."""
    from duetgen.data.engine.document import Doc, ImageItem, StageStats
    from duetgen.data.engine.fetch import FetchConfig, FetchError, ImageFetcher
    from duetgen.data.engine.stages import ImageRules

    f = ImageFetcher(FetchConfig())
    data, rgb = f._decode(site.photo(3, 2600, 1950), None, "big.jpg")
    assert data == site.photo(3, 2600, 1950) and data.size == (2600, 1950) and rgb.size == (1300, 975)
    small, small_rgb = f._decode(site.photo(3, 2500, 1900), None, "not-twice.jpg")  # < 2 x 1,280: full size
    assert small.size == small_rgb.size == (2500, 1900)
    wide, wide_rgb = f._decode(jpeg(im(site.photo(4, 2600, 190))), None, "wide.jpg")
    assert (wide.size, wide_rgb.size) == ((2600, 190), (1300, 95))
    item = ImageItem("wide.jpg", data=wide, image=wide_rgb)
    stats = StageStats("image_rules")
    assert list(ImageRules(CFG)([Doc("d", None, items=[item])], stats))[0].items == []
    assert dict(stats.image_drops) == {"extreme_aspect": 1}
    with pytest.raises(FetchError, match="truncated") as e:  # every coefficient is still read: a cut file fails
        f._decode(site.photo(3, 2600, 1950)[:-3000], None, "cut.jpg")
    assert e.value.reason == "corrupt_image"
