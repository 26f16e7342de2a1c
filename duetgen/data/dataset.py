"""Dataset IO: a directory of JSONL shards plus content-addressed images (DESIGN section 3).

    with DatasetWriter("data/toy", name="toy") as writer:   # append=True continues an existing one
        writer.write(record)                                  # image parts: PIL images, bytes or paths
    for record in Dataset("data/toy"):                        # streamed shard by shard, validated
        image = Dataset("data/toy").open_image(part.path, record.id)

Layout:
  root/manifest.json                     format version, shard list with record counts, total
  root/shards/part-NNNNN.jsonl           one validated record per line
  root/images/<2 hex>/<sha256>.<ext>     the image bytes; the same bytes are stored once

Design choices:
- The manifest is the source of truth. A shard exists for a reader only once the manifest lists
  it; both are written as tmp file + fsync + os.replace, shard first, so a writer killed at any
  moment leaves the previous consistent state (tmp files are ignored and cleaned on append).
- Images are written (tmp + os.replace) as records arrive and fsync'ed just before the shard
  that references them is committed: a committed shard never points at an image that a power
  loss could still take away.
- Readers stream shard by shard and validate every record; images are opened lazily, only
  after the path is proven to resolve inside the root and the header size is under a pixel cap
  (the header is read before any pixel is decoded).
- One error family: DatasetError (files, manifest) and ImageError (one record's image) are both
  RecordError, so ``except RecordError`` catches every kind of bad input.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from duetgen.data.images import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, IMAGE_FORMATS, ImageError,
                                 VerifiedImageBytes, encode_png, inspect_image, open_rgb_image)
from duetgen.data.record import ImagePart, Record, RecordError, check_image_path, is_pil_image, validate


FORMAT_NAME = "duetgen-interleaved"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
IMAGE_DIR = "images"
_SHARD_RE = re.compile(r"^shards/part-(\d{5,})\.jsonl$")  # shard_name pads to 5 digits; 100,000 on has 6


MAX_MANIFEST_BYTES = 256 << 20  # ~2.5M shards' entries
MAX_SHARD_RECORDS = 100_000_000  # writers commit thousands a shard; a count past this is a lie (1e20 overflowed)
MAX_RECORD_LINE_BYTES = 64 << 20  # one record's JSON line, UTF-8, without its newline


class DatasetError(RecordError):
    """A dataset directory, manifest or shard is invalid. The message names the file (and line)."""


def record_line(rec: Record) -> str:
    """``rec``'s JSONL line, refused when over the cap every reader applies (``MAX_RECORD_LINE_BYTES``)."""
    line = rec.to_jsonl_line()
    try:
        size = len(line.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in a JSON source) is not Unicode text
        raise RecordError(f"record {rec.id!r}: its text holds {line[e.start:e.end]!a}, which is not valid Unicode "
                          "(a lone surrogate)") from None
    if size > MAX_RECORD_LINE_BYTES:
        raise RecordError(f"record {rec.id!r}: {size:,} bytes of JSON, over the cap of {MAX_RECORD_LINE_BYTES:,} a "
                          "dataset reader accepts")
    return line


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/part-{index:05d}.jsonl"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths) -> None:
    """Make written files and their directory entries durable (images before the shard that names them)."""
    paths = list(paths)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in {p.parent for p in paths}:
        fsync_dir(d)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old content or the new, never a half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a file size limit: no half file left, and the error names the file
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    fsync_dir(path.parent)


def resolve_inside(root: Path, rel: str, record_id: str) -> Path:
    """Absolute path of dataset-relative ``rel``, proven (after resolving symlinks) to lie in ``root``."""
    check_image_path(rel, record_id)
    root_resolved = root.resolve()
    target = (root_resolved / rel).resolve()
    if not target.is_relative_to(root_resolved):
        raise ImageError(f"record {record_id!r}: image path {rel!r} resolves outside the dataset root {str(root)!r}")
    return target


