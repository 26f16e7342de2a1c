"""The QR rule as shipped (``has_qr_code``: a first zxing read without zxing's inversion, the adaptive-threshold
read with it, and an inverted read at a quarter of the size) against the rule before session 9 (the first read
with inversion, then the adaptive-threshold read): verdicts on tests/test_engine_qr.py's images and on
light-on-dark codes of every module size, and the time per step photo (no code: the common case).

    OMP_NUM_THREADS=1 python scripts/probes/qr_first_read.py
"""
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import zxingcpp
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_engine_qr as qr_tests  # noqa: E402

from duetgen.data.engine.images import QR_MAX_SIDE, has_qr_code  # noqa: E402


def before(grey) -> bool:
    """The rule before session 9."""
    if max(grey.size) > QR_MAX_SIDE:
        grey = grey.copy()
        grey.thumbnail((QR_MAX_SIDE, QR_MAX_SIDE))
    g = np.asarray(grey)
    if zxingcpp.read_barcodes(g, formats=zxingcpp.BarcodeFormat.QRCode):
        return True
    binary = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 25, 5)
    return bool(zxingcpp.read_barcodes(binary, formats=zxingcpp.BarcodeFormat.QRCode,
                                       binarizer=zxingcpp.Binarizer.FixedThreshold))


def light_on_dark() -> list[tuple[str, Image.Image]]:
    out = []
    for module_px in (2, 3, 5, 8, 12, 16, 20, 22, 25, 30, 36):
        for dark, light in ((0, 255), (30, 220), (60, 200)):
            code = qr_tests.qr(qr_tests.URLS[0], module_px, dark=(light,) * 3, light=(dark,) * 3)
            canvas = Image.new("RGB", (code.width + 80, code.height + 80), (dark,) * 3)
            canvas.paste(code, (40, 40))
            out.append((f"inverted-{module_px}px-{dark}-{light}", canvas))
    return out


def main() -> None:
    cv2.setNumThreads(1)
    codes = qr_tests.with_codes() + light_on_dark()
    none = qr_tests.without_codes()
    photos = [im.convert("L") for name, im in none if name.startswith("photo-")]
    found = {}
    for label, rule in (("before", before), ("shipped", has_qr_code)):
        found[label] = {n for n, im in codes if rule(im.convert("L"))}
        false = [n for n, im in none if rule(im.convert("L"))]
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for grey in photos:
                rule(grey)
            best = min(best, (time.process_time() - start) / len(photos) * 1000)
        print(f"{label}: {len(found[label])}/{len(codes)} codes read, {len(false)} false of {len(none)}; "
              f"{best:.2f} CPU ms a 480x360 step photo (its grey given)")
    print("read only before:", sorted(found["before"] - found["shipped"]),
          "only shipped:", sorted(found["shipped"] - found["before"]))


if __name__ == "__main__":
    main()
