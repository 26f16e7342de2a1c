"""WARC input: HTML responses as pages, image responses as an index the image stage reads from.

    for item in iter_warc("crawl/CC-MAIN-...warc.gz", start, end, page_cap=5_000_000):
        item.kind  # "page" | "too_large" | "image" | "corrupt" | "skip"

Design choices:
- Parsing is ``warcio`` (the WARC library datatrove and pywb read Common Crawl with). Only
  ``response`` records with an HTTP 200 and a Content-Type of ``text/html`` /
  ``application/xhtml+xml`` are pages; the page URL is ``WARC-Target-URI``; the HTTP charset
  (``Content-Type: ...; charset=``) decodes the body when it names a known codec (WHATWG order:
  a BOM still wins, then HTTP, then ``<meta charset>``, which the extractor reads).
- Image responses (HTTP 200, ``image/*``) are not read: their (file, offset) goes into an index by
  URI (SQLite, ``WarcImageIndex``), so the image stage takes a page's pictures from the same crawl
  and only fetches (under the usual SSRF rules) what the crawl does not hold. URIs are compared in
  one canonical form (``canonical_url``, yarl: lower-case scheme and host, no default port, one
  percent-encoding, no fragment), and a page's image URL may reach the crawl's image through the
  crawl's own 3xx responses (``Location``) and revisit records (``WARC-Refers-To-Target-URI``), at
  most ``MAX_ALIAS_HOPS`` of them: aliases only steer the lookup inside the index, nothing is fetched
  because a record said so.
- Caps before reading: a page record whose WARC ``Content-Length`` exceeds the page cap (plus 64 KiB
  of HTTP headers) is ``too_large`` and its body is never read (warcio skips it in 16 KiB reads);
  a body is read with ``read(cap + 1)``, so a gzip/br Content-Encoding cannot inflate past the cap.
- Corrupt input is skipped and counted, never fatal: when warcio cannot parse the next record (a
  truncated gzip member, a junk header), the reader yields one ``corrupt`` item and resyncs at the
  next gzip member (``1f 8b 08``; ``WARC/1.`` in an uncompressed file) after the failed record.
  Failures in a row without a good record between them are one corrupt region. warcio ends
  quietly at a member cut short at the end of a file; bytes left over after its last record are
  counted as one corrupt region too. A record whose ``WARC-Block-Digest`` (where the crawl wrote
  one, as Common Crawl and warcio do) does not match its bytes is corrupt as well: a gzip member cut
  short can go on decompressing into the next member's bytes and read as a whole record of garbage,
  swallowing the record after it (37 of 400 fresh members of a test page cut at 300 bytes did this or
  the ARC fallback below, scripts/probes/warc_cut_members.py; with the checks the cut record is one
  corrupt region and the next record is read). The payload digest is not used
  (crawlers disagree on what it covers under a transfer or content encoding). So is a record that
  is not a WARC record (no ``WARC-Record-ID``): when a member fails to decompress early, warcio
  falls back to parsing the raw bytes as an ARC record, which swallowed the rest of the file.
- A ``.warc.gz`` gzipped as one stream (``gzip crawl.warc``: warcio reads its first record, then refuses;
  ``one_gzip_stream``) cannot be sought into; the planner copies it as one member per record first
  (``recompress_members``) and reads the copy. ``iter_warc`` on the file itself yields its first record
  and one corrupt region saying so.
- Byte-range shards: ``iter_warc(path, start, end)`` yields the items whose record *starts* in
  ``[start, end)``. Shard boundaries are offsets of records a full scan found good, and the scan
  and the readers run this same code, so every record (and every corrupt region, owned by the
  record before it) belongs to exactly one shard: kill-and-resume stays exactly-once.
"""

from __future__ import annotations

import codecs
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin

from yarl import URL

from duetgen.data.engine.extract import web_codec

HTML_TYPES = {"text/html", "application/xhtml+xml"}
MAX_ALIAS_HOPS = 5  # redirects / revisits followed inside the crawl from a page's image URL to its image
HTTP_HEADER_SLACK = 65536  # a record's Content-Length covers the HTTP headers too
_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_MAGIC = b"WARC/1."


