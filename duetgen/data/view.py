"""Static HTML pages that show interleaved records as chats (datasets, generation outputs, eval reports).

    render_dataset_html(root, "page.html")        -> page.html, page-page-0002.html, ...
    render_record_html(record, image_src)         -> one record's <article> fragment
    page_html(title, body)                        -> a complete page with the shared stylesheet

Design choices:
- Records are untrusted: every string that reaches the page (ids, text, roles, meta, image
  sources) goes through ``html.escape``; nothing is ever inserted as markup.
- Text and images appear inline, in conversation order, inside one bubble per message; an image
  in an assistant turn is a generation target (DESIGN section 3) and is marked as one, or, in a
  record a model wrote (``meta.generation``: `duetgen generate`, the demo, eval answers), as a
  generated image.
- Images are linked by a path relative to the page's folder, so a page opened from disk works and
  the dataset stays the one copy of the bytes; ``embed=True`` inlines them as data URIs for a page
  that must stand alone (mail it, attach it to a report).
- An image that cannot be shown (missing, outside the root, not an image of an allowed format, over
  the pixel cap, past the page's embedding budget) and a record line that is not a valid record
  become a visible red box naming the problem instead of aborting the page: a viewer exists to look
  at broken data. A text part shows its first ``MAX_TEXT_SHOWN`` characters (a browser lays out a
  megabyte of unbroken text for minutes), with a note of how many more the record holds.
- One self-contained stylesheet, no scripts, no external assets.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from PIL import Image
from rich.console import Console
from rich.progress import track

from duetgen.data.dataset import IMAGE_DIR, MANIFEST, SHARD_DIR, Dataset, DatasetError, atomic_write_bytes
from duetgen.data.images import ImageError, inspect_image
from duetgen.data.record import ImagePart, Record, RecordError

MAX_TEXT_SHOWN = 20_000  # characters of one text part on a page
EMBED_BYTES_PER_PAGE = 64 << 20  # --embed: one image linked 200 times would otherwise be inlined 200 times

CSS = """
:root { --bg:#f4f5f7; --card:#fff; --ink:#1d2330; --muted:#667085; --line:#e3e6ec;
        --user:#e6f0ff; --user-line:#b9d3ff; --asst:#ffffff; --sys:#f1efe8; --target:#d9480f; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header.page { position:sticky; top:0; z-index:1; background:#1d2330; color:#fff; padding:10px 24px;
              display:flex; gap:16px; align-items:baseline; flex-wrap:wrap; }
