"""The QR rule's first zxing read with and without zxing's own inversion (issue 18, session 9): the same
verdicts on tests/test_engine_qr.py's images, and the time per step photo (no code: the common case).

    OMP_NUM_THREADS=1 python scripts/probes/qr_first_read.py

The second read (adaptive threshold, zxing's inversion on) stays as it is in both: it is what reads
low-contrast light-on-dark codes (docs/decisions.md), and it reads the high-contrast inverted one too.
"""
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import zxingcpp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_engine_qr as qr_tests  # noqa: E402


def rule(img, invert_first: bool) -> bool:
    """duetgen.data.engine.images.has_qr_code (on the image's grey), its first read's inversion a choice."""
    grey = img.convert("L")
    if max(grey.size) > 1280:
        grey = grey.copy()
        grey.thumbnail((1280, 1280))
    g = np.asarray(grey)
    if zxingcpp.read_barcodes(g, formats=zxingcpp.BarcodeFormat.QRCode, try_invert=invert_first):
        return True
    binary = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 25, 5)
    return bool(zxingcpp.read_barcodes(binary, formats=zxingcpp.BarcodeFormat.QRCode,
                                       binarizer=zxingcpp.Binarizer.FixedThreshold))


def main() -> None:
    cv2.setNumThreads(1)
    codes, none = qr_tests.with_codes(), qr_tests.without_codes()
    photos = [im for name, im in none if name.startswith("photo-")]
    found = {}
    for invert in (True, False):
        found[invert] = {n for n, im in codes if rule(im, invert)}
        false = [n for n, im in none if rule(im, invert)]
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for im in photos:
                rule(im, invert)
            best = min(best, (time.process_time() - start) / len(photos) * 1000)
        print(f"first read {'with' if invert else 'without'} inversion: {len(found[invert])}/{len(codes)} codes read, "
              f"{len(false)} false of {len(none)}; {best:.2f} CPU ms a 480x360 step photo (grey + reads)")
    print("codes read only with inversion:", sorted(found[True] - found[False]),
          "only without:", sorted(found[False] - found[True]))


if __name__ == "__main__":
    main()