@dataclass
class WarcItem:
    offset: int  # byte offset of the record (of the last good record before a corrupt region)
    kind: str  # "page" | "too_large" | "image" | "corrupt" | "skip"
    uri: str | None = None
    alias_of: str | None = None  # kind "skip": the URI a 3xx response's Location or a revisit points to
    mime: str | None = None
    charset: str | None = None  # the HTTP charset, when it names a known codec
    data: bytes | None = None  # page body (kind "page" only)
    reason: str = ""  # why a record was skipped (kind "skip"), or what was corrupt
    record_id: str | None = None  # WARC-Record-ID
    date: str | None = None  # WARC-Date


def is_warc(path: str | Path) -> bool:
    return str(path).endswith((".warc", ".warc.gz"))


def _http_charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return web_codec(value)
    return None


def _classify(rec, offset: int, page_cap: int, read_pages: bool) -> WarcItem:
    """One record -> WarcItem; reads the body of a page only (capped). May raise on corrupt input."""
    kind = rec.rec_type
    uri = rec.rec_headers.get_header("WARC-Target-URI")
    base = dict(offset=offset, uri=uri, record_id=rec.rec_headers.get_header("WARC-Record-ID"),
                date=rec.rec_headers.get_header("WARC-Date"))
    if kind != "response":  # request, metadata, warcinfo, revisit (the revisit's earlier copy is an alias)
        refers = rec.rec_headers.get_header("WARC-Refers-To-Target-URI") if kind == "revisit" else None
        return WarcItem(kind="skip", reason=f"warc_{kind}", alias_of=refers, **base)
    if rec.http_headers is None:
        return WarcItem(kind="skip", reason="not_http", **base)
    content_type = rec.http_headers.get_header("Content-Type") or ""
    mime = content_type.split(";")[0].strip().lower()
    status = rec.http_headers.get_statuscode()
    if status != "200":
        location = rec.http_headers.get_header("Location") if status[:1] == "3" else None
        alias_of = urljoin(uri, location) if uri and location else None
        return WarcItem(kind="skip", reason="http_status", mime=mime, alias_of=alias_of, **base)
    if mime.startswith("image/"):
        return WarcItem(kind="image", mime=mime, **base)
    if mime not in HTML_TYPES:
        return WarcItem(kind="skip", reason="not_html", mime=mime, **base)
    length = int(rec.rec_headers.get_header("Content-Length") or 0)
    if length > page_cap + HTTP_HEADER_SLACK:  # decided from the header: the body is never read
        return WarcItem(kind="too_large", mime=mime, reason=f"record of {length:,} bytes > cap {page_cap:,}", **base)
    body = rec.content_stream().read(page_cap + 1)  # de-chunked, Content-Encoding decoded, capped
    if len(body) > page_cap:
        return WarcItem(kind="too_large", mime=mime, reason=f"body over the cap of {page_cap:,} bytes", **base)
    return WarcItem(kind="page", mime=mime, charset=_http_charset(content_type),
                    data=body if read_pages else None, **base)


def _find(f, magic: bytes, start: int, size: int) -> int | None:
    """Offset of the next ``magic`` at or after ``start`` (read in 1 MiB windows), or None."""
    pos = start
    while pos < size:
        f.seek(pos)
        chunk = f.read((1 << 20) + len(magic))
        i = chunk.find(magic)
        if i >= 0:
            return pos + i
        pos += 1 << 20
    return None


