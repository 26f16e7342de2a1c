"""Random damaged WARCs against the reader's promises (issue 18, session 10; docs/data-engine.md).

    python scripts/probes/warc_damage_fuzz.py copy 300 [SEED]    # one-stream copy vs the same bytes uncompressed
    python scripts/probes/warc_damage_fuzz.py shards 100 [SEED]  # listed shard reads vs byte ranges vs one full read
    python scripts/probes/warc_damage_fuzz.py mixed 300 [SEED]   # gzipped and uncompressed records in one file

Each file is 3-12 records (pages, images, a script) written by warcio, some damaged: cut short at a random byte,
replaced by random junk, or given a Content-Length off by a few bytes. Deterministic for a seed (record ids and
dates are fixed; before session 11 warcio drew them, and counts moved a little between runs).

``copy``: the records gzipped as one stream (``gzip crawl.warc``) are copied one member per record
(``recompress_members``), and the copy's pages and images are compared with the uncompressed file's, read by the
same reader: how many files the copy reads fewer of. Runs on older code too (``PYTHONPATH`` a worktree).
``shards``: per-record gzip or uncompressed files, planned at 1, 2 and 3 pages a shard; each shard read from the
plan's record list and from its byte range, all shards together against one full read (offsets, kinds, URLs,
bytes; a corrupt region's reason text may differ between a range read and a full read): the differences.
``mixed``: each record gzipped or not at random within one file (named ``.warc.gz`` or ``.warc`` at random), damaged
as above or cut right after its first line, some files ending in zero padding: the files where the pages and images
read are not exactly the whole records written (one lost, or one more), and where a file holds damage but no corrupt
region is counted, or holds none but one is counted (session 11).
"""
import contextlib
import dataclasses
import gzip
import io
import random
import re
import sys
import tempfile
import uuid
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "engine"))
from howto_site import IMAGES, PAGES_DIR  # noqa: E402

from duetgen.data.engine.warc import iter_warc  # noqa: E402

HOST = "https://howto.example"


def record(uri: str, ctype: str, body: bytes, gz: bool) -> bytes:
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    hh = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
    fixed = {"WARC-Record-ID": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, uri + body[:64].hex())}>",
             "WARC-Date": "2026-01-01T00:00:00Z"}  # (warcio draws a random id and takes the time: runs differed)
    w.write_record(w.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=hh,
                                        warc_headers_dict=fixed))
    return buf.getvalue()


def lying(rec: bytes, delta: int) -> bytes:
    head, _, block = rec.partition(b"\r\n\r\n")
    n = int(re.search(rb"Content-Length: (\d+)", head)[1])
    return re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % max(0, n + delta), head) + b"\r\n\r\n" + block


def damaged_file(rng: random.Random, kinds: dict) -> bytes:
    parts = []
    for _ in range(rng.randint(3, 12)):
        c = rng.random()
        rec = rng.choice(kinds["pages"]) if c < 0.55 else rng.choice(kinds["images"]) if c < 0.8 else kinds["script"]
        m = rng.random()
        if m < 0.12:
            rec = rec[:rng.randint(1, len(rec) - 1)]
        elif m < 0.17:
            rec = rng.randbytes(rng.randint(1, 300))
        elif m < 0.22 and not kinds["gz"]:
            rec = lying(rec, rng.choice([-40, -3, 3, 40]))
        parts.append(rec)
    return b"".join(parts)


def records(gz: bool) -> dict:
    html = (PAGES_DIR / "bathe-a-cat.html").read_bytes()
    return {"gz": gz,
            "pages": [record(f"{HOST}/pages/p{i}.html", "text/html", html.replace(b"Cat", b"Cat %d" % i), gz)
                      for i in range(6)],
            "images": [record(f"{HOST}/img/{name}", ctype, make(), gz) for name, (ctype, make) in
                       list(IMAGES.items())[:6]],
            "script": record(f"{HOST}/x.js", "application/javascript", b"var x = 1;" * 30, gz)}


def fuzz_copy(n: int, seed: int, tmp: Path) -> None:
    from duetgen.data.engine.warc import recompress_members

    rng, kinds, fewer = random.Random(seed), records(gz=False), 0
    for t in range(n):
        raw = damaged_file(rng, kinds)
        plain, one, copy = tmp / f"p{t}.warc", tmp / f"o{t}.warc.gz", tmp / f"c{t}.warc.gz"
        plain.write_bytes(raw)
        one.write_bytes(gzip.compress(raw))
        recompress_members(one, copy)
        want = [(x.kind, x.uri) for x in iter_warc(plain) if x.kind in ("page", "image")]
        got = [(x.kind, x.uri) for x in iter_warc(copy) if x.kind in ("page", "image")]
        fewer += got != want and len(got) <= len(want)
    print(f"{n} damaged streams (seed {seed}): the one-stream copy read fewer pages and images than the same bytes "
          f"uncompressed in {fewer}")


