"""HTML page -> main body as an ordered list of text and image items (Markdown with images in place).

Design choices:
- A DOM walk over lxml, not trafilatura: we need every ``<img>`` at its exact position and the step
  container it sits in (for the reorder stage); a DOM walk gives both deterministically and with
  no extra dependency. (trafilatura keeps images only where its text heuristics keep the block.)
- Boilerplate goes before the main body is chosen: script/style/forms/iframes, ``nav``, ``aside``,
  page-level ``header``/``footer`` (kept inside ``article``/``main``, where wikiHow-style pages put
  the title), ARIA landmarks that are not content, hidden elements, and elements whose class/id
  words name navigation, sharing, comments, related links, cookie/newsletter boxes or ads.
- Main body: the ``article`` / ``main`` / ``[role=main]`` / ``[itemprop=articleBody]`` with most
  text, else ``body``.
- Decoding (bytes input): BOM, then ``<meta charset>`` / http-equiv in the first 4 KiB, then
  strict UTF-8, then windows-1252 (the WHATWG default for undeclared legacy pages).
- Hostile input: a byte cap before parsing; lxml with ``huge_tree`` still stops building the tree
  at depth 2048 and silently drops the rest, so a page that reaches that depth is refused
  (``too_deeply_nested``) instead of being half-extracted. The walk itself is iterative.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import lxml.etree
import lxml.html
import webencodings

from duetgen.data.engine.document import Doc, ImageItem, TextItem

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")
# characters lxml refuses in a text node (NUL, C0 controls but tab / newline / CR, U+FFFE / U+FFFF, surrogates): the
# HTML parser keeps them, and editing the tree (dropping boilerplate joins its tail text) then raised ValueError
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_CHAR_REF = re.compile(r"&#(?:[xX]([0-9a-fA-F]{1,8})|([0-9]{1,10}));?")  # the parser turns these into characters too
_WS = re.compile(r"[ \t\r\f\v\u00a0]+")


def _no_bad_char_ref(m: re.Match) -> str:
    """A character reference to a character lxml refuses -> nothing; any other is kept."""
    code = int(m[1], 16) if m[1] else int(m[2])
    bad = (code < 0x20 and code not in (0x9, 0xA, 0xD)) or code in (0xFFFE, 0xFFFF) or 0xD800 <= code <= 0xDFFF
    return "" if bad or code > 0x10FFFF else m[0]

DROP_TAGS = {"script", "style", "noscript", "template", "iframe", "object", "embed", "form", "button", "input",
             "select", "textarea", "svg", "canvas", "video", "audio", "map", "nav", "aside", "dialog", "head"}
PAGE_LEVEL_TAGS = {"header", "footer"}  # dropped unless inside article/main
NON_CONTENT_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "dialog", "alert"}
BOILERPLATE_WORDS = {
    "nav", "navbar", "navigation", "menu", "footer", "sidebar", "share", "sharing", "sharebar", "social",
    "comment", "comments", "related", "breadcrumb", "breadcrumbs", "cookie", "cookies", "newsletter",
    "subscribe", "advert", "advertisement", "ad", "ads", "adsbygoogle", "sponsor", "sponsored", "promo",
    "popup", "modal", "masthead", "toolbar", "pagination", "signup", "login",
}
BLOCK_TAGS = {"p", "div", "section", "article", "main", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6",
              "figure", "figcaption", "blockquote", "pre", "table", "tr", "td", "th", "dl", "dt", "dd", "header",
              "footer", "hr", "body", "html", "center", "details", "summary", "caption"}
MAX_DEPTH = 2000  # lxml's hard stop is 2048 (huge_tree); reaching near it means a truncated tree


class ExtractError(ValueError):
    """A page that cannot be extracted. ``reason`` is the drop reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class ExtractConfig:
    max_html_bytes: int = 5_000_000  # pages above this are refused before parsing (a 50 MB page is hostile)


# WHATWG Encoding: a label names the encoding browsers decode with (webencodings holds the standard's table:
# iso-8859-1 and ascii are windows-1252, Shift_JIS is Windows-31J, x-sjis and windows-874 are labels too), and a
# label outside it is unknown, even where Python has a codec of that name (base64, rot13, hex, zlib: not text
# codecs at all, a page naming one stopped the run; utf-7). GBK decodes with the gb18030 decoder; "replacement"
# (iso-2022-kr, hz-gb-2312) and x-user-defined decode no text.
_NO_TEXT = {"replacement", "x-user-defined"}


