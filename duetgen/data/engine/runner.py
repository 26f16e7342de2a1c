"""Runner: input shards -> stages -> one dataset, resumable, with a local or a Ray executor.

Input (chosen to carry each page's own URL, which relative image links need):
- a JSONL file, one page per line: ``{"url": "https://...", "html": "<html>...", "id"?: str, "source"?: str}``;
- or a directory of ``*.html`` / ``*.htm`` files (read as bytes, decoded by their ``<meta charset>``),
  as a browser saves them: a relative image path is a file beside the page (``img/step1.jpg``),
  read from the page's own folder and never from outside the input directory (``..``, absolute
  paths and symlinks leaving it are dropped as ``outside_input``). A page with a ``<base href>``
  names where its images live: they are fetched over http(s) like a JSONL page's. Absolute
  ``http(s)`` image URLs are always fetched.
- or WARC files (``crawl/*.warc.gz``, a glob or one file; warc.py): HTML responses are the pages,
  the crawl's image responses are indexed by URI and read before anything is fetched.

Design choices (the datatrove recipe):
- The input is cut into shards of ``shard_pages`` pages (JSONL: byte offsets found in one scan;
  WARC: byte ranges of records found by one scan per file, which also lists each range's page records,
  read one by one, and builds the image index),
  planned once and saved in ``OUT/_engine/plan.json`` with the input's size/mtime fingerprint and
  the config; a restart with a different input or config is refused instead of mixing outputs.
- Two passes over the shards. Pass 1 (``sketch_shard``): extract, page filter, language filter and
  a MinHash signature per surviving page -> ``_engine/sketch/shard-N.npz``, which also holds the
  surviving pages as extracted (text items raw and cleaned, image items; zlib'd JSON). Then the driver decides
  cross-page duplicates once over all signatures (neardup.py) -> ``_engine/dedup.json``. Pass 2
  (``build_shard``): only the kept pages, read back from the sketch file (not from the input,
  extracted again: 1.9 of the text path's ~10 CPU ms a page), go through images, text and dialogue;
  a kept page that yields no record is replaced by its cluster's next copy (``build_shard``).
- Workers write their own output: a pass-2 task writes its shard's records and images straight
  into the dataset (``ShardFileWriter``: images, then the shard file, each tmp + fsync + rename),
  then its completion marker ``_engine/done/shard-N.json`` (counters), and returns only counts.
  The driver lists the shards with markers in the manifest, in input order. Its memory does not
  grow with the records (benchmarks/data_engine.py measures it); on Ray every node must see OUT
  (and the input) at the same path: shared storage.
- Exactly once across kills: a shard is done iff its marker exists; the manifest is rebuilt from
  the markers at every start; a shard file without a marker is not listed (readers never see it)
  and is replaced when the shard reruns. Sketches and the dedup decision are files written
  atomically too, so a restart continues where the kill left off and decides the same way.
- Record ids: the input's ``id``, else ``web-`` + sha256(url)[:16]; a repeated id (the same URL
  twice in the input) keeps its first occurrence (``duplicate_id`` in ``dedup_pages``).
"""

from __future__ import annotations

import bisect
import fcntl
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import threading
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from duetgen.data.engine.document import Doc, ImageItem, StageStats, TextItem
from duetgen.data.engine.extract import ExtractConfig
from duetgen.data.engine.fetch import FetchConfig
from duetgen.data.engine.funnel import write_report
from duetgen.data.engine.images import ImageRuleConfig
from duetgen.data.engine.language import LanguageConfig
from duetgen.data.engine.neardup import NearDupPageConfig, PageSketcher, Sketch, decide
from duetgen.data.engine.stages import PageFilterConfig, build_stages, page_stages, run_stages
from duetgen.data.engine.warc import ONE_STREAM, WarcImageIndex, WarcItem, is_warc, iter_warc, recompress_members
from duetgen.data.dataset import MANIFEST, ShardFileWriter, atomic_write_bytes, shard_name, write_manifest

ENGINE_DIR = "_engine"
_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


class EngineError(ValueError):
    """Bad input or an output directory that cannot be (re)used. The message names it."""