def _shard_differences(path: Path) -> int:
    """Shard reads (from the plan's record lists, and by byte range) that differ from one full read, at 1, 2 and 3
    pages a shard."""
    from duetgen.data.engine import runner

    key = lambda items: [(x.offset, x.kind, x.uri, x.data) for x in items]  # noqa: E731
    full, diffs = key(x for x in iter_warc(path) if x.kind not in ("skip", "image")), 0
    for shard_pages in (1, 2, 3):
        scanned = runner._scan_warc(str(path), shard_pages, 5_000_000)
        if scanned["one_stream"]:
            continue
        groups, listed, ranged = scanned["groups"], [], []
        for i, (start, pages, recs, corrupt) in enumerate(groups):
            spec = runner.ShardSpec(i, "warc", str(path), start=start, num_pages=pages, records=recs,
                                    corrupt=corrupt, end=groups[i + 1][0] if i + 1 < len(groups) else None)
            listed += key(runner._warc_shard_items(spec, 5_000_000))
            ranged += key(runner._warc_shard_items(dataclasses.replace(spec, records=None, corrupt=[]), 5_000_000))
        diffs += (listed != full) + (ranged != full)
    return diffs


def fuzz_shards(n: int, seed: int, tmp: Path) -> None:
    rng, diffs = random.Random(seed), 0
    kinds = {True: records(gz=True), False: records(gz=False)}
    for t in range(n):
        gz = rng.random() < 0.6
        path = tmp / (f"f{t}.warc" + (".gz" if gz else ""))
        path.write_bytes(damaged_file(rng, kinds[gz]))
        diffs += _shard_differences(path)
    print(f"{n} damaged files (seed {seed}) x 3 shard sizes: shard reads that differ from one full read: {diffs}")


def fuzz_mixed(n: int, seed: int, tmp: Path) -> None:
    rng, lost, uncounted, false, shard_diffs = random.Random(seed), 0, 0, 0, 0
    kinds = {True: records(gz=True), False: records(gz=False)}
    for t in range(n):
        parts, want, damaged = [], [], False
        for _ in range(rng.randint(3, 12)):
            gz, c = rng.random() < 0.5, rng.random()
            kind = "pages" if c < 0.55 else "images" if c < 0.8 else "script"
            i = rng.randrange(6)
            rec = kinds[gz][kind] if kind == "script" else kinds[gz][kind][i]
            m = rng.random()
            if m < 0.1:
                rec = rec[:rng.randint(1, len(rec) - 1)]
            elif m < 0.14:
                rec = rng.randbytes(rng.randint(1, 300))
            elif m < 0.18 and not gz:
                rec = rec[:rec.index(b"\r\n") + 2]  # cut right after its first line
            elif m < 0.22 and not gz:
                rec = lying(rec, rng.choice([-40, -3, 3, 40]))
            elif kind != "script":
                want.append((kind[:-1], i))
            damaged = damaged or m < 0.22 and (m < 0.14 or not gz)
            parts.append(rec)
        padding = bytes(rng.choice([1, 512, 4096])) if rng.random() < 0.15 else b""
        path = tmp / f"m{t}.warc{'.gz' if rng.random() < 0.5 else ''}"
        path.write_bytes(b"".join(parts) + padding)
        items = list(iter_warc(path))
        got = [(x.kind, int(re.search(r"(\d+)\.html$", x.uri)[1]) if x.kind == "page"
                else [n for n in IMAGES].index(x.uri.rsplit("/", 1)[1])) for x in items if x.kind in ("page", "image")]
        corrupt = sum(x.kind == "corrupt" for x in items)
        lost += got != want
        shard_diffs += _shard_differences(path)
        if (got != want or bool(damaged) != bool(corrupt)) and "-v" in sys.argv:  # kept to look at
            keep = Path(tempfile.gettempdir()) / "warc_fuzz_failures"
            keep.mkdir(exist_ok=True)
            (keep / path.name).write_bytes(path.read_bytes())
            regions = [(x.offset, x.reason) for x in items if x.kind == "corrupt"]
            print(keep / path.name, "want", want, "got", got, regions)
        uncounted += bool(damaged) and not corrupt
        false += not damaged and corrupt > 0
    print(f"{n} files of gzipped and uncompressed records mixed (seed {seed}): pages and images read not the whole "
          f"records written in {lost}; damage but no corrupt region counted in {uncounted}; a corrupt region "
          f"counted in an undamaged file in {false}; shard reads that differ from one full read: {shard_diffs}")


if __name__ == "__main__":
    mode, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):  # warcio prints zlib errors
        {"copy": fuzz_copy, "shards": fuzz_shards, "mixed": fuzz_mixed}[mode](n, seed, Path(tmp))