def _lock_exclusively(path: Path, busy: str) -> int:
    """An fd holding flock(LOCK_EX) on ``path`` (created); DatasetError(``busy``) when another process holds
    it. Retries when the file was unlinked by its last holder between our open and our lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatasetError(busy) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


BUILDING, BUILDING_LOCK = ".building", ".building.lock"  # inside an empty output folder while it is filled


@contextmanager
def building_new_dataset(out_root: str | os.PathLike) -> Iterator[Path]:
    """All or nothing: yield a hidden folder to write a new dataset into; when the block ends without an
    error its files move into ``out_root``, the manifest last; on an error nothing is left.

    ``out_root`` must not exist (the dataset is built in a sibling ``.NAME.building`` and renamed) or be an
    empty folder, e.g. the shell's "." or a mount point (built in ``out_root/.building``, so every move
    stays on that filesystem). One build per output at a time (a lock file beside the build); a killed
    build's folder is removed by the next one."""
    out_root = Path(os.path.abspath(out_root))  # "." has no name to build a sibling from
    ours = {BUILDING, BUILDING_LOCK}

    def holds_other_files() -> bool:
        return any(e.name not in ours for e in out_root.iterdir())

    if out_root.exists() and (not out_root.is_dir() or holds_other_files()):
        raise DatasetError(f"{str(out_root)!r} exists and is not an empty folder; this writes a new dataset")
    into_folder = out_root.is_dir()
    if into_folder:
        building, lock = out_root / BUILDING, out_root / BUILDING_LOCK
    else:
        out_root.parent.mkdir(parents=True, exist_ok=True)
        building = out_root.with_name(f".{out_root.name}{BUILDING}")
        lock = out_root.with_name(f".{out_root.name}{BUILDING_LOCK}")
    fd = _lock_exclusively(lock, f"another process is writing a new dataset at {str(out_root)!r}")
    try:
        shutil.rmtree(building, ignore_errors=True)  # left by a build that was killed (we hold the lock)
        try:
            yield building
            (building / ".writer.lock").unlink(missing_ok=True)
            if out_root.exists() and (not out_root.is_dir() or holds_other_files()):
                raise DatasetError(f"{str(out_root)!r} was filled meanwhile; nothing was moved there")
            if into_folder:
                for entry in sorted(building.iterdir(), key=lambda e: e.name == MANIFEST):
                    os.replace(entry, out_root / entry.name)
            else:
                os.replace(building, out_root)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


# --------------------------------------------------------------------------------- manifest
def dataset_file(root: Path, rel: str) -> Path:
    """``root / rel`` (the manifest or a shard), refused if it resolves outside the root (a symlink out)."""
    path = root / rel
    root_resolved = root.resolve()
    if not path.resolve().is_relative_to(root_resolved):
        raise DatasetError(f"{path}: resolves outside the dataset root {str(root)!r} "
                           f"(to {str(path.resolve())!r}); a dataset's files must lie inside it")
    if path.exists() and not path.is_file():  # a FIFO (a tarball can carry one) would block every reader
        raise DatasetError(f"{path}: not a regular file")
    return path


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"{str(root)!r} is not a dataset directory (no such directory)")
    if not path.is_file():
        raise DatasetError(f"{str(root)!r} is not a dataset directory: no {MANIFEST}")
    dataset_file(root, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise DatasetError(f"{path}: over the cap of {MAX_MANIFEST_BYTES:,} bytes")
        m = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable manifest ({e})") from None
    except RecursionError:
        raise DatasetError(f"{path}: unreadable manifest (JSON nested too deeply)") from None
    except ValueError as e:  # an integer of over 4,300 digits
        raise DatasetError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict):
        raise DatasetError(f"{path}: manifest must be a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: 'format' is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: unsupported format_version {m.get('format_version')!r} "
                           f"(this reader knows {FORMAT_VERSION})")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise DatasetError(f"{path}: 'shards' must be a list")
    seen = set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("path"), str) or not _SHARD_RE.match(s["path"]):
            raise DatasetError(f"{path}: shards[{i}] must be "
                               f"{{'path': 'shards/part-NNNNN.jsonl', 'num_records': int}}, got {s!r}")
        n = s.get("num_records")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_SHARD_RECORDS:
            raise DatasetError(f"{path}: shards[{i}].num_records must be an integer in 0..{MAX_SHARD_RECORDS:,}, "
                               f"got {n!r}")
        if s["path"] in seen:
            raise DatasetError(f"{path}: shard {s['path']!r} listed twice")
        seen.add(s["path"])
    total = m.get("num_records")
    if total != sum(s["num_records"] for s in shards):
        raise DatasetError(f"{path}: num_records {total!r} does not equal the sum over shards")
    return m


