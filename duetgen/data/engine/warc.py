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
  next record start after the failed record: a gzip member (``1f 8b 08``) or an uncompressed record
  (``WARC/1.``), whichever comes first, whatever the file's name says. Failures in a row without a
  good record between them are one corrupt region. warcio decides gzip or not at its first record,
  so where a record fails right after a whole one (or warcio stops early), a fresh reader tries it
  again first: a file that switches between gzipped and uncompressed records is read whole. warcio
  ends quietly at a member cut short at the end of a file; bytes left over after its last record are
  counted as one corrupt region too, unless they are all zero (padding). A record whose
  ``WARC-Block-Digest`` (where the crawl wrote one, as Common Crawl and warcio do) does not match
  its bytes is corrupt as well: a gzip member cut
  short can go on decompressing into the next member's bytes and read as a whole record of garbage,
  swallowing the record after it (37 of 400 fresh members of a test page cut at 300 bytes did this or
  the ARC fallback below, scripts/probes/warc_cut_members.py; with the checks the cut record is one
  corrupt region and the next record is read). The payload digest is not used
  (crawlers disagree on what it covers under a transfer or content encoding). So is a record that
  is not a WARC record (no ``WARC-Record-ID``): when a member fails to decompress early, warcio
  falls back to parsing the raw bytes as an ARC record, which swallowed the rest of the file. And
  so is a record whose headers hold a second record's (cut short inside them, it ran on into the
  next record's, and warcio read the next record's block under its URL; cut right after its first
  line, warcio, which drops a header line without a colon, read the next record as it without a sign).
- A ``.warc.gz`` gzipped as one stream (``gzip crawl.warc``: warcio reads its first record, then refuses)
  cannot be sought into: ``iter_warc`` yields its first record and one corrupt region whose reason starts
  with ``ONE_STREAM``, and the planner then copies the file as one member per record
  (``recompress_members``) and reads the copy.
- warcio reads a header line with no cap (a gzip member of zeros was read whole into memory, joined
  quadratically): lines are read at most ``MAX_LINE_BYTES`` at a time.