@dataclass
class EngineConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    pages: PageFilterConfig = field(default_factory=PageFilterConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    neardup: NearDupPageConfig = field(default_factory=NearDupPageConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    images: ImageRuleConfig = field(default_factory=ImageRuleConfig)
    dedup_max_distance: int = 8  # pHash bits; measured: re-encoded / slightly cropped photos land at 0-6
    fetch_threads: int = 8  # concurrent image downloads per worker (I/O bound)
    # Pages per shard: the unit of work, of restart and of one dataset shard. A worker holds one
    # page (an LLM stage: one batch of pages) at a time and writes records as they come.
    shard_pages: int = 50
    source: str = "web"  # Record.source when the input line gives none
    llm_url: str | None = None  # OpenAI-compatible base URL; None = rules and templates only
    llm_model: str | None = None
    llm_api_key: str | None = field(default=None, repr=False)  # never written to disk
    llm_concurrency: int = 16  # requests in flight per worker
    llm_max_retries: int = 4  # per request, on 429 / 5xx / timeouts
    llm_timeout_s: float = 120.0  # per request
    llm_batch_pages: int = 16  # pages whose LLM requests are sent together
    llm_cache: str | None = None  # SQLite cache path; default OUT/_engine/llm_cache.sqlite
    warc_index: str | None = None  # set by run_engine for WARC input: OUT/_engine/warc_images.sqlite

    def fingerprint(self) -> dict:
        """The settings of a run as saved in its plan (no secrets, no paths); ``output_settings`` of it must not
        change between a killed run and its restart."""
        d = asdict(self)
        for k in ("llm_api_key", "llm_cache", "warc_index"):
            d.pop(k)
        return d


# how the LLM is reached, not what it is asked: a resume may change them (a restarted server's new port, fewer
# requests in flight for an overloaded one); the model, the prompts and whether an LLM is used at all stay
OPERATIONAL_SETTINGS = ("llm_url", "llm_concurrency", "llm_max_retries", "llm_timeout_s", "llm_batch_pages")


def output_settings(config_fingerprint: dict) -> dict:
    """The part of a saved ``EngineConfig.fingerprint()`` that decides the output."""
    d = {k: v for k, v in config_fingerprint.items() if k not in OPERATIONAL_SETTINGS}
    d["uses_llm"] = bool(config_fingerprint.get("llm_url"))
    return d


# ----------------------------------------------------------------------------- input
@dataclass
class ShardSpec:
    index: int
    kind: str  # "jsonl" | "html_dir" | "warc"
    path: str  # the JSONL file, the directory or the WARC file
    start: int = 0  # jsonl: byte offset of the first line; warc: of the first record; html_dir: unused
    first_line: int = 0  # jsonl: 1-based number of the first line
    num_pages: int = 0
    files: list[str] = field(default_factory=list)  # html_dir: paths relative to the directory
    end: int | None = None  # warc: the records starting in [start, end) (None: to the end of the file)
    # warc: what the plan's scan found in the range; the shard reads just those records (records None: a plan made
    # before these were kept, which reads the whole range, image records too)
    records: list[int] | None = None  # offsets of the page and too-large records
    corrupt: list[list] = field(default_factory=list)  # corrupt regions, [offset, reason]


def _missing_input(path: Path) -> EngineError:
    return EngineError(f"input {str(path)!r} does not exist (expected a .jsonl file, a directory of .html files, "
                       "or WARC files: a .warc / .warc.gz file or a glob such as 'crawl/*.warc.gz')")


def warc_files(input_path: str | Path) -> list[Path] | None:
    """The WARC files named by ``input_path`` (a glob or one .warc / .warc.gz file), None if it names no WARC."""
    s = str(input_path)
    if any(c in s for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(s))
        if not files:
            raise EngineError(f"input {s!r} matches no file")
        bad = [str(p) for p in files if not (is_warc(p) and p.is_file())]
        if bad:
            raise EngineError(f"input {s!r}: {bad[0]!r} is not a .warc / .warc.gz file")
        unique: dict[Path, Path] = {}  # a file the glob names twice (a symlink to it) is read once, by its own
        for p in files:                # name rather than a link's (records cite it in meta.engine.input)
            target = p.resolve()
            if unique.setdefault(target, p).is_symlink() and not p.is_symlink():
                unique[target] = p
        return list(unique.values())
    if is_warc(s):
        if not Path(s).is_file():
            raise EngineError(f"input {s!r} does not exist")
        return [Path(s)]
    return None


def _input_fingerprint(path: Path) -> dict:
    warcs = warc_files(path)
    if warcs is not None:
        return {"warc": [{"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                         for p in warcs]}
    if path.is_file():
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    for p in _html_files(path):
        st = (path / p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files_sha256": h.hexdigest()}


def _html_files(root: Path) -> list[str]:
    root_resolved = root.resolve()
    out = []
    for p in root.rglob("*"):
        if p.suffix.lower() in (".html", ".htm") and p.is_file():
            if not p.resolve().is_relative_to(root_resolved):  # a symlink pointing outside the input
                continue
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def plan_shards(input_path: str | Path, shard_pages: int) -> list[ShardSpec]:
    path = Path(input_path)
    if path.is_dir():
        files = _html_files(path)
        if not files:
            warcs = [p for p in path.iterdir() if is_warc(p)]
            hint = f"; it holds WARC files: give them as a quoted glob, --input '{path / '*.warc*'}'" if warcs else ""
            raise EngineError(f"input directory {str(path)!r} holds no .html/.htm files{hint}")
        return [ShardSpec(i // shard_pages, "html_dir", str(path), num_pages=len(files[i:i + shard_pages]),
                          files=files[i:i + shard_pages]) for i in range(0, len(files), shard_pages)]
    if not path.is_file():
        raise _missing_input(path)
    if not path.name.endswith(".jsonl"):
        raise EngineError(f"input {str(path)!r}: a file input must be JSONL ({{url, html}} per line) named *.jsonl")
    shards, n, start, start_line = [], 0, 0, 1
    with open(path, "rb") as f:
        for offset, line_no, nonempty in _lines(f):
            if not nonempty:
                continue
            if n == 0:
                start, start_line = offset, line_no
            n += 1
            if n == shard_pages:
                shards.append(ShardSpec(len(shards), "jsonl", str(path), start, start_line, n))
                n = 0
    if n:
        shards.append(ShardSpec(len(shards), "jsonl", str(path), start, start_line, n))
    if not shards:
        raise EngineError(f"input {str(path)!r} holds no pages (empty JSONL)")
    return shards


def scan_warc_file(task: tuple) -> dict:
    """One WARC file's shard boundaries, image responses and record counts (runs in a worker).

    ``task``: (path, pages a shard, page cap[, work folder]). With a work folder, a ``.warc.gz`` whose records
    share gzip members (``gzip crawl.warc``; the scan meets it as a corrupt region saying so) is copied there as
    one gzip member per record (``recompress_members``) and scanned again: the copy is what the shards and the
    image index read (the result's ``path``)."""
    path, shard_pages, page_cap, *rest = task
    scanned = _scan_warc(path, shard_pages, page_cap)
    if scanned.pop("one_stream") and rest:
        key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]  # two inputs may share a name
        copy = Path(rest[0]) / "warc" / f"{key}-{Path(path).name}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        recompress_members(path, copy)
        scanned = _scan_warc(str(copy), shard_pages, page_cap)
        del scanned["one_stream"]
        scanned["counts"]["recompressed_files"] = 1
    scanned["counts"] = dict(scanned["counts"])
    return scanned


def _scan_warc(path: str, shard_pages: int, page_cap: int) -> dict:
    groups: list[list] = []  # [start offset, pages, their record offsets, corrupt regions as [offset, reason]]
    images: list[tuple[str, str, int]] = []
    aliases: list[tuple[str, str]] = []  # a 3xx response's Location, a revisit's earlier copy
    counts: Counter = Counter()
    one_stream = False
    for item in iter_warc(path, page_cap=page_cap, read_pages=False):
        counts["records"] += 1
        if item.kind == "image":
            counts["image_responses"] += 1
            if item.uri:
                images.append((item.uri, path, item.offset))
            continue
        if item.kind == "skip":
            counts[f"skipped_{item.reason}"] += 1
            if item.uri and item.alias_of:
                aliases.append((item.uri, item.alias_of))
            continue
        counts[{"page": "html_pages", "too_large": "too_large_pages", "corrupt": "corrupt_regions"}[item.kind]] += 1
        one_stream |= item.kind == "corrupt" and item.reason.startswith(ONE_STREAM)
        # a corrupt region belongs with the record it is charged to: never a group start
        if item.kind != "corrupt" and (not groups or groups[-1][1] >= shard_pages):
            groups.append([0 if not groups else item.offset, 0, [], []])
        if not groups:  # a corrupt region before any page
            groups.append([0, 0, [], []])
        groups[-1][1] += 1
        if item.kind == "corrupt":
            groups[-1][3].append([item.offset, item.reason])
        else:
            groups[-1][2].append(item.offset)
    if not counts["records"]:  # an empty file (or one whose bytes hold no record header at all) is counted, not silent
        counts["files_without_records"] += 1
    return {"path": path, "groups": groups, "images": images, "aliases": aliases, "counts": counts,
            "one_stream": one_stream}


def plan_warc(files: list[Path], shard_pages: int, page_cap: int, work: Path, executor) -> tuple[list[ShardSpec], dict]:
    """Shards of every WARC file (byte ranges) and the image index, from one scan per file."""
    index_path = work / "warc_images.sqlite"
    tmp = work / "warc_images.sqlite.tmp"
    tmp.unlink(missing_ok=True)
    index = WarcImageIndex(tmp, writable=True)
    shards: list[ShardSpec] = []
    totals: Counter = Counter()
    for res in executor.map_ordered(scan_warc_file, [(str(p), shard_pages, page_cap, str(work)) for p in files]):
        index.add_many(res["images"], res["aliases"])
        totals.update(res["counts"])
        groups = res["groups"]
        for i, (start, n, records, corrupt) in enumerate(groups):
            end = groups[i + 1][0] if i + 1 < len(groups) else None
            shards.append(ShardSpec(len(shards), "warc", res["path"], start=start, end=end, num_pages=n,
                                    records=records, corrupt=corrupt))
    index.close()
    os.replace(tmp, index_path)
    if not (totals["html_pages"] or totals["too_large_pages"]):  # (corrupt regions alone: not WARC files at all?)
        raise EngineError(f"input {', '.join(str(p) for p in files[:3])}: no HTML responses in the WARC file(s) "
                          f"(records: {dict(sorted(totals.items()))})")
    return shards, {"files": len(files), **dict(sorted(totals.items()))}


def _lines(f) -> Iterator[tuple[int, int, bool]]:
    """(byte offset, 1-based line number, has non-space content) of every line, in 1 MiB reads."""
    offset, line_no, start, nonempty, in_line = 0, 0, 0, False, False
    while chunk := f.readline(1 << 20):
        if not in_line:
            start, nonempty, in_line = offset, False, True
        offset += len(chunk)
        nonempty = nonempty or bool(chunk.strip())
        if chunk.endswith(b"\n"):
            line_no += 1
            in_line = False
            yield start, line_no, nonempty
    if in_line:
        yield start, line_no + 1, nonempty


def _read_capped_line(f, cap: int) -> tuple[bytes | None, int]:
    """(line, bytes consumed); line is None when longer than ``cap`` (the rest is skipped unread)."""
    line = f.readline(cap + 1)
    consumed = len(line)
    if len(line) <= cap or line.endswith(b"\n"):
        return line, consumed
    while True:  # too long: skip to the end of the line in bounded chunks
        chunk = f.readline(1 << 20)
        consumed += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return None, consumed


def _doc_id(given: Any, url: str | None, fallback: str) -> str:
    if isinstance(given, str) and _ID_RE.match(given):
        return given
    return "web-" + hashlib.sha256((url or fallback).encode()).hexdigest()[:16]


def read_shard(spec: ShardSpec, cfg: EngineConfig) -> Iterator[Doc]:
    """The shard's pages as Docs; an unreadable entry becomes a Doc the extract stage drops with its reason."""
    cap = cfg.extract.max_html_bytes * 2 + 65536  # JSON escaping can double the size; above that: too large
    if spec.kind == "warc":
        yield from _read_warc_shard(spec, cfg)
        return
    if spec.kind == "html_dir":
        root = Path(spec.path)
        for rel in spec.files:
            p = root / rel
            d = Doc(id=_doc_id(None, None, rel), url=None, source=cfg.source,
                    meta={"engine": {"shard": spec.index, "input": rel}}, local_root=str(root), local_page=rel)
            size = p.stat().st_size
            if size > cfg.extract.max_html_bytes:
                d.meta["input_drop"] = ("page_too_large", f"{rel}: {size:,} bytes > cap {cfg.extract.max_html_bytes:,}")
            else:
                d.html = p.read_bytes()
            yield d
        return
    name = Path(spec.path).name
    with open(spec.path, "rb") as f:
        f.seek(spec.start)
        line_no, seen = spec.first_line - 1, 0
        while seen < spec.num_pages:
            raw, consumed = _read_capped_line(f, cap)
            if consumed == 0:
                break
            line_no += 1
            where = f"{name}:{line_no}"
            if raw is not None and not raw.strip():
                continue
            seen += 1
            d = Doc(id=_doc_id(None, None, where), url=None, source=cfg.source,
                    meta={"engine": {"shard": spec.index, "input": where}})
            if raw is None:
                d.meta["input_drop"] = ("page_too_large", f"{where}: line over {cap:,} bytes")
                yield d
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict) or not isinstance(obj.get("html"), str):
                    raise ValueError("expected an object with a string 'html'")
                url = obj.get("url")
                if url is not None and not isinstance(url, str):
                    raise ValueError("'url' must be a string")
                if url is not None:  # a JSON "\ud800" escape makes a lone surrogate: no URL (and no id from it)
                    url.encode("utf-8")  # UnicodeEncodeError is a ValueError: bad_input, named below
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting past the stack
                why = "JSON nested too deeply" if isinstance(e, RecursionError) else e
                d.meta["input_drop"] = ("bad_input", f"{where}: {why}")
                yield d
                continue
            d.id = _doc_id(obj.get("id"), url, where)
            d.url, d.html = url, obj["html"]
            if isinstance(obj.get("source"), str) and _ID_RE.match(obj["source"]):
                d.source = obj["source"]
            yield d


def _warc_shard_items(spec: ShardSpec, page_cap: int) -> Iterator[WarcItem]:
    """The shard's page and too-large records and its corrupt regions, in file order. The plan's scan listed them,
    so each record is read alone from its offset: the range's image and other records are not decompressed again
    (in a crawl that holds its pages' images, most of its bytes). A plan without the lists reads the range."""
    if spec.records is None:
        yield from (x for x in iter_warc(spec.path, spec.start, spec.end, page_cap) if x.kind not in ("skip", "image"))
        return
    listed = sorted([(offset, None) for offset in spec.records] + [(offset, reason) for offset, reason in spec.corrupt],
                    key=lambda x: (x[0], x[1] is not None))  # file order; a record before a region charged to it
    for offset, reason in listed:
        if reason is not None:
            yield WarcItem(offset=offset, kind="corrupt", reason=reason)
            continue
        records = iter_warc(spec.path, offset, offset + 1, page_cap)
        item = next(records, None)  # the one record there, its digest checked; the next one is never touched
        records.close()
        if item is None or item.kind not in ("page", "too_large", "corrupt"):  # (the input's size and mtime held)
            item = WarcItem(offset=offset, kind="corrupt",
                            reason="not the page record the plan found here: the file changed since the plan")
        yield item


def _read_warc_shard(spec: ShardSpec, cfg: EngineConfig) -> Iterator[Doc]:
    """The HTML responses (and corrupt regions, too-large pages, as Docs to drop) of one shard."""
    name = Path(spec.path).name
    for item in _warc_shard_items(spec, cfg.extract.max_html_bytes):
        where = f"{name}@{item.offset}"
        d = Doc(id=_doc_id(None, item.uri, where), url=item.uri, source=cfg.source,
                meta={"engine": {"shard": spec.index, "input": where}})
        if item.kind == "corrupt":
            d.url = None
            d.meta["input_drop"] = ("corrupt_warc_record", f"{where}: {item.reason}")
        elif item.kind == "too_large":
            d.meta["input_drop"] = ("page_too_large", f"{where}: {item.reason}")
        else:
            d.meta["warc"] = {"record_id": item.record_id, "date": item.date}
            data = item.data
            if item.charset and not data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
                d.html = data.decode(item.charset, errors="replace")  # WHATWG: HTTP charset before <meta>
                d.meta["encoding"] = item.charset
            else:
                d.html = data  # the extractor decodes: BOM, <meta charset>, UTF-8, windows-1252
        yield d


def _numbered(docs: Iterator[Doc]) -> Iterator[Doc]:
    """Tag each Doc with its position in the shard's reading order (the same in both passes)."""
    for i, d in enumerate(docs):
        d.pos = i
        yield d


# ----------------------------------------------------------------------------- one shard (in a worker)
def _name(index: int) -> str:
    return f"shard-{index:05d}"


def page_to_json(d: Doc) -> dict:
    """A page as pass 1 leaves it (extracted, language in meta), for pass 2 to start from."""
    items = [["text", x.text, x.kind, x.level, x.group, x.cleaned] if isinstance(x, TextItem)
             else ["image", x.src, x.alt, x.group, x.hints] for x in d.items]
    return {"pos": d.pos, "id": d.id, "url": d.url, "base_url": d.base_url, "title": d.title, "source": d.source,
            "meta": d.meta, "local_root": d.local_root, "local_page": d.local_page, "items": items}


def page_from_json(o: dict) -> Doc:
    items = [TextItem(text=x[1], kind=x[2], level=x[3], group=x[4], cleaned=x[5]) if x[0] == "text"
             else ImageItem(src=x[1], alt=x[2], group=x[3], hints=x[4]) for x in o["items"]]
    return Doc(id=o["id"], url=o["url"], base_url=o.get("base_url"), title=o["title"], items=items,
               source=o["source"], meta=o["meta"], local_root=o["local_root"], local_page=o["local_page"], pos=o["pos"])


def sketch_shard(task: tuple[ShardSpec, EngineConfig, str]) -> dict:
    """Pass 1 over one shard: page stages + a MinHash per surviving page -> ``_engine/sketch/shard-N.npz``
    (with the surviving pages as extracted, which pass 2 starts from)."""
    spec, cfg, work = task
    t0 = time.perf_counter()
    docs, stats = run_stages(page_stages(cfg), _numbered(read_shard(spec, cfg)))
    sketch = PageSketcher(cfg.neardup)
    pos, sigs, info, pages = [], [], [], []
    for d in docs:
        pos.append(d.pos)
        sigs.append(sketch(d.clean_text))  # set by the language filter
        info.append({"id": d.id, "url": d.url, "title": d.title[:200], "images": len(d.images),
                     "language": d.meta.get("language")})
        pages.append(page_to_json(d))
    meta = json.dumps({"index": spec.index, "pages": info, "stats": [s.to_json() for s in stats],
                       "wall_s": time.perf_counter() - t0}).encode()
    buf = io.BytesIO()
    np.savez(buf, pos=np.asarray(pos, dtype=np.int64),
             sig=np.stack(sigs) if sigs else np.zeros((0, cfg.neardup.num_perm), dtype=np.uint32),
             meta=np.frombuffer(meta, dtype=np.uint8),
             # zlib level 1: 16.8 -> 3.2 KB a benchmark page (each block is there raw and cleaned; its HTML:
             # 10 KB), 0.07 CPU ms a page to compress, 0.04 to decompress
             pages=np.frombuffer(zlib.compress(json.dumps(pages, ensure_ascii=False).encode(), 1), dtype=np.uint8))
    atomic_write_bytes(Path(work) / "sketch" / f"{_name(spec.index)}.npz", buf.getvalue())
    return {"index": spec.index, "pages": len(pos)}


def _load_sketch(work: Path, index: int, with_sigs: bool = False) -> tuple[dict, np.ndarray, np.ndarray | None]:
    with np.load(work / "sketch" / f"{_name(index)}.npz", allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        return meta, z["pos"], (z["sig"] if with_sigs else None)


def stored_pages(work: Path, index: int, keep: set[int]) -> Iterator[Doc]:
    """The pages at positions ``keep`` of a shard, as pass 1 extracted them (read from its sketch file)."""
    path = work / "sketch" / f"{_name(index)}.npz"
    with np.load(path, allow_pickle=False) as z:
        if "pages" not in z.files:
            raise EngineError(f"{str(path)!r} was written by an engine before pass 2 read pages from it; "
                              "use a new --out (or delete it) to start over")
        pages = json.loads(zlib.decompress(z["pages"].tobytes()))
    for o in pages:
        if o["pos"] in keep:
            yield page_from_json(o)


def build_shard(task: tuple) -> dict:
    """Pass 2 over one shard: the kept pages -> records written into OUT by this worker, then the marker.

    ``task`` = (spec, cfg, keep, out[, copies]): ``keep`` the positions in the shard of the pages to build;
    ``copies`` {kept position: [(shard, pos) of its dropped near-duplicates, id order]}. When a kept page yields
    no record (its images failed, say), its copies are built in turn until one does: that one is written here
    (``promoted`` in the marker; the funnel counts it kept at dedup and through every pass-2 stage)."""
    spec, cfg, keep, out, *rest = task
    copies = rest[0] if rest else {}
    t0 = time.perf_counter()
    out = Path(out)
    client = None
    if cfg.llm_url:
        from duetgen.llm import LLMClient

        client = LLMClient(cfg.llm_url, cfg.llm_model or "default", api_key=cfg.llm_api_key,
                           max_concurrency=cfg.llm_concurrency, max_retries=cfg.llm_max_retries,
                           timeout_s=cfg.llm_timeout_s, cache_path=cfg.llm_cache)

    write = StageStats("write")
    promoted: list[list[int]] = []
    copy_api_errors = 0  # LLM API errors of copies tried and not kept (not in the funnel; a rerun retries them)
    try:
        read: dict[int, str] = {}  # position -> id of every kept page read

        def pages():
            for d in stored_pages(out / ENGINE_DIR, spec.index, set(keep)):
                read[d.pos] = d.id
                yield d

        docs, stats = run_stages(build_stages(cfg, client, cfg.warc_index), pages())
        writer = ShardFileWriter(out, spec.index)

        def put(d) -> None:
            write.pages_in += 1
            write.images_in += len(d.record.image_parts())
            writer.write(d.record)
            write.pages_out += 1
            write.images_out += len(d.record.image_parts())

        try:
            written = set()
            for d in docs:
                put(d)
                written.add(d.id)
            for pos in sorted(p for p in copies if p in read and read[p] not in written):
                for shard, copy_pos in copies[pos]:  # the kept page yielded nothing: its next copy, in id order
                    page = next(stored_pages(out / ENGINE_DIR, shard, {copy_pos}))
                    built, copy_stats = run_stages(build_stages(cfg, client, cfg.warc_index), iter([page]))
                    built = list(built)
                    if not built:  # not counted in the funnel (it stays a near-duplicate drop), but its API errors
                        copy_api_errors += _llm_api_errors([st.to_json() for st in copy_stats])  # make a rerun
                    else:  # counted only when it is kept
                        for total, more in zip(stats, copy_stats):
                            total.merge(more)
                        put(built[0])
                        promoted.append([shard, copy_pos])
                        break
        except BaseException:  # a failed page or a full disk (whose OSError names the file): no temporary shard left
            writer.abort()
            raise
        n = writer.commit()
    finally:
        if client is not None:
            client.close()
    wall = time.perf_counter() - t0
    marker = {"index": spec.index, "records": n, "wall_s": wall, "stats": [s.to_json() for s in stats] + [write.to_json()],
              "promoted": promoted, "copy_llm_api_errors": copy_api_errors}
    atomic_write_bytes(out / ENGINE_DIR / "done" / f"{_name(spec.index)}.json", json.dumps(marker).encode())
    return {"index": spec.index, "records": n, "wall_s": wall}


# ----------------------------------------------------------------------------- executors
def _die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Pool-worker initializer: exit as soon as the driver is gone.

    A SIGKILLed driver cannot stop its pool, and a worker waits on its task queue forever (it holds
    both ends of the pipe, so it never sees EOF): two workers of 150-175 MB each were observed
    re-parented to PID 1 for minutes (issue 15). A daemon thread polls the parent pid instead.
    """
    if os.getppid() != parent_pid:  # the driver died before this worker started
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)  # no cleanup: the driver, which alone writes the dataset, is gone

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


class LocalExecutor:
    """In-process for one worker (easy to debug); a spawn process pool for more, whose workers exit
    within ``poll_s`` of the driver's death (``_die_with_parent``)."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise EngineError(f"--workers must be >= 1, got {workers}")
        self.workers = workers

    def map_ordered(self, fn: Callable, tasks: list) -> Iterator:
        if self.workers == 1:
            for t in tasks:
                yield fn(t)
            return
        # A worker that dies (the OOM killer, a kill) breaks the whole pool: the tasks not yet returned run again in
        # a fresh pool (a task writes its shard under a name of its own, then renames it: running it again writes
        # the same shard). Two deaths in a row before the next task returns stop the run, rerunnable.
        tasks, done, broke_at = list(tasks), 0, None
        while done < len(tasks):
            try:
                for result in self._map_in_pool(fn, tasks[done:]):
                    yield result
                    done += 1
            except BrokenProcessPool:
                if broke_at == done:
                    raise EngineError(
                        f"a worker process died twice with shard task {done + 1} of {len(tasks)} unfinished (killed, "
                        "or out of memory?); finished shards are kept: rerun the same command to resume (fewer "
                        "--workers use less memory)") from None
                broke_at = done
                print(f"warning: a worker process died (killed, or out of memory?); running the {len(tasks) - done} "
                      "unfinished shard task(s) again in new workers", file=sys.stderr)

    def _map_in_pool(self, fn: Callable, tasks: list) -> Iterator:
        # spawn, not fork: the driver may hold threads (progress bar, sqlite) that fork would copy mid-state.
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            window: deque = deque()
            it = iter(tasks)
            for t in it:  # keep workers + 2 shards in flight; yield strictly in input order
                window.append(pool.submit(fn, t))
                if len(window) >= self.workers + 2:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()


class RayExecutor:
    """Same contract on a Ray cluster (``address``) or a local Ray started here (``address=None``)."""

    def __init__(self, address: str | None = None, workers: int | None = None):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, num_cpus=workers if address is None else None,
                     include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        self.ray = ray
        self.window = int(ray.available_resources().get("CPU", 1)) + 2

    def map_ordered(self, fn: Callable, tasks: list) -> Iterator:
        remote = self.ray.remote(fn)
        window: deque = deque()
        for t in tasks:
            window.append(remote.remote(t))
            if len(window) >= self.window:
                yield self.ray.get(window.popleft())
        while window:
            yield self.ray.get(window.popleft())


# ----------------------------------------------------------------------------- driver
# plan.json's layout: 1 (no "format" key) before WARC shards listed their records, 2 since. A plan of a later
# format than this code knows is refused by name (older code, without this check, crashed on the new fields).
PLAN_FORMAT = 2


def _check_plan(work: Path, input_path: Path, cfg: EngineConfig, executor) -> tuple[list[ShardSpec], dict]:
    plan_path = work / "plan.json"
    fp = {"input": _input_fingerprint(input_path), "config": cfg.fingerprint()}
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if plan.get("format", 1) > PLAN_FORMAT:
            raise EngineError(
                f"output {str(work.parent)!r} was planned by a newer duetgen (plan format {plan['format']}, this "
                f"version reads up to {PLAN_FORMAT}): resume it with that version, or use a new --out")
        saved, now = plan["fingerprint"], json.loads(json.dumps(fp))
        was, new = output_settings(saved["config"]), output_settings(now["config"])
        differ = (["the input files"] if saved["input"] != now["input"] else []) + sorted(
            k for k in was.keys() | new.keys() if was.get(k) != new.get(k))
        if differ:
            raise EngineError(
                f"output {str(work.parent)!r} belongs to a run with a different input or config "
                f"({', '.join(differ)} changed); use a new --out (or delete it) to start over")
        return [ShardSpec(**s) for s in plan["shards"]], plan.get("warc") or {}
    warcs = warc_files(input_path)
    warc: dict = {}
    if warcs is not None:
        shards, warc = plan_warc(warcs, cfg.shard_pages, cfg.extract.max_html_bytes, work, executor)
    else:
        shards = plan_shards(input_path, cfg.shard_pages)
    plan = {"format": PLAN_FORMAT, "fingerprint": fp, "shards": [asdict(s) for s in shards], "warc": warc}
    atomic_write_bytes(plan_path, json.dumps(plan).encode())
    return shards, warc


def run_engine(input_path: str | Path, out: str | Path, cfg: EngineConfig, executor=None,
               progress: bool = True) -> dict:
    """Run (or resume) the engine. Returns the funnel JSON (also written to OUT/funnel.{json,html})."""
    input_path, out = Path(input_path), Path(out)
    t0 = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise EngineError(f"output {str(out)!r} is a file, not a folder: --out names the dataset folder to write")
    if (out / MANIFEST).exists() and not (out / ENGINE_DIR / "plan.json").exists():
        raise EngineError(f"output {str(out)!r} already holds a dataset not written by this engine")
    if out.is_dir() and any(out.iterdir()) and not (out / ENGINE_DIR).is_dir():
        raise EngineError(f"output {str(out)!r} is a folder with other files in it and no engine run "
                          f"({ENGINE_DIR}/): give a new or empty folder, or the --out of a run to resume")
    work = out / ENGINE_DIR
    if not (work / "plan.json").exists() and warc_files(input_path) is None and not input_path.exists():
        raise _missing_input(input_path)  # before OUT is made (a glob that matches nothing raised just now)
    for sub in ("sketch", "done"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    lock = open(work / "run.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise EngineError(f"another engine run is using {str(out)!r}") from None
    try:
        executor = executor or LocalExecutor(1)
        shards, warc = _check_plan(work, input_path, cfg, executor)
        if cfg.llm_url and cfg.llm_cache is None:
            cfg.llm_cache = str(work / "llm_cache.sqlite")
        if warc:
            cfg.warc_index = str(work / "warc_images.sqlite")
        by_index = {s.index: s for s in shards}
        # pass 1: sketches
        todo = [s for s in shards if not (work / "sketch" / f"{_name(s.index)}.npz").exists()]
        for _ in _run(executor, sketch_shard, ((s, cfg, str(work)) for s in todo), len(shards), len(todo), "pages",
                      progress):
            pass  # each task wrote its sketch file; results are counts only
        # the cross-page decision, once
        keep = _decide(work, shards, cfg)
        # pass 2: the kept pages, each shard written by its worker
        done = {s.index for s in shards if (work / "done" / f"{_name(s.index)}.json").exists()}
        # a shard where LLM requests failed (server down, 5xx / 429 / timeouts after the retries) is built again:
        # its answers received are cached, the failed ones are asked again (an API error is never cached)
        retried = {i for i in done if cfg.llm_url and _marker_llm_api_errors(work, i)}
        done -= retried
        for stale in (out / "shards").glob(".part-*.tmp") if (out / "shards").is_dir() else ():
            stale.unlink(missing_ok=True)  # a killed writer's (this run holds the lock; a task of a killed --ray
            # driver still writing loses its file here and fails, harmlessly: its shard has no marker and runs again)
        listed = _publish(out, work, shards, done)
        todo2 = [s for s in shards if s.index not in done]
        tasks = ((s, cfg, keep(s.index), str(out), keep.copies(s.index)) for s in todo2)
        last = time.monotonic()
        for result in _run(executor, build_shard, tasks, len(shards), len(todo2), "records", progress):
            if result["records"]:
                # input order, also when a resume finishes shards between ones done before (by number:
                # part-100000 sorts between part-10000 and part-10001 by name)
                bisect.insort(listed, (shard_name(result["index"]), result["records"]), key=_shard_number)
            if time.monotonic() - last > 2.0:  # the manifest follows the markers, a few times a minute
                write_manifest(out, listed)
                last = time.monotonic()
        write_manifest(out, listed)
        stages = _merge_funnel(work, [by_index[i] for i in sorted(by_index)])
        summary = {"input": str(input_path), "output": str(out), "shards": len(shards),
                   "pages_in": sum(s.num_pages for s in shards), "records_out": sum(n for _, n in listed),
                   **({"warc": warc} if warc else {}),
                   "llm_model": cfg.llm_model if cfg.llm_url else None,
                   "wall_s_this_run": round(time.perf_counter() - t0, 2),
                   "shards_run_now": len(todo2), "shards_retried_for_llm_errors": len(retried),
                   "llm_api_errors": _llm_api_errors([st.to_json() for st in stages])}
        return write_report(out, stages, summary)
    finally:
        lock.close()


def _llm_api_errors(stats: list[dict]) -> int:
    """Pages, images and text blocks dropped because an LLM request failed and may not next time (``llm_api_error``:
    unreachable, 429 / 5xx / timeouts after the retries), over stage stats."""
    return sum(st.get(kind, {}).get("llm_api_error", 0) for st in stats
               for kind in ("page_drops", "image_drops", "text_drops"))


def _marker_llm_api_errors(work: Path, index: int) -> int:
    """``_llm_api_errors`` of a done shard, with those of the near-duplicate copies it tried and did not keep."""
    marker = json.loads((work / "done" / f"{_name(index)}.json").read_text())
    return _llm_api_errors(marker["stats"]) + marker.get("copy_llm_api_errors", 0)


def _run(executor, fn, tasks, total: int, n_todo: int, what: str, progress: bool) -> Iterator[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    label = {"pages": "pass 1 (pages, dedup)", "records": "pass 2 (images, records)"}[what]
    bar = Progress(TextColumn(f"data engine {label}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                   TimeRemainingColumn(), disable=not progress, transient=True)
    with bar:
        task = bar.add_task("shards", total=total, completed=total - n_todo)
        for result in executor.map_ordered(fn, tasks):
            bar.advance(task)
            yield result


class DedupDecision:
    """``dedup.json`` read back: ``decision(index)`` -> the positions of a shard that pass 2 builds;
    ``copies(index)`` -> {position of a kept page: [(shard, pos) of its dropped near-duplicates, id order]}."""

    def __init__(self, work: Path, saved: dict):
        self.work, self.drops = work, saved["drops"]
        self._copies = saved.get("copies", {})  # a dedup.json from before copies were kept has none

    def __call__(self, index: int) -> list[int]:
        _, pos, _ = _load_sketch(self.work, index)
        dropped = {p for p, _ in self.drops.get(str(index), [])}
        return [p for p in pos.tolist() if p not in dropped]

    def copies(self, index: int) -> dict[int, list[tuple[int, int]]]:
        return {int(p): [tuple(c) for c in cs] for p, cs in self._copies.get(str(index), {}).items()}


def _decide(work: Path, shards: list[ShardSpec], cfg: EngineConfig) -> DedupDecision:
    """Decide duplicates over every sketch once (``dedup.json``)."""
    path = work / "dedup.json"
    if not path.exists():
        sketches = []
        for s in shards:
            meta, pos, sig = _load_sketch(work, s.index, with_sigs=True)
            for p, page, row in zip(pos.tolist(), meta["pages"], sig):
                sketches.append(Sketch(s.index, p, page["id"], page["url"], page["title"], page["images"], row))
        copies: dict[tuple[int, int], list[tuple[int, int]]] = {}
        drops, stats = decide(sketches, cfg.neardup, copies)
        del sketches
        by_shard: dict[str, list] = {}
        for (shard, p), reason in sorted(drops.items()):
            by_shard.setdefault(str(shard), []).append([p, reason])
        copies_by_shard: dict[str, dict] = {}
        for (shard, p), cs in sorted(copies.items()):
            copies_by_shard.setdefault(str(shard), {})[str(p)] = [list(c) for c in cs]
        atomic_write_bytes(path, json.dumps({"drops": by_shard, "copies": copies_by_shard,
                                             "stats": stats.to_json()}).encode())
    return DedupDecision(work, json.loads(path.read_text()))


def _shard_number(entry: tuple[str, int]) -> int:
    return int(entry[0].rsplit("-", 1)[1].split(".")[0])  # "shards/part-00042.jsonl" -> 42


def _publish(out: Path, work: Path, shards: list[ShardSpec], done: set[int]) -> list[tuple[str, int]]:
    """Rebuild the manifest from the completion markers (what a kill may have left unlisted); returns it."""
    listed = []
    for s in shards:
        if s.index in done:
            n = json.loads((work / "done" / f"{_name(s.index)}.json").read_text())["records"]
            if n:
                listed.append((shard_name(s.index), n))
    write_manifest(out, listed)
    return listed


def _merge_funnel(work: Path, shards: list[ShardSpec]) -> list[StageStats]:
    """pass-1 stages (sketches) + dedup_pages + pass-2 stages (markers), summed shard by shard."""
    total: dict[str, StageStats] = {}
    order: list[str] = []

    def add(d: dict) -> None:
        st = StageStats.from_json(d)
        if st.name not in total:
            total[st.name] = StageStats(st.name)
            order.append(st.name)
        total[st.name].merge(st)

    for s in shards:
        for d in _load_sketch(work, s.index)[0]["stats"]:
            add(d)
    add(json.loads((work / "dedup.json").read_text())["stats"])
    dedup = total["dedup_pages"]
    for s in shards:
        marker = json.loads((work / "done" / f"{_name(s.index)}.json").read_text())
        for d in marker["stats"]:
            add(d)
        for shard, pos in marker.get("promoted", []):  # a near-duplicate built in place of its kept page
            meta, positions, _ = _load_sketch(work, shard)
            page = meta["pages"][positions.tolist().index(pos)]
            dedup.page_drops["near_duplicate_page"] -= 1
            if not dedup.page_drops["near_duplicate_page"]:
                del dedup.page_drops["near_duplicate_page"]
            dedup.pages_out += 1
            dedup.images_out += page["images"]
            dedup.counts["promoted_copies"] += 1
            dedup._example("page:promoted_copy", {"doc": page["id"], "url": page["url"], "title": page["title"],
                                                   "detail": "built in place of its kept copy, which yielded no record"})
    return [total[n] for n in order]