def _manifest_bytes(m: dict[str, Any]) -> bytes:
    return (json.dumps(m, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def store_image(root: Path, image: Any, record_id: str = "?",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, Path | None]:
    """Store a PIL image (as PNG) or encoded bytes (verified) under ``root/images/``, content
    addressed (tmp + rename). Returns (``images/xx/<sha256>.<ext>``, the path when newly written,
    to be fsync'ed before a shard naming it is committed; None when the same bytes were there).

    Every stored file is an image of an allowed format under ``max_pixels`` whose every pixel decoded:
    bytes are decoded here, except ``VerifiedImageBytes``, which ``decode_image_bytes`` decoded in full
    already (the data engine's images: a second decode was ~0.7 CPU ms a 480x360 JPEG, issue 18); for
    those the header's size is checked against this cap and the bytes are stored as they are."""
    where = f"record {record_id!r}: image"
    if is_pil_image(image):
        w, h = image.size
        if w * h > max_pixels:
            raise ImageError(f"{where} is {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,}")
        data, ext = encode_png(image), "png"
    elif isinstance(image, VerifiedImageBytes):
        w, h = image.size
        if w * h > max_pixels:
            raise ImageError(f"{where} is {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,}")
        data, ext = image, IMAGE_FORMATS[image.format]
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        im = inspect_image(io.BytesIO(data), f"{where} bytes", max_pixels)
        ext = IMAGE_FORMATS[im.format]
    else:
        raise ImageError(f"{where} must be a PIL image or encoded bytes, got {type(image).__name__}")
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{IMAGE_DIR}/{digest[:2]}/{digest}.{ext}"
    path = root / rel
    if path.exists():  # the same bytes are stored once
        return rel, None
    path.parent.mkdir(exist_ok=True)
    # a per-process tmp name: parallel writers (ShardFileWriter) may store the same image at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return rel, path


# --------------------------------------------------------------------------------- writer
class DatasetWriter:
    """Write records into a dataset directory, one atomic shard at a time.

    >>> with DatasetWriter("out/ds", shard_size=1000) as w:
    ...     w.write(Record(id="r0", messages=[Message("user", [TextPart("hi"), ImagePart(pil_image)])]))

    ``write`` stores in-memory images (PIL -> PNG, bytes verified as PNG/JPEG/WEBP/GIF) under
    ``images/`` and replaces them in the record by their relative path (the record is modified).
    Leaving the ``with`` block commits the open shard, also when the block raised: every record
    written so far was validated, so it is kept. ``append=True`` continues an existing dataset
    (or starts one); otherwise the root must not hold a dataset yet.
    """

    def __init__(self, root: str | os.PathLike, shard_size: int = 1000, append: bool = False,
                 name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
        self.root = Path(root)
        self.shard_size = shard_size
        self.max_pixels = max_pixels
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"{str(self.root)!r} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARD_DIR).mkdir(exist_ok=True)
        (self.root / IMAGE_DIR).mkdir(exist_ok=True)
        # One writer at a time: a second one would reuse shard numbers. flock dies with the process.
        self._lock_file = open(self.root / ".writer.lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DatasetError(f"{str(self.root)!r}: another DatasetWriter is writing to this dataset") from None

        try:
            if (self.root / MANIFEST).exists():
                if not append:
                    raise DatasetError(f"{str(self.root)!r} already holds a dataset; write to a new folder (from Python, "
                                       "DatasetWriter(append=True) adds to it)")
                self.manifest = _read_manifest(self.root)
                self._name_changed = name is not None and name != self.manifest.get("name")
                if self._name_changed:
                    self.manifest["name"] = name
                self._clean_uncommitted()
            else:
                if any((self.root / SHARD_DIR).glob("part-*.jsonl")):
                    raise DatasetError(f"{str(self.root)!r} has shards but no {MANIFEST}; "
                                       "refusing to guess what is committed")
                self._name_changed = False
                now = _now()
                self.manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name,
                                 "created": now, "updated": now, "num_records": 0, "shards": []}
                atomic_write_bytes(self.root / MANIFEST, _manifest_bytes(self.manifest))
        except BaseException:
            self._lock_file.close()
            raise
        used = [int(_SHARD_RE.match(s["path"]).group(1)) for s in self.manifest["shards"]]
        self._next_shard = max(used, default=-1) + 1
        self._ids: set[str] = set()  # ids written in this session (duplicates refused)
        self._committed_ids: set[str] = set()  # of those, the ones in committed shards
        self._shard_file = None  # open tmp file of the current shard
        self._shard_count = 0
        self._pending_images: list[Path] = []  # stored since the last commit, fsync'ed at commit
        self._closed = False

    def _clean_uncommitted(self) -> None:
        """Remove what a killed writer left: tmp files and shards the manifest does not list."""
        listed = {s["path"] for s in self.manifest["shards"]}
        for sub in (SHARD_DIR, IMAGE_DIR):  # never delete through a link out of the root (another dataset's)
            if not (self.root / sub).resolve().is_relative_to(self.root.resolve()):
                raise DatasetError(f"{self.root / sub}: resolves outside the dataset root")
        for p in (self.root / SHARD_DIR).iterdir():
            rel = f"{SHARD_DIR}/{p.name}"
            if p.name.startswith(".part-") and p.name.endswith(".tmp"):
                p.unlink()
            elif _SHARD_RE.match(rel) and rel not in listed:
                p.unlink()  # renamed into place but the manifest commit never happened
        for p in (self.root / IMAGE_DIR).glob("*/.*.tmp"):
            p.unlink()

    # ----------------------------------------------------------------------------- images
    def add_image(self, image: Any, record_id: str = "?") -> str:
        """Store a PIL image (as PNG) or encoded bytes (verified); return ``images/xx/<sha256>.<ext>``."""
        rel, new = store_image(self.root, image, record_id, self.max_pixels)
        if new is not None:
            self._pending_images.append(new)
        return rel

    def _check_stored_path(self, rel: str, record_id: str) -> None:
        path = resolve_inside(self.root, rel, record_id)
        where = f"record {record_id!r}: image {rel!r}"
        if not path.is_file():
            raise ImageError(f"{where} not found in the dataset root {str(self.root)!r}")
        with open(path, "rb") as f:
            inspect_image(f, where, self.max_pixels, decode=False)

    # ----------------------------------------------------------------------------- records
    def write(self, rec: Record) -> None:
        """Validate ``rec``, store its in-memory images, append it to the current shard."""
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        if not isinstance(rec, Record):
            raise RecordError(f"DatasetWriter.write expects a Record, got {type(rec).__name__}")
        validate(rec)
        if rec.id in self._ids:
            raise RecordError(f"record {rec.id!r}: duplicate id (already written by this writer)")
        for m in rec.messages:
            for p in m.content:
                if isinstance(p, ImagePart):
                    if isinstance(p.image, str):
                        self._check_stored_path(p.image, rec.id)
                    else:
                        p.image = self.add_image(p.image, rec.id)
        line = record_line(rec)  # validates again, now with every image a stored path
        if self._shard_file is None:
            self._open_shard()
        try:
            self._shard_file.write(line + "\n")
        except OSError as e:  # a full disk, a file size limit: the open shard may end in half a line
            raise self._abort_shard(e) from e
        self._ids.add(rec.id)
        self._shard_count += 1
        if self._shard_count >= self.shard_size:
            self._commit_shard()

    def _tmp_path(self, index: int) -> Path:
        return self.root / SHARD_DIR / f".part-{index:05d}.jsonl.tmp"

    def _open_shard(self) -> None:
        self._shard_file = open(self._tmp_path(self._next_shard), "w", encoding="utf-8")
        self._shard_count = 0

    def _abort_shard(self, e: OSError) -> OSError:
        """Drop the open shard after a failed write or commit (never committed: the records committed before
        stay readable, the open shard's are not in the dataset; a shard file renamed but not listed is removed
        by the next append); the error names the file."""
        path = self._tmp_path(self._next_shard)
        if self._shard_file is not None:
            try:
                self._shard_file.close()
            except OSError:
                pass  # (flushing the rest fails the same way)
        path.unlink(missing_ok=True)
        self._shard_file, self._shard_count = None, 0
        self._ids = set(self._committed_ids)
        return OSError(e.errno, f"{e.strerror}; the open shard's records were not committed", e.filename or str(path))

    def _commit_shard(self) -> None:
        """tmp shard -> fsync -> rename, then the manifest listing it (also tmp + rename)."""
        f, index, count = self._shard_file, self._next_shard, self._shard_count
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._shard_file = None  # closed: a failure below must not flush it again
            fsync_files(self._pending_images)  # images first: a committed shard must not outlive its images
            self._pending_images.clear()
            rel = shard_name(index)
            os.replace(self._tmp_path(index), self.root / rel)
            fsync_dir(self.root / SHARD_DIR)
            manifest = {**self.manifest, "shards": [*self.manifest["shards"], {"path": rel, "num_records": count}],
                        "num_records": self.manifest["num_records"] + count, "updated": _now()}
            atomic_write_bytes(self.root / MANIFEST, _manifest_bytes(manifest))
        except OSError as e:
            raise self._abort_shard(e) from e
        self.manifest = manifest
        self._name_changed = False
        self._shard_count, self._next_shard = 0, index + 1
        self._committed_ids = set(self._ids)

    @property
    def uncommitted(self) -> int:
        """Records written into the open shard, not committed yet (0 right after a commit)."""
        return self._shard_count if self._shard_file is not None else 0

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._shard_file is not None:  # opened by the first write of a shard, so never empty
                self._commit_shard()
            if self._name_changed:  # a rename on append with no new shard still reaches the manifest
                self.manifest["updated"] = _now()
                atomic_write_bytes(self.root / MANIFEST, _manifest_bytes(self.manifest))
        finally:
            self._closed = True
            self._lock_file.close()

    @property
    def num_records(self) -> int:
        """Records committed so far (all sessions)."""
        return self.manifest["num_records"]

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------- parallel writers
class ShardFileWriter:
    """One shard written by one of many parallel writers (the data engine's workers), no manifest.

    Same validation and the same atomic protocol as ``DatasetWriter`` (images stored content
    addressed and fsync'ed, the shard as tmp + fsync + rename to ``shards/part-NNNNN.jsonl``), but
    no lock and no manifest: a single committer lists finished shards with ``write_manifest``. A
    shard file the manifest does not list does not exist for readers, so a writer killed after the
    rename (before its committer listed it) leaves nothing visible, and a rerun replaces the file.
    """

    def __init__(self, root: str | os.PathLike, index: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root, self.index = Path(root), index
        self.max_pixels = max_pixels
        self._new_images: list[Path] = []
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / IMAGE_DIR).mkdir(exist_ok=True)
        self.rel = shard_name(index)
        # one name per writer: two writers of one shard (a task left running by a killed driver, and the rerun's)
        # never write into one file; the last rename wins, with a whole file
        self._tmp = self.root / SHARD_DIR / f".part-{index:05d}.{os.getpid()}-{os.urandom(4).hex()}.jsonl.tmp"
        self._file = open(self._tmp, "w", encoding="utf-8")
        self._ids: set[str] = set()

    def write(self, rec: Record) -> None:
        validate(rec)
        if rec.id in self._ids:
            raise RecordError(f"record {rec.id!r}: duplicate id in shard {self.rel}")
        for m in rec.messages:
            for p in m.content:
                if isinstance(p, ImagePart) and not isinstance(p.image, str):
                    p.image, new = store_image(self.root, p.image, rec.id, self.max_pixels)
                    if new is not None:
                        self._new_images.append(new)
        try:
            self._file.write(record_line(rec) + "\n")
        except OSError as e:  # a full disk: no half shard left, and the error names the shard
            raise self._given_up(e) from e
        self._ids.add(rec.id)

    def _given_up(self, e: OSError) -> OSError:
        """Abort after a failed write; the error to raise, naming the shard."""
        self.abort()
        return OSError(e.errno, e.strerror, str(self.root / self.rel))

    def abort(self) -> None:
        """Give the shard up (its writing failed): no temporary file is left behind."""
        try:
            self._file.close()  # flushes what is buffered: fails again on a full disk
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)

    def commit(self) -> int:
        """Make the shard durable and put it in place; returns its record count (0: no file at all)."""
        f = self._file
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:  # a full disk shows here at the latest
            raise self._given_up(e) from e
        f.close()
        if not self._ids:
            self._tmp.unlink()
            return 0
        fsync_files(self._new_images)  # images first: a shard must not outlive its images
        os.replace(self._tmp, self.root / self.rel)
        fsync_dir(self.root / SHARD_DIR)
        return len(self._ids)


def write_manifest(root: str | os.PathLike, shards: list[tuple[str, int]], name: str | None = None) -> None:
    """(Re)write the manifest to list exactly ``shards`` ((path, num_records), in order), atomically."""
    root = Path(root)
    old = _read_manifest(root) if (root / MANIFEST).exists() else None
    now = _now()
    m = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": old["name"] if old else name,
         "created": old["created"] if old else now, "updated": now,
         "num_records": sum(n for _, n in shards), "shards": [{"path": p, "num_records": n} for p, n in shards]}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / MANIFEST, _manifest_bytes(m))