def iter_warc(path: str | Path, start: int = 0, end: int | None = None, page_cap: int = 5_000_000,
              read_pages: bool = True) -> Iterator[WarcItem]:
    """The items of the records starting in ``[start, end)`` of one WARC file (see the module docstring)."""
    from warcio.archiveiterator import ArchiveIterator

    magic = _GZIP_MAGIC if str(path).endswith(".gz") else _WARC_MAGIC
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = size if end is None else min(end, size)
        pos, in_bad = start, False
        while pos < end:
            f.seek(pos)
            cur = pos  # the record being read (a failure is charged to it)
            good_end = None  # where the last record read whole ends (the next one starts there)
            try:
                it = ArchiveIterator(f, check_digests=True)  # recorded, not raised: only the block digest counts
                for rec in it:
                    if it.offset < cur or (it.offset == cur and good_end is not None):
                        # warcio read on inside one gzip member (its offsets go wrong there, even negative)
                        raise ValueError("non-chunked gzip: a record inside another record's gzip member")
                    cur = it.offset  # absolute (warcio counts from fh.tell()); get_record_offset() would consume the body
                    if cur >= end:
                        return
                    if rec.format != "warc" or not rec.rec_headers.get_header("WARC-Record-ID"):
                        # warcio falls back to reading raw bytes as an ARC record when a member fails to
                        # decompress early: garbage that would swallow the records after it
                        raise ValueError(f"not a WARC record ({rec.format} format, no WARC-Record-ID)")
                    item = _classify(rec, cur, page_cap, read_pages)
                    misread = it.err_count
                    it.read_to_end(rec)  # the rest of the block, so that its digest is checked before it counts
                    if it.err_count > misread:  # warcio found no blank line where the Content-Length said it ends
                        raise ValueError(f"the record is not followed by its blank lines: its Content-Length "
                                         f"({rec.length:,}) is wrong")
                    missing = getattr(rec.raw_stream, "limit", 0)  # warcio checks the digest only of a whole block
                    if missing:
                        raise ValueError(f"the record is cut short: {missing:,} of its {rec.length:,} bytes missing")
                    if any(p.startswith("block digest failed") for p in rec.digest_checker.problems):
                        raise ValueError(f"the record's WARC-Block-Digest does not match its {rec.length:,} bytes")
                    good_end = it.offset if it.offset > cur else None  # (not inside a multi-record member)
                    in_bad = False
                    yield item
                if it.offset < size and not in_bad:  # warcio stops quietly at a member cut short at the end
                    yield WarcItem(offset=cur, kind="corrupt",
                                   reason=f"{size - it.offset:,} bytes at the end of the file are no complete record")
                return
            except Exception as e:  # warcio raises many kinds on junk; all mean "corrupt"
                if good_end is not None and good_end > cur:  # the record after a whole one failed: it starts there
                    cur = good_end  # (searching on from the whole record's start could find a record inside its body)
                    if cur >= end:
                        return  # the next shard's record
                if not in_bad:
                    yield WarcItem(offset=cur, kind="corrupt", reason=corrupt_reason(e))
                in_bad = True
                nxt = _find(f, magic, cur + 1, size)
                if nxt is None:
                    return
                pos = nxt


def one_gzip_stream(path: str | Path) -> bool:
    """True when ``path`` is a ``.warc.gz`` whose records share a gzip member (``gzip crawl.warc`` makes one
    stream): warcio reads its first record, then refuses the next ("non-chunked gzip")."""
    from warcio.archiveiterator import ArchiveIterator

    if not str(path).endswith(".gz"):
        return False
    with open(path, "rb") as f, open(path, "rb") as probe:
        it = ArchiveIterator(f)
        try:
            for i, _ in enumerate(it):
                probe.seek(max(it.offset, 0))
                if it.offset < 0 or probe.read(len(_GZIP_MAGIC)) != _GZIP_MAGIC:
                    return True  # warcio read a second record inside the first member (its offset goes wrong)
                if i >= 1:
                    return False  # two records, each at a member's start: one member per record
        except Exception as e:  # corrupt input is the reader's to count
            return "non-chunked gzip" in " ".join(str(e).split())
    return False


