"""Turn one image-API answer into a record, or into a drop reason (paper section 3.1 synthesis).

Filters, in the order they are applied (the first failing one names the drop reason):

    api_error        the request failed in a way that may pass (unreachable, 429 / 5xx after the retries, a cut
                     reply, a key / credits / region to fix: 401-404 or a 400 saying so, as Gemini's bad-key
                     answer): not a drop, the next run asks again
    api_rejected     the API refused the request itself (400 / 422: asking again gets the same answer) or answered
                     in a shape no client reads: a drop, not asked again (``--retry-dropped`` does)
    refused          the API blocked the prompt/answer, or the text is a refusal and has no image
    bad_image        an image part is not base64, not an image MIME type, not decodable, or a URL
    too_large_image  an image is over the pixel cap (decompression-bomb guard)
    low_resolution   an image's shorter side is under ``min_image_side``
    no_images        the answer holds no image at all
    too_few_images / too_many_images
    not_alternating  the answer does not read text -> image -> text -> image ...: it starts with an
                     image, two images touch, or the text before an image is under ``min_text_chars``
    empty_text       no text at all

Design choices:
- Consecutive text parts are merged first (Gemini often splits one paragraph into several parts).
- The record keeps the *question* (and the user's photo) as the user turn, not the system text
  that asked for the format: the model learns to answer the question, not to read a recipe for
  its own output format.
- Image bytes are stored as the API returned them (PNG/JPEG/WEBP), after the header check.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

from duetgen.data.images import DEFAULT_MAX_PIXELS, ImageError, inspect_image
from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.data.synthetic.image_api import GenerationResult

_REFUSAL_RE = re.compile(
    r"\b(i\s*(?:am|'m)\s*(?:sorry|unable|not able)|i\s*(?:can(?:'|no)?t|cannot|won't)\s*(?:help|assist|"
    r"generate|create|provide|do that)|as an ai\b|against my (?:guidelines|policy))", re.IGNORECASE)


@dataclass
class QualityConfig:
    min_images: int = 2  # a how-to answer illustrates at least two steps
    max_images: int = 12  # more is a runaway answer
    min_image_side: int = 256  # shorter side in pixels (Nano Banana returns ~1024 px images)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # header-checked before decoding
    min_text_chars: int = 20  # text before each image must say something (the step it shows)
    require_alternation: bool = True  # text -> image -> text -> image ...


def build_record(request: dict[str, Any], user_images: list[bytes], result: GenerationResult,
                 cfg: QualityConfig, extra_meta: dict[str, Any] | None = None) -> tuple[Record | None, str, str]:
    """(record, "", "") when the answer passes, else (None, reason code, detail)."""
    if result.status == "api_error":
        return None, "api_error" if result.transient else "api_rejected", result.error or ""
    texts_so_far = " ".join(p["text"] for p in result.parts if p["type"] == "text")
    if result.status == "blocked":
        return None, "refused", result.error or ""

    # 1. every image part must be a real image of sufficient size
    sizes = []
    for k, p in enumerate(result.parts):
        if p["type"] == "bad_image":
            return None, "bad_image", p["reason"]
        if p["type"] == "image":
            try:
                im = inspect_image(io.BytesIO(p["data"]), f"part {k}", cfg.max_image_pixels)
            except ImageError as e:
                reason = "too_large_image" if "over the cap" in str(e) or "bomb" in str(e) else "bad_image"
                return None, reason, str(e)
            w, h = im.size
            if min(w, h) < cfg.min_image_side:
                return None, "low_resolution", f"part {k} is a {w}x{h} image, shorter side under {cfg.min_image_side}"
            sizes.append([w, h])

    # 2. merge consecutive text parts, drop empty ones
    parts: list[dict] = []
    for p in result.parts:
        if p["type"] == "text":
            t = p["text"].strip()
            if not t:
                continue
            if parts and parts[-1]["type"] == "text":
                parts[-1] = {"type": "text", "text": parts[-1]["text"] + "\n\n" + t}
            else:
                parts.append({"type": "text", "text": t})
        else:
            parts.append(p)
    n_images = sum(p["type"] == "image" for p in parts)

    # 3. counts, refusals, alternation
    if n_images == 0 and _REFUSAL_RE.search(texts_so_far):
        return None, "refused", texts_so_far[:200]
    if n_images == 0:
        return None, "no_images", texts_so_far[:200]
    if n_images < cfg.min_images:
        return None, "too_few_images", f"{n_images} image(s), need {cfg.min_images}"
    if n_images > cfg.max_images:
        return None, "too_many_images", f"{n_images} images, at most {cfg.max_images}"
    if not any(p["type"] == "text" for p in parts):
        return None, "empty_text", ""
    if cfg.require_alternation:
        for k, p in enumerate(parts):
            if p["type"] != "image":
                continue
            prev = parts[k - 1] if k > 0 else None
            if prev is None:
                return None, "not_alternating", "the answer starts with an image"
            if prev["type"] == "image":
                return None, "not_alternating", f"images {k - 1} and {k} touch without text between them"
            if len(prev["text"]) < cfg.min_text_chars:
                return None, "not_alternating", f"text before image part {k} is {len(prev['text'])} chars"

    # 4. the record: the question (+ user photo) as the user turn, the answer as the assistant turn
    user_content: list = [ImagePart(b) for b in user_images] + [TextPart(request["prompt"])]
    assistant: list = [TextPart(p["text"]) if p["type"] == "text" else ImagePart(p["data"]) for p in parts]
    meta = {"request_id": request["id"], "kind": request.get("kind", "howto"), "model": result.model,
            "finish_reason": result.finish_reason, "usage": result.usage, "cost_usd": round(result.cost_usd, 6),
            "image_sizes": sizes}
    for k in ("domain", "subcategory", "origin", "title"):
        if k in request:
            meta[k] = request[k]
    meta.update(extra_meta or {})
    rec = Record(id=f"synth-{request['id']}", source="synthetic",
                 messages=[Message("user", user_content), Message("assistant", assistant)], meta=meta)
    return rec, "", ""