def web_codec(label: str) -> str | None:
    """The Python codec a browser would decode a charset label with, or None for a label that names no text
    encoding. A label outside the WHATWG table that Python reads as a text codec (``cp949``, ``euc_jp``,
    ``big5hkscs``: pages written by Python-minded tools say so) is read as that codec, mapped through the table
    by its canonical name (``euc_kr`` -> cp949, as browsers read EUC-KR); UTF-7 never (browsers refuse it)."""
    label = label.strip().strip("\"'")
    encoding = webencodings.lookup(label)
    if encoding is None:
        try:
            info = codecs.lookup(label)
        except LookupError:
            return None
        if not getattr(info, "_is_text_encoding", True) or info.name == "utf-7":  # base64, hex, rot13, zlib
            return None
        encoding = webencodings.lookup(info.name.replace("_", "-"))
        if encoding is None:
            return info.name
    if encoding.name in _NO_TEXT:
        return None
    return "gb18030" if encoding.name == "gbk" else encoding.codec_info.name


def decode_html(data: bytes) -> tuple[str, str]:
    """(text, encoding used) following the order in the module docstring."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return data.decode(enc, errors="replace"), enc
    m = _META_CHARSET.search(data[:4096])
    if m:
        enc = web_codec(m.group(1).decode("ascii", "ignore"))
        if enc in ("utf-16-le", "utf-16-be"):  # WHATWG: a <meta> that says UTF-16 is wrong (the bytes it sits in
            enc = "utf-8"                       # are ASCII-compatible): UTF-8
        if enc is not None:
            return data.decode(enc, errors="replace"), enc
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), "cp1252"


def _words(el) -> set[str]:
    s = f"{el.get('class', '')} {el.get('id', '')}".lower()
    return set(re.split(r"[\s_\-]+", s)) - {""}


def _is_boilerplate(el, in_content: bool) -> bool:
    tag = el.tag
    if tag in DROP_TAGS:
        return True
    if tag in PAGE_LEVEL_TAGS and not in_content:
        return True
    if (el.get("role") or "").lower() in NON_CONTENT_ROLES:
        return True
    if el.get("hidden") is not None or (el.get("aria-hidden") or "").lower() == "true":
        return True
    style = (el.get("style") or "").replace(" ", "").lower()
    if "display:none" in style or "visibility:hidden" in style:
        return True
    return bool(_words(el) & BOILERPLATE_WORDS)


def _strip_boilerplate(root) -> None:
    # Walk top-down; a removed subtree is not visited. Iterative (the page may be deep).
    stack = [(root, False)]
    doomed = []
    while stack:
        el, in_content = stack.pop()
        for child in el:
            if not isinstance(child.tag, str):  # comments, processing instructions
                doomed.append(child)
                continue
            if _is_boilerplate(child, in_content):
                doomed.append(child)
            else:
                stack.append((child, in_content or child.tag in ("article", "main")))
    for el in doomed:
        el.drop_tree()  # keeps the tail text, which belongs to the parent


def _max_depth(root) -> int:
    deepest, stack = 0, [(root, 0)]
    while stack:
        el, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in el)
    return deepest


def _text_len(el) -> int:
    return len(" ".join(el.itertext()).split())


def _main_root(tree):
    for xp in ("//article", "//main", "//*[@role='main']", "//*[@itemprop='articleBody']"):
        cands = tree.xpath(xp)
        if cands:
            return max(cands, key=_text_len)
    body = tree.find("body")
    return body if body is not None else tree


def _image_src(el) -> str:
    src = (el.get("src") or "").strip()
    lazy = next((el.get(a).strip() for a in ("data-src", "data-original", "data-lazy-src") if el.get(a)), "")
    if lazy and (not src or src.startswith("data:")):  # lazy-loading placeholder
        return lazy
    if not src and el.get("srcset"):
        return el.get("srcset").split(",")[-1].strip().split(" ")[0]
    return src


def _title(tree) -> str:
    h1 = tree.xpath("//article//h1|//main//h1") or tree.xpath("//h1")
    if h1:
        t = " ".join(" ".join(h1[0].itertext()).split())
        if t:
            return t
    t = tree.findtext(".//title") or ""
    t = " ".join(t.split())
    # "How to Bathe a Cat - wikiHow" / "Bathe a Cat | Site": keep the part before the site name.
    for sep in (" | ", " - ", " – ", " — "):
        if sep in t:
            t = t.split(sep)[0]
    return t


def _base_url(tree, url: str | None) -> str | None:
    base = tree.xpath("//base/@href")
    if base:
        return urljoin(url or "", base[0].strip()) if url or urlsplit(base[0]).scheme else url
    if url:
        return url
    for xp in ("//link[@rel='canonical']/@href", "//meta[@property='og:url']/@content"):
        v = tree.xpath(xp)
        if v and urlsplit(v[0].strip()).scheme in ("http", "https"):
            return v[0].strip()
    return None


def extract(doc: Doc, cfg: ExtractConfig) -> Doc:
    """Fill ``doc.title``, ``doc.items`` and ``doc.base_url`` (``doc.url`` too when the page came without one) from
    ``doc.html``. Raises ExtractError."""
    raw = doc.html
    if raw is None:
        raise ExtractError("empty_page", "no HTML")
    size = len(raw.encode("utf-8", "ignore")) if isinstance(raw, str) else len(raw)
    if size > cfg.max_html_bytes:
        raise ExtractError("page_too_large", f"{size:,} bytes > cap {cfg.max_html_bytes:,}")
    if isinstance(raw, bytes):
        text, enc = decode_html(raw)
        doc.meta["encoding"] = enc
    else:
        text = raw
    text = _CHAR_REF.sub(_no_bad_char_ref, _NOT_XML.sub("", _XML_DECL.sub("", text)))
    if not text.strip():
        raise ExtractError("empty_page", "page has no content")
    try:
        tree = lxml.html.document_fromstring(text, parser=lxml.html.HTMLParser(huge_tree=True))
    except (lxml.etree.ParserError, ValueError) as e:
        raise ExtractError("parse_error", str(e)) from None
    if _max_depth(tree) >= MAX_DEPTH:
        raise ExtractError("too_deeply_nested", f"element nesting reaches {MAX_DEPTH}; the parser truncates there")
    doc.title = _title(tree)
    if tree.xpath("//base/@href"):  # the page names where its images live: over http, not beside it
        doc.local_root = doc.local_page = None
    base = _base_url(tree, doc.url)
    if doc.url is None:
        doc.url = base  # (a page that came without a URL: its <base href>, canonical link or og:url names it)
    elif base != doc.url:
        doc.base_url = base
    try:
        _strip_boilerplate(tree)
        root = _main_root(tree)
        doc.items = _walk(root, doc.base_url or doc.url)
    except ValueError as e:  # lxml refusing a string it made from the page (a character the cleaning above missed)
        raise ExtractError("parse_error", f"lxml: {e}") from None
    doc.html = None  # the raw page is not needed any more
    return doc


def _walk(root, base_url: str | None) -> list:
    """Iterative DOM walk emitting TextItems per block and ImageItems in place."""
    items: list = []
    buf: list[str] = []
    ctx: list[tuple[str, int, int | None]] = [("paragraph", 0, None)]  # (kind, level, group) of open blocks
    groups = 0

    def flush():
        t = "".join(buf)
        buf.clear()
        t = "\n".join(_WS.sub(" ", line).strip() for line in t.split("\n"))
        t = re.sub(r"\n{2,}", "\n", t).strip()
        if t:
            kind, level, group = ctx[-1]
            items.append(TextItem(t, kind, level, group))

    ENTER, EXIT, TAIL = 0, 1, 2
    stack: list[tuple[int, object]] = [(ENTER, root)]
    while stack:
        op, el = stack.pop()
        if op == TAIL:
            if el.tail:
                buf.append(el.tail)
            continue
        if op == EXIT:
            if el.tag == "a" and el.get("_md_href"):
                buf.append(f"]({el.get('_md_href')})")
            elif el.tag in BLOCK_TAGS:
                flush()
                ctx.pop()
            continue
        tag = el.tag
        if not isinstance(tag, str):
            continue
        if tag == "img":
            flush()
            src = _image_src(el)
            if src:
                hints = " ".join([el.get("class", ""), el.get("id", ""), el.get("alt", ""), src.rsplit("/", 1)[-1]]
                                 + [a.get("href", "") for a in el.iterancestors("a")][:1]
                                 + [" ".join(_words(a)) for a in el.iterancestors()][:3])
                items.append(ImageItem(src=src, alt=(el.get("alt") or "").strip(), group=ctx[-1][2], hints=hints.lower()))
            continue
        if tag == "br":
            buf.append("\n")
            continue
        if tag in BLOCK_TAGS:
            flush()
            kind, level, group = ctx[-1]
            if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
                kind, level = "heading", int(tag[1])
            elif tag == "li":
                parent = el.getparent()
                kind = "step" if parent is not None and parent.tag == "ol" else "list"
            elif tag in ("p", "figcaption", "blockquote", "pre", "td", "th", "dd", "dt"):
                kind = "paragraph" if kind not in ("step", "list") else kind
            if "step" in _words(el):  # wikiHow-style <div class="step">: its text is a step
                kind = "step"
            if tag in ("li", "figure") or "step" in _words(el):
                groups += 1
                group = groups
            ctx.append((kind, level, group))
        elif tag == "a":
            href = (el.get("href") or "").strip()
            absolute = urljoin(base_url or "", href) if href else ""
            # Only a text link becomes [text](url); a link around an image is left to the image rules.
            if absolute.startswith(("http://", "https://")) and el.find(".//img") is None:
                el.set("_md_href", absolute)
                buf.append("[")
        stack.append((EXIT, el))
        if el.text:
            buf.append(el.text)
        for child in reversed(el):
            stack.append((TAIL, child))
            stack.append((ENTER, child))
    flush()
    return items