class _Gunzip:
    """The decompressed bytes of a gzip file (one stream or several members), read sequentially; a stream cut
    short or corrupt simply ends where its good bytes end (``gzip.GzipFile`` raises and loses the bytes of its
    last read). Raises ValueError once more than ``cap`` bytes were decompressed (a gzip bomb stops there)."""

    def __init__(self, f, cap: int):
        import zlib

        self._zlib, self.f, self.cap = zlib, f, cap
        self._d = zlib.decompressobj(31)
        self._rest = b""  # compressed bytes after a member's end: the next member
        self._buf, self._off = bytearray(), 0  # decompressed, not read yet from _off on
        self._made, self._pos, self._ended = 0, 0, False  # bytes decompressed; bytes read

    def _fill(self, want: int) -> None:
        while len(self._buf) - self._off < want and not self._ended:
            if self._d.unconsumed_tail:
                data = self._d.unconsumed_tail
            elif self._rest:
                data, self._rest = self._rest, b""
            else:
                data = self.f.read(1 << 20)
            if not data:
                self._ended = True
                break
            try:
                out = self._d.decompress(data, 1 << 20)
            except self._zlib.error:
                self._ended = True
                break
            if self._d.eof:
                self._rest = self._d.unused_data
                self._d = self._zlib.decompressobj(31)
            self._buf += out
            self._made += len(out)
            if self._made > self.cap:
                raise ValueError(f"decompresses past {self.cap:,} bytes")

    def read(self, n: int) -> bytes:
        if n is None or n < 0:  # (warcio reads in blocks; "everything" could be cap bytes in memory)
            raise ValueError("_Gunzip.read needs a size")
        self._fill(n)
        data = bytes(self._buf[self._off:self._off + n])
        self._off += len(data)
        self._pos += len(data)
        if self._off >= 1 << 20:
            del self._buf[:self._off]
            self._off = 0
        return data

    def readline(self, n: int = -1) -> bytes:
        while True:
            i = self._buf.find(b"\n", self._off)
            have = len(self._buf) - self._off
            if i >= 0 or self._ended or 0 <= n <= have:
                break
            self._fill(have + (1 << 16))
        end = have if i < 0 else i + 1 - self._off
        return self.read(end if n < 0 else min(end, n))

    def tell(self) -> int:
        return self._pos