header.page h1 { font-size:17px; margin:0; font-weight:600; }
header.page .sub { color:#c3c8d4; font-size:13px; }
main { max-width:980px; margin:0 auto; padding:16px 24px 48px; }
nav.pages { display:flex; gap:6px; flex-wrap:wrap; margin:12px 0; font-size:14px; align-items:center; }
nav.pages a, nav.pages span { padding:3px 9px; border-radius:6px; border:1px solid var(--line);
                              background:var(--card); color:var(--ink); text-decoration:none; }
nav.pages a:hover { border-color:#98a2b3; }
nav.pages .current { background:#1d2330; color:#fff; border-color:#1d2330; }
nav.pages .gap, nav.pages .off { border:none; background:none; color:var(--muted); }
article.record { background:var(--card); border:1px solid var(--line); border-radius:12px;
                 padding:14px 18px; margin:18px 0; box-shadow:0 1px 2px rgba(16,24,40,.05); }
article.record > h2 { font-size:14px; margin:0 0 10px; font-weight:600; display:flex; gap:10px;
                      align-items:baseline; flex-wrap:wrap; }
.rid { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; }
.idx { color:var(--muted); font-weight:400; }
.source { font-size:12px; font-weight:500; color:#344054; background:#eef0f4; border-radius:999px;
          padding:1px 9px; }
.msg { display:flex; flex-direction:column; margin:10px 0; }
.msg .role { font-size:11px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted);
             margin:0 4px 2px; }
.bubble { border-radius:12px; padding:9px 13px; max-width:86%; border:1px solid var(--line);
          overflow-wrap:anywhere; }
.msg.user { align-items:flex-end; }
.msg.user .bubble { background:var(--user); border-color:var(--user-line); }
.msg.assistant { align-items:flex-start; }
.msg.assistant .bubble { background:var(--asst); }
.msg.system { align-items:stretch; }
.msg.system .bubble { background:var(--sys); max-width:100%; font-size:13px; color:#4a4a3f;
                      font-style:italic; }
.text { white-space:pre-wrap; }
figure { margin:8px 0; display:inline-block; vertical-align:top; }
figure img { display:block; max-width:100%; max-height:420px; min-width:128px; border-radius:6px;
             border:1px solid var(--line); background:#fff; }
figure.target img { outline:3px dashed var(--target); outline-offset:2px; }
figcaption { font-size:11px; color:var(--muted); margin-top:4px; }
figure.target figcaption { color:var(--target); font-weight:600; }
figure.generated img { outline:2px solid var(--user-line); outline-offset:2px; }
.broken { border:1px solid #f04438; background:#fef3f2; color:#b42318; border-radius:6px; padding:6px 9px;
          font-size:13px; margin:6px 0; }
details.meta { margin-top:10px; font-size:13px; }
details.meta summary { cursor:pointer; color:var(--muted); }
details.meta pre { background:#f8f9fb; border:1px solid var(--line); border-radius:8px; padding:10px;
                   overflow:auto; max-height:360px; font-size:12px; white-space:pre-wrap; }
"""

ImageSource = Callable[[str], str]


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def page_html(title: str, body: str, subtitle: str = "") -> str:
    """A complete, self-contained page (shared stylesheet) around ``body`` (already-escaped HTML)."""
    sub = f'<span class="sub">{esc(subtitle)}</span>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
        f'<header class="page"><h1>{esc(title)}</h1>{sub}</header>\n<main>\n{body}\n</main></body></html>\n'
    )


IMAGE_KINDS = {"input": "input image", "target": "generation target", "generated": "generated image"}


def _image_html(part: ImagePart, image_src: ImageSource, kind: str) -> str:
    """``kind``: a key of ``IMAGE_KINDS`` (the figure's class and caption)."""
    label = IMAGE_KINDS[kind]
    path = part.image if isinstance(part.image, str) else "<in-memory image>"
    try:
        src = image_src(path)
    except RecordError as e:  # visible in place, so the rest of the page still helps debugging
        return f'<div class="broken">image cannot be shown: {esc(e)}</div>'
    return (f'<figure class="{kind}"><img src="{esc(src)}" alt="{esc(label)}: {esc(path)}" title="{esc(path)}" '
            f'loading="lazy"><figcaption>{esc(label)}</figcaption></figure>')


def _text_html(text: str) -> str:
    if len(text) <= MAX_TEXT_SHOWN:
        return f'<div class="text">{esc(text)}</div>'
    return (f'<div class="text">{esc(text[:MAX_TEXT_SHOWN])}</div>'
            f'<div class="broken">&hellip; {len(text) - MAX_TEXT_SHOWN:,} more characters not shown</div>')


def render_record_html(record: Record, image_src: ImageSource, index: int | None = None) -> str:
    """One record as an ``<article>``: header, chat bubbles with inline text and images, collapsible meta.

    ``image_src(path)`` turns a record's image path into the ``src`` of an ``<img>`` (a relative
    URL or a data URI); it may raise RecordError, which is shown in place of that image.
    """
    idx = f'<span class="idx">#{index}</span>' if index is not None else ""
    out = [f'<article class="record" id="{esc("rec-" + record.id)}">',
           f'<h2>{idx}<span class="rid">{esc(record.id)}</span><span class="source">{esc(record.source)}</span></h2>']
    answer_kind = "generated" if isinstance(record.meta, dict) and "generation" in record.meta else "target"
    for m in record.messages:
        parts = []
        for p in m.content:
            if isinstance(p, ImagePart):
                parts.append(_image_html(p, image_src, answer_kind if m.role == "assistant" else "input"))
            else:
                parts.append(_text_html(p.text))
        out.append(f'<div class="msg {esc(m.role)}"><div class="role">{esc(m.role)}</div>'
                   f'<div class="bubble">{"".join(parts)}</div></div>')
    if record.meta:
        meta = json.dumps(record.meta, indent=2, ensure_ascii=False, sort_keys=True)
        out.append(f'<details class="meta"><summary>meta</summary><pre>{esc(meta)}</pre></details>')
    out.append("</article>")
    return "\n".join(out)


def _page_path(out_path: Path, page: int) -> Path:
    """Page 1 is ``out_path`` itself; page k > 1 is ``<stem>-page-000k<suffix>`` next to it."""
    if page == 1:
        return out_path
    return out_path.with_name(f"{out_path.stem}-page-{page:04d}{out_path.suffix or '.html'}")


def _nav_html(out_path: Path, page: int, num_pages: int) -> str:
    if num_pages <= 1:
        return ""
    href = lambda k: esc(quote(_page_path(out_path, k).name))  # noqa: E731
    prev_off, next_off = '<span class="off">&larr; prev</span>', '<span class="off">next &rarr;</span>'
    items = [f'<a href="{href(page - 1)}" rel="prev">&larr; prev</a>' if page > 1 else prev_off]
    shown = sorted({1, num_pages, *range(max(1, page - 3), min(num_pages, page + 3) + 1)})
    last = 0
    for k in shown:
        if k > last + 1:
            items.append('<span class="gap">&hellip;</span>')
        items.append(f'<span class="current">{k}</span>' if k == page else f'<a href="{href(k)}">{k}</a>')
        last = k
    items.append(f'<a href="{href(page + 1)}" rel="next">next &rarr;</a>' if page < num_pages else next_off)
    return f'<nav class="pages">{"".join(items)}</nav>'


def dataset_image_src(ds: Dataset, page_dir: Path, embed: bool = False,
                      embed_budget: int = EMBED_BYTES_PER_PAGE) -> ImageSource:
    """``image_src`` for records of ``ds`` shown on one page in ``page_dir`` (checks containment, format
    and pixel cap from the header; with ``embed``, at most ``embed_budget`` bytes inlined in all).

    It takes the record id as an optional second argument, for the error shown in place of a broken image.
    """
    page_dir = Path(os.path.abspath(page_dir))
    spent = 0

    def src(path: str, record_id: str = "?") -> str:
        nonlocal spent
        if embed:
            data = ds.read_image_bytes(path, record_id)  # containment, existence, format and pixel cap
            if spent + len(data) > embed_budget:
                raise ImageError(f"record {record_id!r}: image {path!r} not embedded: the page's images would pass "
                                 f"{embed_budget:,} bytes (view without --embed, or with a smaller --per-page)")
            spent += len(data)
            mime = Image.MIME[Image.open(io.BytesIO(data)).format]  # header only; the format was checked
            return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        p = ds.image_path(path, record_id)  # containment (symlinks resolved) and existence
        with open(p, "rb") as f:  # the header: the browser is not handed an SVG or a 900-megapixel bomb
            inspect_image(f, f"record {record_id!r}: image {path!r}", ds.max_pixels, decode=False)
        rel = os.path.relpath(os.path.abspath(ds.root / path), page_dir)
        return quote(rel.replace(os.sep, "/"))

    return src


def render_dataset_html(dataset_root: str | os.PathLike, out_path: str | os.PathLike, per_page: int = 50,
                        limit: int | None = None, embed: bool = False, progress: bool = True) -> list[Path]:
    """Write the dataset as chat pages: ``out_path`` (page 1) and ``<stem>-page-NNNN.html`` after it.

    Returns the paths written, in page order. Records are streamed; one page is held at a time.
    """
    if per_page < 1:
        raise ValueError(f"per_page must be a positive integer, got {per_page!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    ds = Dataset(dataset_root)
    out_path = Path(out_path)
    root, target = ds.root.resolve(), out_path.resolve()
    if target in (root / MANIFEST, root / ".writer.lock") or any(target.is_relative_to(root / d)
                                                                 for d in (SHARD_DIR, IMAGE_DIR)):
        raise DatasetError(f"{str(out_path)!r} is one of the dataset's own files (its manifest, shards or images); "
                           "write the page beside them")  # (--out ds/manifest.json replaced the manifest)
    if out_path.is_dir():
        raise DatasetError(f"{str(out_path)!r} is a folder; give the page's file name, e.g. {out_path / 'index.html'}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    total = len(ds) if limit is None else min(limit, len(ds))
    num_pages = max(1, -(-total // per_page))
    title = f"dataset {ds.name or ds.root.name}"
    written: list[Path] = []

    def write_page(page: int, fragments: list[str]) -> None:
        first = (page - 1) * per_page
        sub = f"{len(ds)} records"
        if fragments:
            sub += f" · page {page}/{num_pages} · records {first + 1}-{first + len(fragments)}"
        nav = _nav_html(out_path, page, num_pages)
        body = nav + "\n" + ("\n".join(fragments) or "<p>This dataset has no records.</p>") + "\n" + nav
        path = _page_path(out_path, page)
        atomic_write_bytes(path, page_html(title, body, subtitle=sub).encode("utf-8"))
        written.append(path)

    def records_and_errors():
        """Records, and for a line that is not a valid record the error naming it, in file order."""
        errors: list[str] = []
        for k in range(len(ds.shards)):
            for rec in ds.iter_shard(k, on_error=errors.append):
                yield from errors
                errors.clear()
                yield rec
            yield from errors
            errors.clear()

    fragments: list[str] = []
    image_src = dataset_image_src(ds, out_path.parent, embed=embed)  # one per page: the embedding budget
    items = (r for i, r in zip(range(total), records_and_errors()))
    for i, rec in enumerate(track(items, total=total, description="render html",
                                  disable=not progress, console=Console(stderr=True))):
        if isinstance(rec, str):
            fragments.append(f'<article class="record"><div class="broken">#{i + 1}: record cannot be shown: '
                             f'{esc(rec)}</div></article>')
        else:
            fragments.append(render_record_html(rec, lambda path: image_src(path, rec.id), index=i + 1))
        if len(fragments) == per_page:
            write_page(len(written) + 1, fragments)
            fragments = []
            image_src = dataset_image_src(ds, out_path.parent, embed=embed)
    if fragments or not written:
        write_page(len(written) + 1, fragments)

    # Pages left by an earlier, longer render would link into a different set: remove them.
    stale_re = re.compile(rf"^{re.escape(out_path.stem)}-page-(\d{{4,}}){re.escape(out_path.suffix or '.html')}$")
    for p in out_path.parent.iterdir():
        m = stale_re.match(p.name)
        if m and int(m.group(1)) > len(written):
            p.unlink()
    return written
