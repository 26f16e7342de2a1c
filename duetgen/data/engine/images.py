"""Image rules: what a how-to page shows that is not a step picture, and near-duplicate detection.

Paper section 3.1 drops "invalid images (e.g., QR codes, icons, advertisements)" and removes
"duplicate or near-identical consecutive images". These rules run before (and without) any MLLM.

Design choices:
- Rules run in a fixed order and the first that fires is the drop reason, so every dropped image
  has exactly one reason code: named kinds (ad, logo, icon) first, then size/shape, then the
  pixel statistics, then the (slowest) QR detector.
- Size/shape: ``too_small`` (shorter side under ``min_side``), ``extreme_aspect`` (banners,
  dividers), ``near_uniform`` (blank spacers, solid fills: grey-level std on a 64x64 thumbnail).
- Icons, logos and banner ads are recognised by the words around the image (class, id, alt,
  file name, link target) and, for ads, by the standard IAB ad-unit sizes.
- QR codes: zxing-cpp (a C++ barcode reader; a code counts only when it decodes) on the grey image
  (longer side at most 1,280 px; without zxing's inverted second pass, which the later reads make),
  then once more on OpenCV's adaptive-mean threshold of it (block 25, C 5, zxing's inversion on),
  which reads the low-contrast codes zxing's own binarizer misses (dark 20-60 on light 60-120 pasted
  on a photo) and light-on-dark ones, then inverted at a quarter of the size (light-on-dark codes whose
  modules are wider than the threshold's block turn white in it). Measured on tests/test_engine_qr.py's set (146 real QR codes written
  with segno: module sizes 1.2-30 px, rotated, perspective, blurred, noisy, JPEG'd, low-contrast,
  inverted, in photos up to 3000x2000; 117 images without one): it reads every code OpenCV's
  ``QRCodeDetectorAruco`` (detect + decode on a 640 px copy, the rule before) read, 11 more, and
  fires on none of the others; 1.5 ms per 480x360 photo against 7.5 ms (one core). A QR code on a
  web page is made to be read, so a finder-pattern look-alike that does not decode is no QR code.
- Perceptual hash: 64-bit DCT hash (pHash: 32x32 grey, top-left 8x8 DCT block against its median);
  both thumbnails (64 px uniformity, 32 px pHash) box-reduce first (``REDUCING_GAP``);
  an image within ``max_distance`` bits of the previous kept image of the page is a duplicate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ICON_WORDS = {"icon", "icons", "favicon", "sprite", "emoji", "avatar", "badge", "button", "arrow", "bullet", "spinner", "loader", "rating", "star"}
LOGO_WORDS = {"logo", "logos", "brand", "wordmark", "brandmark"}
AD_WORDS = {"ad", "ads", "advert", "advertisement", "adserver", "doubleclick", "banner", "sponsor", "sponsored",
            "promo", "adsbygoogle", "affiliate"}
IAB_AD_SIZES = {(728, 90), (468, 60), (320, 50), (300, 250), (336, 280), (160, 600), (120, 600), (300, 600),
                (970, 90), (970, 250)}


@dataclass
class ImageRuleConfig:
    min_side: int = 100  # px; thumbnails and inline glyphs are smaller than any step picture
    max_aspect: float = 3.0  # longer/shorter side; step photos are 4:3-16:9, banners 5:1 and up
    min_std: float = 6.0  # grey-level std (0-255) under which an image is a blank/solid fill
    icon_max_side: int = 200  # a small square image with icon words around it is an icon
    qr: bool = True  # run the QR check (zxing-cpp)


def hint_words(hints: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", hints.lower())) - {""}


# The uniformity and pHash thumbnails: a box reduction by an integer factor first, down to at least 3x the
# thumbnail, then the filter (Pillow's ``reducing_gap``; 3.0: "indistinguishable from fair resampling in most
# cases"). Both thumbnails of a 480x360 photo: 1.04 -> 0.53 CPU ms, of a 1200x900 one 5.3 -> 0.8. The pHash of
# a photo moves <= 2 bits, so decisions at the threshold can flip: 2 of 1,050 photo / near-copy pairs (crops at
# 8 bits -> 10); no near_uniform decision changed on 506 test images (docs/decisions.md, issue 18).
REDUCING_GAP = 3.0
QR_MAX_SIDE = 1280  # px: the QR check's copy of a larger image is scaled down (its cost grows with the pixels)
QR_INVERTED_REDUCE = 4  # the inverted read for light-on-dark codes with large modules: a box reduction by this


def has_qr_code(grey) -> bool:
    """True when a QR code in ``grey`` (a PIL "L" image) decodes (module docstring)."""
    import cv2
    import zxingcpp

    cv2.setNumThreads(1)  # engine parallelism is one process per core; OpenCV's pool only contends with it
    if max(grey.size) > QR_MAX_SIDE:
        grey = grey.copy()
        grey.thumbnail((QR_MAX_SIDE, QR_MAX_SIDE))
    g = np.asarray(grey)
    if zxingcpp.read_barcodes(g, formats=zxingcpp.BarcodeFormat.QRCode, try_invert=False):
        return True
    binary = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 25, 5)
    if zxingcpp.read_barcodes(binary, formats=zxingcpp.BarcodeFormat.QRCode,
                              binarizer=zxingcpp.Binarizer.FixedThreshold):
        return True
    # light-on-dark codes whose modules are wider than the threshold's block (25 px) turn white there, and the first
    # read does not invert: read the inverted image once more at a quarter of the size (modules >= ~5 px there)
    small = grey.reduce(QR_INVERTED_REDUCE)
    return bool(zxingcpp.read_barcodes(255 - np.asarray(small), formats=zxingcpp.BarcodeFormat.QRCode,
                                       try_invert=False))


def image_rule(size: tuple[int, int], grey, hints: str, cfg: ImageRuleConfig) -> tuple[str, str] | None:
    """(reason, detail) if the image must go, else None. ``size`` is the file's (width, height) from its
    header; ``grey`` the decoded image in mode "L" (a large JPEG's may be smaller: DCT-scaled decoding),
    made once by the caller (the pHash reads it too)."""
    return header_rule(size, hints, cfg) or pixel_rule(grey, cfg)


def header_rule(size: tuple[int, int], hints: str, cfg: ImageRuleConfig) -> tuple[str, str] | None:
    """The rules that need no pixel: named kinds (IAB ad sizes, ad / logo / icon words) and size and shape, from
    the file's header size and the page's hints. The engine asks them before decoding an image."""
    w, h = size
    words = hint_words(hints)
    aspect = max(w / h, h / w)
    # Named kinds first (their reason says more than "too small"), then the size/shape rules.
    if (w, h) in IAB_AD_SIZES:
        return "banner_ad", f"{w}x{h} is an IAB ad size"
    if words & AD_WORDS:
        return "banner_ad", f"ad words {sorted(words & AD_WORDS)}"
    if words & LOGO_WORDS:
        return "logo", f"logo words {sorted(words & LOGO_WORDS)}"
    if words & ICON_WORDS and max(w, h) <= cfg.icon_max_side * 2:
        return "icon", f"{w}x{h} with icon words {sorted(words & ICON_WORDS)}"
    if min(w, h) < cfg.min_side:
        return "too_small", f"{w}x{h}, shorter side < {cfg.min_side}"
    if aspect > cfg.max_aspect:
        return "extreme_aspect", f"{w}x{h}, aspect {aspect:.1f} > {cfg.max_aspect}"
    return None


def pixel_rule(grey, cfg: ImageRuleConfig) -> tuple[str, str] | None:
    """The rules that read the decoded (grey) image: near-uniform fills and QR codes."""
    thumb = np.asarray(grey.resize((64, 64), reducing_gap=REDUCING_GAP), dtype=np.float32)
    if thumb.std() < cfg.min_std:
        return "near_uniform", f"grey std {thumb.std():.1f} < {cfg.min_std}"
    if cfg.qr and has_qr_code(grey):
        return "qr_code", "a QR code decodes (zxing-cpp)"
    return None


def phash(grey) -> int:
    """64-bit perceptual hash of a grey ("L") PIL image (DCT of a 32x32 thumbnail, 8x8 low
    frequencies vs their median)."""
    import cv2
    from PIL import Image

    if grey.mode != "L":
        raise ValueError(f"phash takes a grey (mode L) image, got mode {grey.mode}")
    grey = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP), dtype=np.float32)
    low = cv2.dct(grey)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term is left out of the median: it is the mean brightness
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