# --------------------------------------------------------------------------------- reader
def json_problem(e: BaseException) -> str:
    """What ``json.loads`` refused beyond its grammar, in words: nesting past Python's stack (RecursionError), an
    integer of over 4,300 digits (its ValueError's own message)."""
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def read_capped_line(f, cap: int = MAX_RECORD_LINE_BYTES) -> bytes | None:
    """The next line of binary ``f`` (b"" at its end), at most ``cap`` bytes of it held: None for a longer line,
    which is skipped to its end unread (a 10 GB line never reaches memory)."""
    raw = f.readline(cap + 2)
    if len(raw.rstrip(b"\n")) <= cap:
        return raw
    while raw and not raw.endswith(b"\n"):
        raw = f.readline(1 << 20)
    return None


def capped_lines(f, cap: int = MAX_RECORD_LINE_BYTES) -> Iterator[bytes | None]:
    """``read_capped_line`` to the end of ``f``: each line, or None for one over ``cap``."""
    while (raw := read_capped_line(f, cap)) != b"":
        yield raw


def read_record_line(f, where: str) -> Record | None:
    """The next record of a binary JSONL file (None at its end): at most ``MAX_RECORD_LINE_BYTES`` read (an
    over-long line is skipped to its end, then refused), decoded line by line (a bad byte names its own line),
    parsed and validated; every problem is a RecordError naming ``where``."""
    raw = read_capped_line(f)
    if raw is None:  # images are files: a record is text
        raise DatasetError(f"{where}: a record over the cap of {MAX_RECORD_LINE_BYTES:,} bytes")
    if not raw:
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: not valid UTF-8 ({e.reason})") from None
    return _parse_record_line(line, where)


