"""What flows through the data engine: a page document, and the per-stage funnel counters.

Design choices:
- A page in flight is a ``Doc`` (datatrove's Document): an ordered list of text and image items
  taken from the page body, so "keep each image where it stood" is just list order. Only the last
  stage turns it into the one ``Record`` type (DESIGN section 3).
- Every drop carries a reason code (STYLE principle 1): a whole page through ``StageStats.drop_page``,
  one image through ``StageStats.drop_image`` (the image also leaves ``doc.items``). Reason codes
  are short snake_case strings; a human detail goes next to them, and a few examples per reason
  are kept (with a thumbnail for images) for the funnel report.
- ``group`` ties items of one step container (an ``<li>`` or a ``.step`` block) together, so the
  reorder stage can move a step's picture after its text.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

MAX_EXAMPLES_PER_REASON = 3


@dataclass
class TextItem:
    text: str
    kind: str = "paragraph"  # "heading" | "paragraph" | "step" (item of an ordered list) | "list"
    level: int = 0  # heading level 1-6; 0 otherwise
    group: int | None = None  # step container id (see module docstring)
    cleaned: str | None = None  # clean_block(text), made once in pass 1 (language.page_text); clean_text reads it


THUMB_SIDE = 64  # px, a funnel example's thumbnail


@dataclass
class ImageItem:
    src: str  # as written in the page
    alt: str = ""
    group: int | None = None
    hints: str = ""  # class/id/filename words used by the icon/logo/ad rules
    url: str | None = None  # absolute URL after resolution against the page's base URL
    file: str | None = None  # or, for a saved page, the image file's path relative to the input folder
    warc: str | None = None  # or, for a WARC input, "file.warc.gz@offset" of the crawl's image response
    data: bytes | None = None  # fetched encoded bytes, decoded in full once (images.VerifiedImageBytes)
    image: Any = None  # decoded RGB PIL image; a large JPEG's at a DCT scale (FetchConfig.decode_side)
    grey: Any = None  # its grey ("L") version, made once by the image rules (the pHash reads it too)
    phash: int | None = None
    verdict: tuple[str, str] | None = None  # a header rule's drop, decided before decoding (the fetch stage)
    caption: str | None = None  # from the MLLM, when configured
    category: str | None = None  # natural_photo | gui_screenshot | document_page | chart | other

    @property
    def size(self) -> tuple[int, int] | None:
        """The file's own (width, height), from its header: ``image`` may be decoded smaller."""
        return None if self.data is None else self.data.size

    def preview(self, side: int = THUMB_SIDE):
        """The decoded image, for a funnel example's ``side`` px thumbnail; bytes a header rule dropped undecoded are
        decoded now, a JPEG at the DCT scale the thumbnail needs (None if they do not decode). Their header passed
        the run's pixel cap, so their own size is the cap here."""
        if self.image is not None or self.data is None or isinstance(self.data, bytes):
            return self.image
        from duetgen.data.images import decode_image_bytes

        w, h = self.data.size
        try:
            return decode_image_bytes(self.data.data, self.src[:200], max_pixels=w * h, min_side=side)[1]
        except Exception:  # a corrupt image that a header rule dropped: no thumbnail
            return None


Item = TextItem | ImageItem


@dataclass
class Doc:
    id: str
    url: str | None  # the page's URL (a WARC record's target URI; None: relative images cannot be fetched)
    html: str | bytes | None = None  # raw page until extraction, then None (memory)
    title: str = ""
    items: list[Item] = field(default_factory=list)
    source: str = "web"
    meta: dict[str, Any] = field(default_factory=dict)
    record: Any = None  # the finished duetgen Record, set by the dialogue stage
    # A page read from a folder (``--input DIR``) without a ``<base href>``: its relative images are
    # files read from ``local_root / dirname(local_page)``, never from outside ``local_root``.
    local_root: str | None = None  # the input folder
    local_page: str | None = None  # the page's path relative to it
    # where the page's relative image links resolve when its <base href> says other than ``url`` (the page keeps
    # its own URL: a site's <base href="/"> made every page's URL the site root; session 14 audit)
    base_url: str | None = None
    pos: int = 0  # position in its shard's reading order (runner.py: pass 2 finds pass 1's pages by it)
    # Pass 1: the cleaned body text the language and near-dup checks read (language.page_text), set once
    # by the language filter; cleaning it again for the MinHash cost 3 ms a page (benchmarks/data_engine.py).
    clean_text: str | None = None

    @property
    def images(self) -> list[ImageItem]:
        return [x for x in self.items if isinstance(x, ImageItem)]

    @property
    def texts(self) -> list[TextItem]:
        return [x for x in self.items if isinstance(x, TextItem)]

    def text_chars(self) -> int:
        return sum(len(t.text) for t in self.texts)

    def markdown(self) -> str:
        """The page body as Markdown, images in place (``![alt](url)``)."""
        out, step = [], 0
        for x in self.items:
            if isinstance(x, ImageItem):
                out.append(f"![{x.alt}]({x.url or x.src})")
            elif x.kind == "heading":
                out.append("#" * max(1, x.level) + " " + x.text)
            elif x.kind == "step":
                step += 1
                out.append(f"{step}. {x.text}")
            elif x.kind == "list":
                out.append(f"- {x.text}")
            else:
                out.append(x.text)
        return "\n\n".join(out)


