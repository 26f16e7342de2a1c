"""Dish-photo requests: "how do I cook this?" with the photo as the user image (paper section 3.1).

The paper samples 15k dish images from MM-Food-100k as prompts because the synthesis model is
strong on cooking. This turns any folder of dish photos into synthesis requests.

Design choices:
- Every file is header-checked as an image (PNG/JPEG/WEBP, under the pixel cap, shorter side at
  least ``min_side``) before it becomes a request; the rest is skipped with a reason.
- The dish name, when the file is named after the dish (``grilled_steak.jpg``), goes into the
  question ("How do I cook this grilled steak?"); names that are ids or hashes give the
  untitled phrasings. A sidecar ``titles.json`` ({"file name": "title"}) overrides both.
- The question wording is drawn per photo from a small set with a seeded RNG keyed by the path,
  so adding photos never changes the wording of the others.
- Symlinks that leave the folder are skipped: a photo folder must not read files elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from pathlib import Path
from typing import Any

from duetgen.data.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, ImageError, inspect_image
from duetgen.data.synthetic.runlog import RunReport

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
TITLED = [
    "How do I cook this {title}?",
    "How do I make this {title} at home?",
    "Can you show me how to make {title} like in this photo?",
    "Here is a photo of {title}. How do I cook it?",
]
UNTITLED = [
    "How do I cook this?",
    "How do I make this dish at home?",
    "Can you show me how to cook the dish in this photo?",
    "I had this dish at a restaurant. How can I make it myself?",
]
_TITLE_RE = re.compile(r"^[a-z][a-z' -]*[a-z]$")


def title_from_name(stem: str) -> str | None:
    """'grilled_steak-02' -> 'grilled steak'; ids and hashes ('000123', 'a3f9c0d1') -> None."""
    words = re.sub(r"[_\-.]+", " ", stem.lower())
    words = re.sub(r"\b\d+\b", " ", words)
    words = " ".join(words.split())
    if not _TITLE_RE.match(words) or any(ch.isdigit() for ch in words):
        return None
    if len(words.replace(" ", "")) < 3 or re.fullmatch(r"[0-9a-f]{8,}", words.replace(" ", "")):
        return None
    return words


def dish_requests(photo_dir: str | Path, seed: int = 0, min_side: int = 256, limit: int | None = None,
                  report: RunReport | None = None) -> list[dict[str, Any]]:
    """One request per usable photo, sorted by path. Image paths are relative to ``photo_dir``."""
    root = Path(photo_dir)
    if not root.is_dir():
        raise ImageError(f"dish photo folder {str(root)!r} does not exist or is not a directory")
    report = report or RunReport("dish-prompts")
    titles = _load_titles(root)
    root_resolved = root.resolve()
    out = []
    entries = sorted(root.rglob("*"))
    seen: dict[Path, str] = {p.resolve(): p.relative_to(root).as_posix()  # a link to one of these asks nothing new
                             for p in entries if not p.is_symlink() and p.is_file() and not p.name.startswith(".")}
    for p in entries:
        if p.name == "titles.json" or p.name.startswith(".") or p.is_dir():
            continue
        rel = p.relative_to(root).as_posix()
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # a name from another encoding: it could not travel in the requests' JSON
            report.skip(rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "bad_file_name",
                        "the file name is not valid UTF-8")
            continue
        if p.suffix.lower() not in PHOTO_SUFFIXES:
            report.skip(rel, "not_a_photo_file", f"suffix {p.suffix!r}")
            continue
        real = p.resolve()
        if not real.is_relative_to(root_resolved):
            report.skip(rel, "outside_folder", "symlink leaves the photo folder")
            continue
        if not real.is_file():  # a FIFO, a device, a dangling or looping symlink
            report.skip(rel, "not_a_regular_file", "not a regular file")
            continue
        if p.is_symlink() and real in seen:
            report.skip(rel, "duplicate_photo", f"a link to {seen[real]!r}")
            continue
        seen[real] = rel
        size = real.stat().st_size
        if size > DEFAULT_MAX_IMAGE_BYTES:
            report.skip(rel, "too_large", f"{size:,} bytes, over the cap of {DEFAULT_MAX_IMAGE_BYTES:,}")
            continue
        try:
            with open(real, "rb") as f:
                im = inspect_image(io.BytesIO(f.read(DEFAULT_MAX_IMAGE_BYTES)), f"photo {rel!r}", DEFAULT_MAX_PIXELS,
                                   decode=True)
        except (ImageError, OSError) as e:
            report.skip(rel, "not_an_image", str(e))
            continue
        if im.format not in ("PNG", "JPEG", "MPO", "WEBP"):
            report.skip(rel, "not_an_image", f"format {im.format}")
            continue
        if min(im.size) < min_side:
            report.skip(rel, "low_resolution", f"{im.size[0]}x{im.size[1]}, shorter side under {min_side}")
            continue
        title = titles.get(rel) or titles.get(p.name) or title_from_name(p.stem)
        rng = random.Random(f"{seed}/{rel}")
        prompt = rng.choice(TITLED).format(title=title) if title else rng.choice(UNTITLED)
        req = {"id": "dish-" + hashlib.sha256(rel.encode()).hexdigest()[:16], "prompt": prompt, "kind": "dish",
               "images": [rel], "domain": "cooking", "photo": rel}
        if title:
            req["title"] = title
        out.append(req)
        report.count("requests")
        if limit is not None and len(out) >= limit:
            break
    return out


MAX_TITLES_BYTES = 16 << 20


def _load_titles(root: Path) -> dict[str, str]:
    """``titles.json`` beside the photos: a regular file inside the folder (a symlink out, a FIFO, a device
    are refused), at most 16 MiB, mapping file names to titles."""
    path = root / "titles.json"
    if not path.exists() and not path.is_symlink():
        return {}
    if not path.resolve().is_relative_to(root.resolve()) or not path.resolve().is_file():
        raise ImageError(f"{path}: must be a regular file inside the photo folder")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TITLES_BYTES + 1)
        if len(raw) > MAX_TITLES_BYTES:
            raise ImageError(f"{path}: over the cap of {MAX_TITLES_BYTES:,} bytes")
        d = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ImageError(f"{path}: not readable JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:  # (UTF-8, JSON, a 4,300-digit integer)
        raise ImageError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise ImageError(f"{path}: must map file names to title strings")
    return {k: " ".join(v.split()) for k, v in d.items() if v.strip()}