def recompress_members(src: str | Path, dst: str | Path, max_ratio: int = 100) -> int:
    """Write the WARC ``src``, gzipped as one stream, to ``dst`` as one gzip member per record (what the reader
    seeks to); the number of records found. The record bytes are copied as they are (digests still hold).

    Two streaming passes over the decompressed data (memory: one 1 MiB read): warcio finds where the records
    start, then each record is compressed as its own member. What the parser cannot read past (junk, a stream
    cut short) goes as it is into the last member, where the reader counts it as a corrupt region. At most
    ``max_ratio`` times the file's size is decompressed (a gzip bomb stops there; the rest is not read).
    """
    import zlib

    from warcio.archiveiterator import ArchiveIterator

    cap = max_ratio * max(os.path.getsize(src), 1)
    starts, records = [0], 0
    with open(src, "rb") as f:
        it = ArchiveIterator(_Gunzip(f, cap))  # a plain WARC stream to warcio: offsets are decompressed positions
        try:
            for _ in it:
                starts.append(it.offset)
                records += 1
        except Exception:  # junk, a cut stream or the cap: the bytes from here on go into the last member
            pass
    starts = sorted(set(starts))
    tmp = Path(f"{dst}.tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out:
        stream = _Gunzip(f, cap)
        for i, start in enumerate(starts):
            left = starts[i + 1] - start if i + 1 < len(starts) else None  # the last member: to the end
            member = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing
            wrote = 0
            while left is None or left > 0:
                try:
                    chunk = stream.read(1 << 20 if left is None else min(1 << 20, left))
                except ValueError:  # the cap: the rest is not read
                    chunk = b""
                if not chunk:
                    left = 0
                    break
                out.write(member.compress(chunk))
                wrote += len(chunk)
                if left is not None:
                    left -= len(chunk)
            if wrote:
                out.write(member.flush())
    os.replace(tmp, dst)
    return records


def corrupt_reason(e: Exception) -> str:
    """One line for the funnel (warcio's messages span lines, and one starts with a blank one)."""
    text = " ".join(str(e).split())
    if "non-chunked gzip" in text:  # `gzip crawl.warc`: one gzip stream, so no record after the first can be sought
        return ("the file is one gzip stream, not one gzip member per record (`gzip crawl.warc` makes that): "
                "recompress it with `warcio recompress IN OUT`")
    return f"{type(e).__name__}: {text[:200]}"


def read_warc_image(path: str | Path, offset: int, max_bytes: int) -> tuple[str, bytes]:
    """(mime, body) of the image response at ``offset``. Raises FetchError (too_large / corrupt_warc_record)."""
    from warcio.archiveiterator import ArchiveIterator

    from duetgen.data.engine.fetch import FetchError

    where = f"{Path(path).name}@{offset}"
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            rec = next(iter(ArchiveIterator(f, check_digests=False)))
            length = int(rec.rec_headers.get_header("Content-Length") or 0)
            if length > max_bytes + HTTP_HEADER_SLACK:
                raise FetchError("too_large", f"{where}: record of {length:,} bytes > cap {max_bytes:,}")
            mime = (rec.http_headers.get_header("Content-Type") or "").split(";")[0].strip().lower()
            data = rec.content_stream().read(max_bytes + 1)
        except FetchError:
            raise
        except Exception as e:
            raise FetchError("corrupt_warc_record", f"{where}: {type(e).__name__}: {str(e)[:200]}") from None
    if len(data) > max_bytes:
        raise FetchError("too_large", f"{where}: body over the cap of {max_bytes:,} bytes")
    return mime, data


def canonical_url(url: str) -> str:
    """One spelling per URL (yarl): lower-case scheme and host, IDNA, no default port, one percent-encoding, no
    fragment; a URL yarl cannot parse is kept as it is (without its fragment)."""
    try:
        return str(URL(url).with_fragment(None))
    except (ValueError, TypeError):
        return url.split("#", 1)[0]


class WarcImageIndex:
    """URI -> (WARC file, offset) of the image responses of a WARC set, and URI -> URI aliases (the crawl's
    redirects and revisits), in SQLite under canonical URIs (workers open it read-only)."""

    def __init__(self, path: str | Path, writable: bool = False):
        self.path = str(path)
        if writable:
            self.db = sqlite3.connect(self.path)
            self.db.execute("CREATE TABLE IF NOT EXISTS images (uri TEXT PRIMARY KEY, file TEXT, offset INTEGER)")
            self.db.execute("CREATE TABLE IF NOT EXISTS aliases (uri TEXT PRIMARY KEY, target TEXT)")
        else:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self._aliases = self.db.execute(  # an index written before aliases existed has none
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'aliases'").fetchone() is not None
        self._lock = threading.Lock()  # the image stage looks up from its download threads

    def add_many(self, rows: list[tuple[str, str, int]], aliases: list[tuple[str, str]] = ()) -> None:
        """(uri, file, offset) rows and (uri, target) aliases; the first for a URI wins (crawl order)."""
        self.db.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?)",
                            [(canonical_url(uri), file, offset) for uri, file, offset in rows])
        self.db.executemany("INSERT OR IGNORE INTO aliases VALUES (?, ?)",
                            [(canonical_url(uri), canonical_url(target)) for uri, target in aliases])
        self.db.commit()

    def lookup(self, uri: str) -> tuple[str, int] | None:
        """The crawl's image response for ``uri``, directly or through at most MAX_ALIAS_HOPS aliases."""
        uri = canonical_url(uri)
        with self._lock:
            for _ in range(MAX_ALIAS_HOPS + 1):
                row = self.db.execute("SELECT file, offset FROM images WHERE uri = ?", (uri,)).fetchone()
                if row is not None:
                    return row[0], row[1]
                alias = self._aliases and self.db.execute("SELECT target FROM aliases WHERE uri = ?", (uri,)).fetchone()
                if not alias or alias[0] == uri:
                    return None
                uri = alias[0]
        return None

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def close(self) -> None:
        self.db.close()
