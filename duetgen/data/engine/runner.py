"""Runner: input shards -> stages -> one dataset, resumable, with a local or a Ray executor.

Input (chosen to carry each page's own URL, which relative image links need):
- a JSONL file, one page per line: ``{"url": "https://...", "html": "<html>...", "id"?: str, "source"?: str}``;
- or a directory of ``*.html`` / ``*.htm`` files (read as bytes, decoded by their ``<meta charset>``),
  as a browser saves them: a relative image path is a file beside the page (``img/step1.jpg``),
  read from the page's own folder and never from outside the input directory (``..``, absolute
  paths and symlinks leaving it are dropped as ``outside_input``). A page with a ``<base href>``
  names where its images live: they are fetched over http(s) like a JSONL page's. Absolute
  ``http(s)`` image URLs are always fetched.

Design choices (the datatrove recipe):
- The input is cut into shards of ``shard_pages`` pages (JSONL: byte offsets found in one scan),
  planned once and saved in ``OUT/_engine/plan.json`` with the input's size/mtime fingerprint and
  the config; a restart with a different input or config is refused instead of mixing outputs.
- A worker runs every stage over one shard and returns its records and funnel counters. Only the
  driver writes the dataset: one ``DatasetWriter`` session per shard, so each input shard becomes
  exactly one committed dataset shard (atomic: tmp + fsync + rename, then the manifest).
- Exactly once across kills: (1) counters -> ``_engine/pending/shard-N.json``, (2) commit the
  dataset shard (each record carries ``meta.engine.shard = N``), (3) rename to ``_engine/done/``.
  On restart a shard is skipped if done; if its records are already in the manifest (killed
  between 2 and 3) its pending file is promoted; otherwise it runs again from scratch. A shard that
  was half written is never visible (the manifest did not list it), so nothing is lost or doubled.
- Shards are committed in input order (a bounded window of shards runs ahead), so a local run and
  a Ray run of the same input write the same records in the same order.
- Record ids: the input's ``id``, else ``web-`` + sha256(url)[:16]; a repeated id (the same URL
  twice in the input) is dropped by the driver as ``duplicate_id``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from duetgen.data.engine.document import Doc, StageStats
from duetgen.data.engine.extract import ExtractConfig
from duetgen.data.engine.fetch import FetchConfig
from duetgen.data.engine.funnel import merge_stats, write_report
from duetgen.data.engine.images import ImageRuleConfig
from duetgen.data.engine.stages import PageFilterConfig, build_stages, run_stages
from duetgen.data.record import MANIFEST, Dataset, DatasetWriter, atomic_write_bytes

ENGINE_DIR = "_engine"
_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


class EngineError(ValueError):
    """Bad input or an output directory that cannot be (re)used. The message names it."""


@dataclass
class EngineConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    pages: PageFilterConfig = field(default_factory=PageFilterConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    images: ImageRuleConfig = field(default_factory=ImageRuleConfig)
    dedup_max_distance: int = 8  # pHash bits; measured: re-encoded / slightly cropped photos land at 0-6
    fetch_threads: int = 8  # concurrent image downloads per worker (I/O bound)
    # Pages per shard: the unit of work, of restart and of one dataset shard. A finished shard's
    # records (image bytes included) travel to the driver in memory: ~50 pages x 10 images x 200 KB
    # = 100 MB, times (workers + 2) shards in flight.
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

    def fingerprint(self) -> dict:
        """What must not change between a killed run and its restart (no secrets, no paths)."""
        d = asdict(self)
        d.pop("llm_api_key")
        d.pop("llm_cache")
        return d


# ----------------------------------------------------------------------------- input
@dataclass
class ShardSpec:
    index: int
    kind: str  # "jsonl" | "html_dir"
    path: str  # the JSONL file or the directory
    start: int = 0  # jsonl: byte offset of the first line; html_dir: unused
    first_line: int = 0  # jsonl: 1-based number of the first line
    num_pages: int = 0
    files: list[str] = field(default_factory=list)  # html_dir: paths relative to the directory


def _input_fingerprint(path: Path) -> dict:
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
            raise EngineError(f"input directory {str(path)!r} holds no .html/.htm files")
        return [ShardSpec(i // shard_pages, "html_dir", str(path), num_pages=len(files[i:i + shard_pages]),
                          files=files[i:i + shard_pages]) for i in range(0, len(files), shard_pages)]
    if not path.is_file():
        raise EngineError(f"input {str(path)!r} does not exist (expected a .jsonl file or a directory of .html files)")
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
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                d.meta["input_drop"] = ("bad_input", f"{where}: {e}")
                yield d
                continue
            d.id = _doc_id(obj.get("id"), url, where)
            d.url, d.html = url, obj["html"]
            if isinstance(obj.get("source"), str) and _ID_RE.match(obj["source"]):
                d.source = obj["source"]
            yield d


# ----------------------------------------------------------------------------- one shard (in a worker)
def process_shard(task: tuple[ShardSpec, EngineConfig]) -> dict:
    """Run every stage over one shard. Returns {index, records, stats, wall_s}; picklable."""
    spec, cfg = task
    t0 = time.perf_counter()
    client = None
    if cfg.llm_url:
        from duetgen.llm import LLMClient

        client = LLMClient(cfg.llm_url, cfg.llm_model or "default", api_key=cfg.llm_api_key,
                           max_concurrency=cfg.llm_concurrency, max_retries=cfg.llm_max_retries,
                           timeout_s=cfg.llm_timeout_s, cache_path=cfg.llm_cache)
    try:
        docs, stats = run_stages(build_stages(cfg, client), read_shard(spec, cfg))
        records = [d.record for d in docs]
    finally:
        if client is not None:
            client.close()
    return {"index": spec.index, "records": records, "stats": [s.to_json() for s in stats],
            "wall_s": time.perf_counter() - t0}


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
def _committed(out: Path) -> tuple[set[int], set[str]]:
    """(engine shard indices already in the dataset, record ids already in it)."""
    if not (out / MANIFEST).exists():
        return set(), set()
    shards, ids = set(), set()
    for rec in Dataset(out):
        ids.add(rec.id)
        shards.add(rec.meta["engine"]["shard"])
    return shards, ids


def _check_plan(work: Path, input_path: Path, cfg: EngineConfig) -> list[ShardSpec]:
    plan_path = work / "plan.json"
    fp = {"input": _input_fingerprint(input_path), "config": cfg.fingerprint()}
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if plan["fingerprint"] != json.loads(json.dumps(fp)):
            raise EngineError(
                f"output {str(work.parent)!r} belongs to a run with a different input or config; "
                "use a new --out (or delete it) to start over"
            )
        return [ShardSpec(**s) for s in plan["shards"]]
    shards = plan_shards(input_path, cfg.shard_pages)
    atomic_write_bytes(plan_path, json.dumps({"fingerprint": fp, "shards": [asdict(s) for s in shards]}).encode())
    return shards


def run_engine(input_path: str | Path, out: str | Path, cfg: EngineConfig, executor=None,
               progress: bool = True) -> dict:
    """Run (or resume) the engine. Returns the funnel JSON (also written to OUT/funnel.{json,html})."""
    input_path, out = Path(input_path), Path(out)
    t0 = time.perf_counter()
    if (out / MANIFEST).exists() and not (out / ENGINE_DIR / "plan.json").exists():
        raise EngineError(f"output {str(out)!r} already holds a dataset not written by this engine")
    work = out / ENGINE_DIR
    for sub in ("pending", "done"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    lock = open(work / "run.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise EngineError(f"another engine run is using {str(out)!r}") from None
    try:
        shards = _check_plan(work, input_path, cfg)
        if cfg.llm_url and cfg.llm_cache is None:
            cfg.llm_cache = str(work / "llm_cache.sqlite")
        committed_shards, ids = _committed(out)
        todo = []
        for s in shards:
            done, pending = work / "done" / f"shard-{s.index:05d}.json", work / "pending" / f"shard-{s.index:05d}.json"
            if done.exists():
                continue
            if s.index in committed_shards:  # killed after the commit, before the marker
                os.replace(pending, done)
                continue
            todo.append(s)
        executor = executor or LocalExecutor(1)
        _run_todo(executor, todo, cfg, out, work, ids, len(shards), progress)
        per_shard = [json.loads((work / "done" / f"shard-{s.index:05d}.json").read_text()) for s in shards]
        stages = merge_stats([p["stats"] for p in per_shard])
        summary = {"input": str(input_path), "output": str(out), "shards": len(shards),
                   "pages_in": sum(s.num_pages for s in shards),
                   "records_out": len(Dataset(out)) if (out / MANIFEST).exists() else 0,
                   "llm_model": cfg.llm_model if cfg.llm_url else None,
                   "wall_s_this_run": round(time.perf_counter() - t0, 2), "shards_run_now": len(todo)}
        return write_report(out, stages, summary)
    finally:
        lock.close()


def _run_todo(executor, todo, cfg, out, work, ids, total, progress):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("data engine"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                   TimeRemainingColumn(), disable=not progress, transient=True)
    with bar:
        task = bar.add_task("shards", total=total, completed=total - len(todo))
        for result in executor.map_ordered(process_shard, [(s, cfg) for s in todo]):
            _commit_shard(result, out, work, ids)
            bar.advance(task)


def _commit_shard(result: dict, out: Path, work: Path, ids: set[str]) -> None:
    index = result["index"]
    write_stats = StageStats("write")
    keep = []
    for rec in result["records"]:
        write_stats.pages_in += 1
        write_stats.images_in += len(rec.image_parts())
        if rec.id in ids:
            write_stats.page_drops["duplicate_id"] += 1
            write_stats._example("page:duplicate_id", {"doc": rec.id, "url": rec.meta.get("url"), "detail": "id already written"})
            continue
        ids.add(rec.id)
        keep.append(rec)
        write_stats.pages_out += 1
        write_stats.images_out += len(rec.image_parts())
    marker = {"index": index, "records": len(keep), "wall_s": result["wall_s"],
              "stats": result["stats"] + [write_stats.to_json()]}
    name = f"shard-{index:05d}.json"
    atomic_write_bytes(work / "pending" / name, json.dumps(marker).encode())  # (1)
    if keep:
        with DatasetWriter(out, shard_size=len(keep) + 1, append=True) as w:  # (2) one dataset shard
            for rec in keep:
                w.write(rec)
    os.replace(work / "pending" / name, work / "done" / name)  # (3)