def thumbnail_data_url(img: Any, side: int = THUMB_SIDE) -> str | None:
    """A tiny JPEG data URL of a PIL image, for the funnel report's examples."""
    if img is None:
        return None
    t = img.copy()
    t.thumbnail((side, side))
    buf = io.BytesIO()
    t.convert("RGB").save(buf, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class StageStats:
    """Counters of one stage over the pages it saw (summed across shards by ``merge``)."""

    name: str
    pages_in: int = 0
    pages_out: int = 0
    images_in: int = 0
    images_out: int = 0
    page_drops: Counter = field(default_factory=Counter)
    image_drops: Counter = field(default_factory=Counter)
    text_drops: Counter = field(default_factory=Counter)  # text blocks removed (clean-up stage)
    llm: Counter = field(default_factory=Counter)  # requests, cached, prompt_tokens, completion_tokens, errors
    counts: Counter = field(default_factory=Counter)  # what a stage saw, e.g. "language:en" (not drops)
    examples: dict[str, list[dict]] = field(default_factory=dict)  # "page:reason" / "image:reason" -> examples

    def drop_page(self, doc: Doc, reason: str, detail: str = "") -> None:
        self.page_drops[reason] += 1
        self._example(f"page:{reason}", {"doc": doc.id, "url": doc.url, "title": doc.title, "detail": detail[:300]})

    def drop_image(self, doc: Doc, item: ImageItem, reason: str, detail: str = "") -> None:
        self.image_drops[reason] += 1
        # the thumbnail (copy, resize, JPEG) only for an example the funnel keeps, not for every drop
        if len(self.examples.get(f"image:{reason}", ())) < MAX_EXAMPLES_PER_REASON:
            self._example(f"image:{reason}", {"doc": doc.id, "src": item.src[:300], "detail": detail[:300],
                                              "thumb": thumbnail_data_url(item.preview())})

    def drop_text(self, doc: Doc, text: str, reason: str) -> None:
        self.text_drops[reason] += 1
        self._example(f"text:{reason}", {"doc": doc.id, "text": text[:200]})

    def _example(self, key: str, ex: dict) -> None:
        lst = self.examples.setdefault(key, [])
        if len(lst) < MAX_EXAMPLES_PER_REASON:
            lst.append(ex)

    def to_json(self) -> dict:
        return {"name": self.name, "pages_in": self.pages_in, "pages_out": self.pages_out,
                "images_in": self.images_in, "images_out": self.images_out,
                "page_drops": dict(self.page_drops), "image_drops": dict(self.image_drops),
                "text_drops": dict(self.text_drops), "llm": dict(self.llm), "counts": dict(self.counts),
                "examples": self.examples}

    @classmethod
    def from_json(cls, d: dict) -> "StageStats":
        return cls(d["name"], d["pages_in"], d["pages_out"], d["images_in"], d["images_out"],
                   Counter(d["page_drops"]), Counter(d["image_drops"]), Counter(d["text_drops"]), Counter(d["llm"]),
                   Counter(d.get("counts", {})), {k: list(v) for k, v in d["examples"].items()})

    def merge(self, other: "StageStats") -> None:
        self.pages_in += other.pages_in
        self.pages_out += other.pages_out
        self.images_in += other.images_in
        self.images_out += other.images_out
        self.page_drops.update(other.page_drops)
        self.image_drops.update(other.image_drops)
        self.text_drops.update(other.text_drops)
        self.llm.update(other.llm)
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            lst = self.examples.setdefault(k, [])
            lst.extend(v[: MAX_EXAMPLES_PER_REASON - len(lst)])


def counted(docs: Iterable[Doc], stats: StageStats, side: str) -> Iterator[Doc]:
    """Pass docs through, counting pages and images on the ``in`` or ``out`` side of a stage."""
    for d in docs:
        n = sum(1 for x in d.items if isinstance(x, ImageItem))
        if side == "in":
            stats.pages_in += 1
            stats.images_in += n
        else:
            stats.pages_out += 1
            stats.images_out += n
        yield d
