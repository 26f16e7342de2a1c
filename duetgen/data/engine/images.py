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
- QR codes: OpenCV's ``QRCodeDetectorAruco`` on a copy whose longer side is at most 640 px. A
  detection counts only if the code also decodes: on 100 synthetic step photos (tests'
  howto_site.photo) the classic ``QRCodeDetector.detect`` alone fired on 7, detect + decode on 0;
  a QR code on a web page is made to be read (decoded at the corners the detector found). Measured
  per 480x360 photo, one thread: classic 8.8 ms, Aruco 7.2 ms, and Aruco also finds a 120 px code
  pasted into a 640x480 photo, which the classic one misses.
- Perceptual hash: 64-bit DCT hash (pHash: 32x32 grey, top-left 8x8 DCT block against its median);
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
    qr: bool = True  # run the OpenCV QR detector


def hint_words(hints: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", hints.lower())) - {""}


_QR = None


def has_qr_code(img) -> bool:
    global _QR
    import cv2

    if _QR is None:
        # One OpenCV thread: engine parallelism is one process per core; OpenCV's own pool only
        # contended with it (measured 14 -> 9 ms per 480x360 image on the 2-core dev box).
        cv2.setNumThreads(1)
        _QR = cv2.QRCodeDetectorAruco()
    im = img.copy()
    im.thumbnail((640, 640))
    grey = np.asarray(im.convert("L"))
    found, points = _QR.detect(grey)
    if not found:
        return False
    # A finder-pattern look-alike does not decode. Decoding at the corners just found, not
    # detectAndDecode (which detects again): same answers on the fixtures, 11 against 29 ms.
    text, _ = _QR.decode(grey, points)
    return bool(text)


def image_rule(img, hints: str, cfg: ImageRuleConfig) -> tuple[str, str] | None:
    """(reason, detail) if the image must go, else None. ``img`` is an RGB PIL image."""
    w, h = img.size
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
    thumb = np.asarray(img.convert("L").resize((64, 64)), dtype=np.float32)
    if thumb.std() < cfg.min_std:
        return "near_uniform", f"grey std {thumb.std():.1f} < {cfg.min_std}"
    if cfg.qr and has_qr_code(img):
        return "qr_code", "OpenCV QRCodeDetector found a code"
    return None


def phash(img) -> int:
    """64-bit perceptual hash (DCT of a 32x32 grey thumbnail, 8x8 low frequencies vs their median)."""
    import cv2
    from PIL import Image

    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float32)
    low = cv2.dct(grey)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term is left out of the median: it is the mean brightness
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