- Byte-range shards: ``iter_warc(path, start, end)`` yields the items whose record *starts* in
  ``[start, end)``. Shard boundaries are offsets of records a full scan found good, and the scan
  and the readers run this same code, so every record (and every corrupt region, owned by the
  record before it) belongs to exactly one shard: kill-and-resume stays exactly-once. The scan
  also lists each shard's page records and corrupt regions, and the shard reads just those records
  (``iter_warc(path, offset, offset + 1)``, one each; the engine's runner), not the image records between.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sqlite3
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin

from warcio.bufferedreaders import BufferedReader, ChunkedDataReader, DecompressingBufferedReader
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
    return str(path).lower().endswith((".warc", ".warc.gz"))


def _http_charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return web_codec(value)
    return None


def _content_type(rec) -> str:
    """The response's Content-Type; without one, the crawler's own sniffing (Common Crawl's
    WARC-Identified-Payload-Type), as a browser sniffs."""
    return (rec.http_headers.get_header("Content-Type")
            or rec.rec_headers.get_header("WARC-Identified-Payload-Type") or "")


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
    content_type = _content_type(rec)
    mime = content_type.split(";")[0].strip().lower()
    status = rec.http_headers.get_statuscode()
    if status != "200":
        location = rec.http_headers.get_header("Location") if status[:1] == "3" else None
        alias_of = urljoin(uri, location) if uri and location else None
        return WarcItem(kind="skip", reason="http_status", mime=mime, alias_of=alias_of, **base)
    if mime.startswith("image/"):
        if rec.rec_headers.get_header("WARC-Truncated"):  # the crawler kept part of it: not the image, so it is
            return WarcItem(kind="skip", reason="truncated_image", mime=mime, **base)  # not indexed, but fetched
        return WarcItem(kind="image", mime=mime, **base)
    if mime not in HTML_TYPES:
        return WarcItem(kind="skip", reason="not_html", mime=mime, **base)
    stream = _content_stream(rec, page_cap)
    if stream is None:
        return WarcItem(kind="skip", reason="content_encoding", mime=mime, **base)
    length = int(rec.rec_headers.get_header("Content-Length") or 0)
    if length > page_cap + HTTP_HEADER_SLACK:  # decided from the header: the body is never read
        return WarcItem(kind="too_large", mime=mime, reason=f"record of {length:,} bytes > cap {page_cap:,}", **base)
    body = stream.read(page_cap + 1)  # de-chunked, Content-Encoding decoded, capped
    if len(body) > page_cap:
        return WarcItem(kind="too_large", mime=mime, reason=f"body over the cap of {page_cap:,} bytes", **base)
    return WarcItem(kind="page", mime=mime, charset=_http_charset(content_type),
                    data=body if read_pages else None, **base)


class _BrotliDecompressor:
    """``Content-Encoding: br`` for warcio, which registers a decoder for the old brotlipy API (``decompress``, a
    settable ``unused_data``; brotli's own binding has ``process``: every br payload failed, and warcio then passes
    the bytes on still encoded). Bounded: 80 bytes of br inflate to 50 MB in one call, so at most ``limit`` bytes
    come out; a reader asks for its cap + 1 and finds the payload too large (``_content_stream``)."""

    unused_data = None  # (warcio asks; a payload is one brotli stream)
    _STEP = 1 << 20

    def __init__(self, limit: int = 32 << 20):
        import brotli

        self._brotli, self._left = brotli.Decompressor(), limit

    def decompress(self, data: bytes) -> bytes:
        out = bytearray()
        while self._left > 0 and (data or not self._brotli.can_accept_more_data()):
            piece = self._brotli.process(data, output_buffer_limit=min(self._STEP, self._left))[:self._left]
            out += piece
            self._left -= len(piece)
            data = b""  # (the rest of this input's output is drained with empty input, as brotli requires)
        return bytes(out)


BufferedReader.DECOMPRESSORS["br"] = _BrotliDecompressor
_UNDECODABLE = object()
_ENCODING_ALIASES = {"x-gzip": "gzip", "x-deflate": "deflate"}
_COMPRESSIONS = {"zstd", "compress", "x-compress", "dcb", "dcz"}  # real codings this reader has no decoder for


def _content_encoding(rec):
    """The payload's Content-Encoding as warcio names its decoders ("" for none), or ``_UNDECODABLE`` (zstd,
    compress, several codings stacked). HTTP reads the value case-insensitively and takes x-gzip for gzip (RFC
    9110); warcio compares as written and passed those through still encoded: a page of compressed bytes
    (session 14 audit). Any other value (``utf-8``, ``binary``, ``identity``: servers misconfigured) is no coding,
    and the bytes pass as they are, as browsers pass them (a review found plain pages skipped otherwise)."""
    value = (rec.http_headers.get_header("Content-Encoding") or "").lower()
    codings = [_ENCODING_ALIASES.get(v.strip(), v.strip()) for v in value.split(",") if v.strip()]
    decoders = DecompressingBufferedReader.get_supported_decompressors()
    if len(codings) == 1 and codings[0] in decoders:
        return codings[0]
    if any(c in _COMPRESSIONS or c in decoders for c in codings):  # zstd, or real codings stacked
        return _UNDECODABLE
    return ""


def _content_stream(rec, cap: int):
    """warcio's ``content_stream`` with the headers read as HTTP reads them: ``Transfer-Encoding: Chunked`` is
    chunked (warcio compares with "chunked" as written, and chunk-size lines leaked into the page's text); None
    when no decoder reads the payload's Content-Encoding. The caller reads at most ``cap + 1`` bytes, which a br
    decoder never inflates past."""
    encoding = _content_encoding(rec)
    if encoding is _UNDECODABLE:
        return None
    encoding = encoding or None
    if (rec.http_headers.get_header("Transfer-Encoding") or "").strip().lower() == "chunked":
        stream = ChunkedDataReader(rec.raw_stream, decomp_type=encoding)
    elif encoding:
        stream = BufferedReader(rec.raw_stream, decomp_type=encoding)
    else:
        return rec.raw_stream
    if encoding == "br":
        stream.decompressor = _BrotliDecompressor(limit=cap + 1)
    return stream


MAX_LINE_BYTES = 1 << 20  # a WARC or HTTP header line is never near this
MAX_HEADER_SECTION_BYTES = 1 << 20  # nor a record's WARC or HTTP header section (servers refuse past 8-64 KB)


def _archive_iterator(f, check_digests: bool):
    """warcio's ``ArchiveIterator`` over ``f``, with two changes to its reader:

    - header lines are read at most ``MAX_LINE_BYTES`` at a time: warcio reads a line with no cap, joining pieces
      as it goes, so a gzip member of 52 MB of zeros (50 KB in the file) took 1.8 CPU s and ~0.9 GB of memory
      before it was found corrupt (a member of junk is read as a header line); and at most
      ``MAX_HEADER_SECTION_BYTES`` of them before a blank line: warcio keeps every header line it parses, so a
      member of 80 MiB of ``X-A: b`` HTTP header lines (122 KB in the file) took 2.2 GB and 23 CPU s (session 14
      audit; ``scripts/probes/warc_header_lines.py``);
    - a gzip member that fails to decompress after its first read raises: warcio prints zlib's error and reads on
      as if the file ended there, so every record after a member with a bad checksum was lost, counted as nothing
      or as "bytes at the end of the file" (an audit's random damaged files, ~2 in 1,000). A failure at a member's
      first read is left to warcio, which then reads the bytes as they are (how it reads an uncompressed WARC).
    """
    from warcio.archiveiterator import ArchiveIterator

    class CheckedReader(DecompressingBufferedReader):
        header_bytes = 0  # of the header lines read since the last blank one

        def readline(self, length=None):
            line = super().readline(MAX_LINE_BYTES if length is None else min(length, MAX_LINE_BYTES))
            self.header_bytes = 0 if not line.strip() else self.header_bytes + len(line)
            if self.header_bytes > MAX_HEADER_SECTION_BYTES:
                raise ValueError(f"a record's header lines run past {MAX_HEADER_SECTION_BYTES:,} bytes without a blank "
                                 "line")
            return line

        def read(self, length=None):  # a block is being read, not headers (a chunked body reads its chunk-size
            self.header_bytes = 0     # lines with readline and its chunks with read: a review's 8-byte chunks)
            return super().read(length)

        def _decompress(self, data):
            if self.decompressor is not None and data and self.num_block_read:
                try:
                    return self.decompressor.decompress(data)
                except zlib.error as e:
                    raise ValueError(f"a gzip member does not decompress: {e}") from None
            return super()._decompress(data)

    it = ArchiveIterator(f, check_digests=check_digests)
    it.reader = CheckedReader(it.fh, block_size=it.reader.block_size)  # not read from yet
    return it


def _merged_headers(headers: list[tuple[str, str]]) -> bool:
    """A record's WARC headers hold a second record's: a repeated WARC-Record-ID or WARC-Type, or a value that a
    ``WARC/1.`` line ran into (a header line cut short, then the next record's first line)."""
    names = [name.lower() for name, _ in headers]
    return (names.count("warc-record-id") > 1 or names.count("warc-type") > 1
            or any(_WARC_MAGIC.decode() in value for _, value in headers))


_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # bytes no header line holds (tab, CR, LF aside)


def _raw_headers_damage(fd: int, offset: int, length: int) -> str | None:
    """What is wrong with an uncompressed record's WARC headers, read again from the file at ``offset``, or None
    (also for a gzipped record, whose bytes on disk are not its headers). ``length`` is warcio's count of the
    headers' characters (a UTF-8 value makes the bytes more: up to 4 a character are read). warcio drops a header
    line without a colon and takes the end of the file for the end of the headers, so a record cut short inside its
    headers read on without a sign: into the next record's headers (a second ``WARC/1.`` line: the two read as
    one), into a gzip member's bytes (binary lines dropped, the member read as the block), or to the end of the
    file. The lines up to the first blank one (warcio's end: empty or whitespace only) are checked for those."""
    want = 4 * length + 4
    head = os.pread(fd, want, offset)
    if not head.startswith(_WARC_MAGIC):
        return None
    for line in head.split(b"\n")[1:]:
        if not line.strip():
            return None  # the end of the headers, as warcio found it
        if _WARC_MAGIC in line:
            return "the record's headers run into another record's first line: it was cut short in them"
        if _CONTROL.search(line.rstrip(b"\r")):
            return "the record's headers run into bytes that are no header: it was cut short in them"
    if len(head) < want:
        return "the file ends inside the record's WARC headers"
    return None  # (not reached for headers warcio read: their bytes fit in the window)


_REQUIRED = ("WARC-Type", "Content-Length")  # (WARC-Record-ID is checked with the format)


def _member_cut_at_end(it, f, size: int) -> bool:
    """The gzip member just read is the last bytes of the file and does not end there: its block was whole (the
    deflate data complete) but its trailer is cut off. warcio does not notice; ``gzip`` calls it truncated."""
    decompressor = it.reader.decompressor
    return (decompressor is not None and not decompressor.eof and not it.reader.rem_length()
            and f.tell() >= size)


def _find(f, start: int, size: int, magics: tuple[bytes, ...] = (_GZIP_MAGIC, _WARC_MAGIC)) -> int | None:
    """Offset of the next of ``magics`` at or after ``start`` (read in 1 MiB windows), or None. By default the
    next record start: a gzip member (``1f 8b 08``) or an uncompressed record (``WARC/1.``), whichever comes
    first, whatever the file's name says (a file may switch between the two)."""
    pos, overlap = start, max(map(len, magics))
    while pos < size:
        f.seek(pos)
        chunk = f.read((1 << 20) + overlap)
        found = [i for i in (chunk.find(m) for m in magics) if i >= 0]
        if found:
            return pos + min(found)
        pos += 1 << 20
    return None


def _zeros_to_end(f, start: int, size: int) -> bool:
    """The file holds only zero bytes from ``start`` to its end (padding, not a damaged record)."""
    for pos in range(start, size, 1 << 20):
        if os.pread(f.fileno(), min(1 << 20, size - pos), pos).strip(b"\0"):
            return False
    return True


def iter_warc(path: str | Path, start: int = 0, end: int | None = None, page_cap: int = 5_000_000,
              read_pages: bool = True) -> Iterator[WarcItem]:
    """The items of the records starting in ``[start, end)`` of one WARC file (see the module docstring)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = size if end is None else min(end, size)
        pos, in_bad = start, False
        retried = None  # the error of the reader that failed at ``pos``, which a fresh reader now tries again
        while pos < end:
            f.seek(pos)
            cur = pos  # the record being read (a failure is charged to it)
            good_end = None  # where the last record read whole ends (the next one starts there)
            try:
                it = _archive_iterator(f, check_digests=True)  # recorded, not raised: only the block digest counts
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
                    if absent := [h for h in _REQUIRED if rec.rec_headers.get_header(h) is None]:
                        # a gzip member cut inside its headers reads as a record of the lines before the cut
                        raise ValueError(f"the record has no {' or '.join(absent)} header (the WARC standard "
                                         "requires them): it was cut short in its headers")
                    if _merged_headers(rec.rec_headers.headers) or rec.rec_headers.statusline:
                        # cut short inside its headers, it ran on into the next record's: read as one, that
                        # record's block came under this one's URI (or the next record was lost)
                        raise ValueError("the record's headers run into another record's: it was cut short in them")
                    if damage := _raw_headers_damage(f.fileno(), cur, rec.rec_headers.total_len):
                        raise ValueError(damage)
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
                    if _member_cut_at_end(it, f, size):
                        raise ValueError("the record's gzip member is cut short: the file ends before the member's "
                                         "end (its CRC and length)")
                    good_end = it.offset if it.offset > cur else None  # (not inside a multi-record member)
                    in_bad, retried = False, None
                    yield item
                if it.offset < size and not _zeros_to_end(f, it.offset, size):  # (zero bytes at the end: padding)
                    # warcio stops quietly at a member cut short at the end, and where a gzipped record is followed
                    # by an uncompressed one cut short: a fresh reader tries again there (records may follow)
                    if it.offset > pos:  # this reader read records: a fresh one tries what follows
                        pos, retried = it.offset, None
                        continue
                    # a fresh reader stopped at once: damage (e.g. a record cut inside its headers, which warcio
                    # read on into a gzip member's bytes); records may still follow it
                    nxt = _find(f, it.offset + 1, size)
                    where = "at the end of the file" if nxt is None else "before the next record"
                    tail = _Tail(f"{(nxt or size) - it.offset:,} bytes {where} are no complete record")
                    if not in_bad:
                        yield WarcItem(offset=cur, kind="corrupt", reason=corrupt_reason(retried or tail))
                    in_bad, retried = True, None
                    if nxt is None:
                        return
                    pos = nxt
                    continue
                return
            except Exception as e:  # warcio raises many kinds on junk; all mean "corrupt"
                if good_end is not None and good_end > cur:  # the record after a whole one failed: it starts there
                    # (searching on from the whole record's start could find a record inside its body); read it
                    # again with a fresh reader first: warcio decides gzip or not once, at its first record, so a
                    # file that switches between gzipped and uncompressed records failed at the switch
                    pos, retried = good_end, e
                    continue
                e, retried = retried or e, None  # failed again: the first reader's reason (e.g. ONE_STREAM's)
                if _zeros_to_end(f, cur, size):
                    return  # zero padding at the end of the file
                if not in_bad:
                    yield WarcItem(offset=cur, kind="corrupt", reason=corrupt_reason(e))
                in_bad = True
                nxt = _find(f, cur + 1, size)
                if nxt is None:
                    return
                pos = nxt


ONE_STREAM = "the file is one gzip stream"  # how a corrupt region's reason starts when records share a gzip member


def one_gzip_stream(path: str | Path) -> bool:
    """True when ``path`` is gzip whose records share a gzip member somewhere (``gzip crawl.warc`` makes one
    stream; ``cat`` of such a file after a per-record one too): the reader meets it as a corrupt region whose
    reason starts with ``ONE_STREAM``. A full read of the file (the scan that plans the shards is one)."""
    with open(path, "rb") as f:
        if f.read(len(_GZIP_MAGIC)) != _GZIP_MAGIC:
            return False  # not gzip at all (an uncompressed WARC named .warc.gz reads as it is)
    return any(x.kind == "corrupt" and x.reason.startswith(ONE_STREAM) for x in iter_warc(path, read_pages=False))


def _gzip_pieces(f, cap: int) -> Iterator[tuple[str, bytes]]:
    """The file ``f`` as ("data", decompressed bytes) pieces of at most 1 MiB, member after member, and ("junk",
    raw bytes) for what cannot be decompressed (from the start of the member that failed to the next gzip magic;
    trailing bytes). Stops, with ("cap", b""), once more than ``cap`` bytes were decompressed (a gzip bomb)."""
    size = os.fstat(f.fileno()).st_size
    start, made = 0, 0  # the current member's file offset; bytes decompressed so far
    while start < size:
        f.seek(start)
        d, at = zlib.decompressobj(31), start
        try:
            while not d.eof:
                data = d.unconsumed_tail or f.read(1 << 20)
                if not data:
                    break  # cut short at the end of the file: its bytes so far were handed out
                at += 0 if d.unconsumed_tail else len(data)
                out = d.decompress(data, 1 << 20)
                if out:
                    made += len(out)
                    yield "data", out
                    if made > cap:
                        yield "cap", b""
                        return
        except zlib.error:
            nxt = _find(f, start + 1, size, (_GZIP_MAGIC,))
            end = size if nxt is None else nxt
            for pos in range(start, end, 1 << 20):
                f.seek(pos)
                yield "junk", f.read(min(1 << 20, end - pos))
            start = end
            continue
        if not d.eof:
            return
        start = at - len(d.unused_data)  # the next member starts right after this one


_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(\d+)[ \t]*\r?$", re.I | re.M)
MAX_HEADER_BYTES = 1 << 16  # a WARC record's headers (its HTTP headers are inside its block)
_RECORD_START = re.compile(rb"WARC/1\.[01]\r\n")  # a record's first line, where a cut record's block is searched
_RECORD_START_BYTES = len(b"WARC/1.0\r\n")
MAX_HELD_RECORD = 32 << 20  # a record up to this size is held until its blank line shows its Content-Length true


class _MemberWriter:
    """Writes the copy: one gzip member at a time, and raw bytes between members."""

    def __init__(self, out):
        self.out, self._member = out, None

    def write(self, data) -> None:
        if data:
            if self._member is None:
                self._member = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing
            self.out.write(self._member.compress(bytes(data)))

    def end(self) -> None:
        if self._member is not None:
            self.out.write(self._member.flush())
            self._member = None

    def raw(self, data: bytes) -> None:
        self.end()
        self.out.write(data)


_BLOCK_DIGEST = re.compile(rb"^warc-block-digest:[ \t]*sha1:([A-Za-z0-9]+)[ \t]*\r?$", re.I | re.M)


def _block_digest_holds(record: bytes | bytearray) -> bool:
    """True when ``record`` (WARC headers, blank line, block) has a SHA-1 ``WARC-Block-Digest`` that its block
    matches: whole, whatever follows it (junk after a good record is not a reason to cut it)."""
    end = record.find(b"\r\n\r\n")
    found = _BLOCK_DIGEST.search(record, 0, end)
    if found is None:
        return False
    digest = hashlib.sha1(record[end + 4:]).digest()
    return found[1].upper() in (base64.b32encode(digest), digest.hex().upper().encode())  # base32 (warcio) or hex


def recompress_members(src: str | Path, dst: str | Path, max_ratio: int = 100) -> int:
    """Write the gzipped WARC ``src``, whose records share gzip members, to ``dst`` as one gzip member per record
    (what the reader seeks to); the number of records found. The record bytes are copied as they are.

    One streaming pass (memory: 1 MiB pieces and one record up to ``MAX_HELD_RECORD``): a record is its WARC headers
    (up to the blank line, at most 64 KiB) and then ``Content-Length`` bytes and its blank lines, so the records are
    split without parsing their blocks (``_RecordSplitter``). The damage the reader survives in an uncompressed file
    is split as the reader resyncs there, at the next record's first line (``WARC/1.0``), wherever it starts: a record
    cut short, whose Content-Length reaches into the records after it (its block is not followed by blank lines and
    the next record, or the stream ends inside it, and its ``WARC-Block-Digest`` does not hold), ends there; bytes
    that are no record (junk, headers that do not parse) go into a member of their own up to there (the reader counts
    each as one corrupt region). A record over ``MAX_HELD_RECORD`` is copied without the check. Gzip bytes that do
    not decompress are copied raw up to the next gzip member, where the reader finds them too. At most ``max_ratio``
    times the file's size is decompressed (a gzip bomb stops there; the rest is not read).
    """
    cap = max_ratio * max(os.path.getsize(src), 1)
    tmp = Path(f"{dst}.tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out:
        splitter = _RecordSplitter(_MemberWriter(out))
        for kind, piece in _gzip_pieces(f, cap):
            if kind == "data":
                splitter.feed(piece)
                continue
            splitter.end_of_stream()  # the stream in progress ends here, cut short
            if kind == "cap":
                break
            splitter.writer.raw(piece)
        splitter.end_of_stream()
    os.replace(tmp, dst)
    return splitter.records


class _RecordSplitter:
    """The decompressed stream, fed in pieces, split into one gzip member per WARC record (``recompress_members``)."""

    def __init__(self, writer: _MemberWriter):
        self.writer = writer
        self.records = 0
        self.state, self.left = "header", 0  # "header" | "block" (left bytes of it) | "check" | "tail" | "junk"
        self.buf = bytearray()  # fed, not yet split
        self.held = bytearray()  # the record being copied (headers + block so far), until what follows it shows
        self.holding = False  # False once the record outgrew MAX_HELD_RECORD (then copied as it comes, unchecked)

    def feed(self, piece: bytes) -> None:
        self.buf += piece
        self._split()

    def end_of_stream(self) -> None:
        """Copy what is left; a held record the stream ends inside was cut short: split it as in ``_cut``."""
        while self.state == "block" and self.holding and self._cut():
            self._split()
        self.writer.write(self.held + self.buf)
        self.held.clear()
        self.buf.clear()
        self.writer.end()
        self.state, self.holding = "header", False

    def _cut(self) -> bool:
        """The held record was cut short: end it where a record starts inside its block, and read on from there."""
        held = self.held
        if _block_digest_holds(held):
            return False
        # (a record's first line may begin inside the held block and end in what follows it)
        found = _RECORD_START.search(held + self.buf[:_RECORD_START_BYTES], held.find(b"\r\n\r\n") + 4)
        if found is None or found.start() >= len(held):
            return False
        self.writer.write(held[:found.start()])
        self.writer.end()
        self.buf[:0] = held[found.start():]
        held.clear()
        self.state = "header"
        return True

    def _split(self) -> None:
        buf, writer = self.buf, self.writer
        while buf:
            if self.state == "block":
                take = min(self.left, len(buf))
                if self.holding and len(self.held) + take > MAX_HELD_RECORD:
                    writer.write(self.held)
                    self.held.clear()
                    self.holding = False
                (self.held.extend if self.holding else writer.write)(buf[:take])
                del buf[:take]
                self.left -= take
                if self.left:
                    return
                self.state, self.left = ("check" if self.holding else "tail"), 4
            elif self.state == "check":  # what follows a held record's block: blank lines, then the next record
                blank = len(buf) - len(buf.lstrip(b"\r\n"))
                if len(buf) - blank < len(_WARC_MAGIC):
                    return  # not enough to tell yet (at the end of the stream the record is copied as it is)
                if (blank and buf.startswith(_WARC_MAGIC, blank)) or not self._cut():
                    writer.write(self.held)
                    self.held.clear()
                    self.state = "tail"
            elif self.state == "tail":  # the blank lines after the block ("\r\n\r\n"; fewer, or bare "\n", kept too)
                while self.left and buf and buf[0] in b"\r\n":
                    writer.write(buf[:1])
                    del buf[:1]
                    self.left -= 1
                if self.left and not buf:
                    return
                writer.end()
                self.state = "header"
            elif self.state == "header":
                skip = len(buf) - len(buf.lstrip(b"\r\n"))  # blank lines between records
                del buf[:skip]
                if not buf:
                    return
                end = buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
                if end < 0 and len(buf) < MAX_HEADER_BYTES and _WARC_MAGIC.startswith(bytes(buf[:7])):
                    return  # the headers may go on in the next piece
                found = _CONTENT_LENGTH.search(buf, 0, end) if end >= 0 and buf.startswith(_WARC_MAGIC) else None
                if found is None or _RECORD_START.search(buf, 1, end) is not None:  # (headers cut short: the next
                    self.state = "junk"  # record's start inside them)
                    continue
                self.held += buf[:end + 4]
                self.holding = True
                self.left = int(found[1])
                del buf[:end + 4]
                self.state, self.records = "block", self.records + 1
            else:  # junk: up to the next record's first line, wherever it starts
                nxt = _RECORD_START.search(buf, 1)
                if nxt is None:
                    keep = _RECORD_START_BYTES - 1
                    writer.write(buf[:-keep])
                    del buf[:-keep]
                    return
                writer.write(buf[:nxt.start()])
                del buf[:nxt.start()]
                writer.end()
                self.state = "header"


class _Tail(Exception):
    """What warcio stopped quietly before: bytes at the end of a file that hold no whole record."""


def corrupt_reason(e: Exception) -> str:
    """One line for the funnel (warcio's messages span lines, and one starts with a blank one)."""
    text = " ".join(str(e).split())
    if isinstance(e, _Tail):
        return text
    if re.search(r"first line: \[['\"]\\x1f\\x8b\\x08", text):  # a gzip member whose content is gzip again
        return ("the file is gzipped twice (a gzip member holds another gzip stream; a download saved with its "
                "Content-Encoding does that): `gunzip` it once")
    if "non-chunked gzip" in text:  # `gzip crawl.warc`: one gzip stream, so no record after the first can be sought
        return (f"{ONE_STREAM}, not one gzip member per record (`gzip crawl.warc` makes that): the engine reads a "
                "copy with one member per record; by hand: `warcio recompress IN OUT`")
    return f"{type(e).__name__}: {text[:200]}"


def read_warc_image(path: str | Path, offset: int, max_bytes: int) -> tuple[str, bytes]:
    """(mime, body) of the image response at ``offset``. Raises FetchError (too_large / corrupt_warc_record)."""
    from duetgen.data.engine.fetch import FetchError

    where = f"{Path(path).name}@{offset}"
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            rec = next(iter(_archive_iterator(f, check_digests=False)))
            length = int(rec.rec_headers.get_header("Content-Length") or 0)
            if length > max_bytes + HTTP_HEADER_SLACK:
                raise FetchError("too_large", f"{where}: record of {length:,} bytes > cap {max_bytes:,}")
            mime = _content_type(rec).split(";")[0].strip().lower()  # (as the index saw it: an image)
            stream = _content_stream(rec, max_bytes)
            if stream is None:
                raise FetchError("corrupt_warc_record", f"{where}: Content-Encoding "
                                 f"{rec.http_headers.get_header('Content-Encoding')!r} is not one this reader decodes")
            data = stream.read(max_bytes + 1)
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