def _parse_record_line(line: str, where: str) -> Record:
    if not line.strip():
        raise DatasetError(f"{where}: empty line")
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DatasetError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # an integer of over 4,300 digits
        raise DatasetError(f"{where}: unreadable JSON ({e})") from None
    try:
        return Record.from_json(d)
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None


class Dataset:
    """A read-only dataset directory. Iterating streams validated records, shard by shard.

    >>> ds = Dataset("out/ds")
    >>> for rec in ds:
    ...     for part in rec.image_parts("assistant"):
    ...         im = ds.open_image(part.path, record_id=rec.id)   # RGB, fully loaded
    """

    def __init__(self, root: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.root = Path(root)
        self.max_pixels = max_pixels
        self.max_image_bytes = max_image_bytes
        self.manifest = _read_manifest(self.root)

    @property
    def name(self) -> str | None:
        return self.manifest.get("name")

    @property
    def shards(self) -> list[str]:
        """Relative paths of the committed shards, in order."""
        return [s["path"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return self.manifest["num_records"]

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self.manifest["shards"])):
            yield from self.iter_shard(i)

    def iter_shard(self, index: int, on_error: Callable[[str], None] | None = None) -> Iterator[Record]:
        """Records of one shard (shards are the unit of parallel work, as in datatrove).

        A line that is not a valid record raises, or, given ``on_error`` (a viewer's), is passed to it as
        the error naming the line and skipped."""
        entry = self.manifest["shards"][index]
        path = dataset_file(self.root, entry["path"])
        n = 0
        try:
            f = open(path, "rb")  # lines decoded one by one: a bad byte names its own line
        except OSError as e:
            raise DatasetError(f"{path}: shard listed in the manifest cannot be opened ({e.strerror})") from None
        with f:
            while True:
                try:
                    rec = read_record_line(f, f"{path}:{n + 1}")
                except RecordError as e:
                    if on_error is None:
                        raise
                    on_error(str(e))
                    n += 1
                    continue
                if rec is None:
                    break
                n += 1
                yield rec
        if n != entry["num_records"]:
            raise DatasetError(f"{path}: holds {n} records but the manifest says {entry['num_records']}")

    def image_path(self, path: str, record_id: str = "?") -> Path:
        """Absolute path of a record's image, refused if it leaves the root (also via symlinks) or is missing."""
        p = resolve_inside(self.root, path, record_id)
        if not p.is_file():
            raise ImageError(f"record {record_id!r}: image {path!r} not found in the dataset root {str(self.root)!r}")
        return p

    def read_image_bytes(self, path: str, record_id: str = "?", decode: bool = False) -> bytes:
        """The stored bytes, after the same containment and size checks as ``open_image``.

        The header is always checked; ``decode=True`` decodes every pixel too, so a truncated or
        corrupt file fails here (naming the record and path) instead of in whoever reads the bytes next.
        """
        p = self.image_path(path, record_id)
        where = f"record {record_id!r}: image {path!r}"
        size = p.stat().st_size
        if size > self.max_image_bytes:  # checked before reading: the whole file goes to memory
            raise ImageError(f"{where}: file is {size:,} bytes, over the cap of {self.max_image_bytes:,}")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ImageError(f"{where}: cannot be read ({e.strerror})") from None
        inspect_image(io.BytesIO(data), where, self.max_pixels, decode=decode)
        return data

    def open_image(self, path: str, record_id: str = "?"):
        """Open a record's image as a fully loaded RGB PIL image (pixel cap checked on the header first)."""
        return open_rgb_image(self.image_path(path, record_id), f"record {record_id!r}: image {path!r}",
                              self.max_pixels)

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, records={len(self)}, shards={len(self.shards)})"
