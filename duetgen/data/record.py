"""The one record type: an interleaved conversation (DESIGN section 3).

A record is a chat in the shape HF processors and OpenAI clients use::

    {"id": "howto-000123", "source": "wikihow",
     "messages": [{"role": "user", "content": [{"type": "text", "text": "..."},
                                               {"type": "image", "image": "images/3f/3fa9....png"}]},
                  {"role": "assistant", "content": [...]}],
     "meta": {...}}

Design choices:
- Every image part in an assistant turn is a generation target (preceded by ``<BOV>`` in the
  token stream); images in user and system turns are inputs only.
- On disk an image part holds a path relative to the dataset root. In memory, before a writer
  stores it, it may hold a ``PIL.Image.Image`` or encoded ``bytes``; the writer replaces it with
  the content-addressed path.
- Validation is strict and names the record id, the field and the reason (STYLE principle 12).
  Paths that are absolute, contain a URL scheme or ``..`` are refused here, before any file is opened.

On disk (second half of this file): ``DatasetWriter`` writes a dataset directory of atomic JSONL
shards plus content-addressed images, ``Dataset`` streams it back, validated. The format and its
guarantees are described in docs/record-format.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Union

ROLES = ("system", "user", "assistant")
Role = Literal["system", "user", "assistant"]

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # "http:", "file:", "data:", "c:" ...


class RecordError(ValueError):
    """A record (or a part of it) is invalid. The message names the record id and the field."""


@dataclass
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass
class ImagePart:
    """An image. ``image`` is a dataset-relative path on disk, or a PIL image / bytes in memory."""

    image: Any
    type: Literal["image"] = "image"

    @property
    def path(self) -> str:
        if not isinstance(self.image, str):
            raise TypeError("this image part holds an in-memory image, not a stored path")
        return self.image


Part = Union[TextPart, ImagePart]


@dataclass
class Message:
    role: Role
    content: list[Part]

    @property
    def text(self) -> str:
        """All text parts joined (images dropped)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)]


@dataclass
class Record:
    id: str
    messages: list[Message]
    source: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- access
    def turns(self, role: Role) -> list[Message]:
        return [m for m in self.messages if m.role == role]

    def image_parts(self, role: Role | None = None) -> list[ImagePart]:
        """Image parts in conversation order, optionally only those of one role."""
        return [p for m in self.messages if role is None or m.role == role for p in m.images]

    def iter_parts(self) -> Iterator[tuple[Message, Part]]:
        for m in self.messages:
            for p in m.content:
                yield m, p

    # ----------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The on-disk dict. Every image part must hold a stored path by now."""
        validate(self)
        out: dict[str, Any] = {"id": self.id, "source": self.source, "messages": []}
        for m in self.messages:
            content = []
            for p in m.content:
                if isinstance(p, TextPart):
                    content.append({"type": "text", "text": p.text})
                else:
                    if not isinstance(p.image, str):
                        raise RecordError(
                            f"record {self.id!r}: image part holds an in-memory image; "
                            "store it with a DatasetWriter before serialising"
                        )
                    content.append({"type": "image", "image": p.image})
            out["messages"].append({"role": m.role, "content": content})
        out["meta"] = self.meta
        return out

    def to_jsonl_line(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, d: Any) -> "Record":
        """Parse and validate an on-disk dict. Raises RecordError naming the record and field."""
        if not isinstance(d, dict):
            raise RecordError(f"a record must be a JSON object, got {type(d).__name__}")
        rid = d.get("id")
        if not isinstance(rid, str) or not rid:
            raise RecordError(f"record has no string 'id' (got {rid!r})")
        unknown = set(d) - {"id", "source", "messages", "meta"}
        if unknown:
            raise RecordError(f"record {rid!r}: unknown top-level field(s) {sorted(unknown)}")
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RecordError(f"record {rid!r}: 'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(msgs):
            where = f"record {rid!r}: messages[{i}]"
            if not isinstance(m, dict):
                raise RecordError(f"{where} must be an object")
            role = m.get("role")
            if role not in ROLES:
                raise RecordError(f"{where}.role: unknown role {role!r} (expected one of {ROLES})")
            content = m.get("content")
            if isinstance(content, str):  # OpenAI shorthand: plain string content
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise RecordError(f"{where}.content must be a list of parts")
            parts: list[Part] = []
            for j, p in enumerate(content):
                pw = f"{where}.content[{j}]"
                if not isinstance(p, dict):
                    raise RecordError(f"{pw} must be an object")
                ptype = p.get("type")
                if ptype == "text":
                    if not isinstance(p.get("text"), str):
                        raise RecordError(f"{pw}.text must be a string")
                    parts.append(TextPart(p["text"]))
                elif ptype == "image":
                    parts.append(ImagePart(p.get("image")))
                else:
                    raise RecordError(f"{pw}.type: unknown part type {ptype!r} (expected 'text' or 'image')")
            messages.append(Message(role, parts))
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise RecordError(f"record {rid!r}: 'meta' must be an object")
        source = d.get("source", "unknown")
        if not isinstance(source, str):
            raise RecordError(f"record {rid!r}: 'source' must be a string")
        rec = cls(id=rid, messages=messages, source=source, meta=meta)
        validate(rec)
        return rec

    @classmethod
    def from_jsonl_line(cls, line: str) -> "Record":
        return cls.from_json(json.loads(line))


def check_image_path(path: Any, record_id: str = "?") -> str:
    """A stored image path must be relative, inside the dataset root, and not a URL."""
    if not isinstance(path, str) or not path:
        raise RecordError(f"record {record_id!r}: image path must be a non-empty string, got {path!r}")
    if _URL_RE.match(path) or path.startswith("//"):
        raise RecordError(f"record {record_id!r}: image path {path!r} is a URL or has a scheme; only dataset-relative paths are allowed")
    if path.startswith("/") or path.startswith("\\"):
        raise RecordError(f"record {record_id!r}: image path {path!r} is absolute; only dataset-relative paths are allowed")
    if any(seg == ".." for seg in re.split(r"[/\\]", path)):
        raise RecordError(f"record {record_id!r}: image path {path!r} leaves the dataset root")
    if "\x00" in path:
        raise RecordError(f"record {record_id!r}: image path contains a NUL byte")
    return path


def validate(rec: Record) -> None:
    """Structural checks shared by read and write. Raises RecordError naming the record."""
    if not isinstance(rec.id, str) or not rec.id:
        raise RecordError(f"record has no id (got {rec.id!r})")
    if not rec.messages:
        raise RecordError(f"record {rec.id!r}: no messages")
    for i, m in enumerate(rec.messages):
        if m.role not in ROLES:
            raise RecordError(f"record {rec.id!r}: messages[{i}].role: unknown role {m.role!r}")
        for j, p in enumerate(m.content):
            if isinstance(p, TextPart):
                if not isinstance(p.text, str):
                    raise RecordError(f"record {rec.id!r}: messages[{i}].content[{j}].text must be a string")
            elif isinstance(p, ImagePart):
                if isinstance(p.image, str):
                    check_image_path(p.image, rec.id)
                elif not (isinstance(p.image, (bytes, bytearray)) or _is_pil(p.image)):
                    raise RecordError(
                        f"record {rec.id!r}: messages[{i}].content[{j}].image must be a path, bytes or a PIL image"
                    )
            else:
                raise RecordError(f"record {rec.id!r}: messages[{i}].content[{j}]: unknown part {type(p).__name__}")


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def text(s: str) -> TextPart:
    return TextPart(s)


def image(x: Any) -> ImagePart:
    return ImagePart(x)


# =============================================================================================
# Dataset IO: a directory of JSONL shards plus content-addressed images (DESIGN section 3).
#
#   root/manifest.json                     format version, shard list with record counts, total
#   root/shards/part-NNNNN.jsonl           one validated record per line
#   root/images/<2 hex>/<sha256>.<ext>     the image bytes; the same bytes are stored once
#
# Design choices:
# - The manifest is the source of truth. A shard exists for a reader only once the manifest lists
#   it; both are written as tmp file + fsync + os.replace, shard first, so a writer killed at any
#   moment leaves the previous consistent state (tmp files are ignored and cleaned on append).
# - Images are written (tmp + os.replace) as records arrive and fsync'ed just before the shard
#   that references them is committed: a committed shard never points at an image that a power
#   loss could still take away.
# - Readers stream shard by shard and validate every record; images are opened lazily, only
#   after the path is proven to resolve inside the root and the header size is under a pixel cap
#   (the header is read before any pixel is decoded).
# - One error family: DatasetError (files, manifest) and ImageError (one record's image) are both
#   RecordError, so ``except RecordError`` catches every kind of bad input.
# =============================================================================================

FORMAT_NAME = "duetgen-interleaved"
FORMAT_VERSION = 1
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above any training resolution, far below a decompression bomb
DEFAULT_MAX_IMAGE_BYTES = 256 << 20  # a 40 MP RGB image is 120 MB raw; an encoded file above this is not an image
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
IMAGE_DIR = "images"
_SHARD_RE = re.compile(r"^shards/part-(\d{5})\.jsonl$")
# PIL format name -> file extension. MPO is the multi-picture JPEG phones write; its first frame is a JPEG.
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "GIF": "gif"}


class DatasetError(RecordError):
    """A dataset directory, manifest or shard is invalid. The message names the file (and line)."""


class ImageError(RecordError):
    """An image of a record is missing, unreadable, too large or outside the root."""


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def pil_guard(where: str):
    """Turn PIL's decompression-bomb and decode failures into ImageError naming ``where``."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Our own cap is checked on the header; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where}: refused as a decompression bomb ({e})") from None
    except ImageError:
        raise
    except Image.UnidentifiedImageError:  # its message is the repr of our in-memory buffer: say what it means
        raise ImageError(f"{where}: not a readable image (no PNG, JPEG, WEBP or GIF header)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL raises all of these on bad data
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None


def inspect_image(fp: Any, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True):
    """Open an image from a file object, check format and size BEFORE decoding, then decode.

    Returns the opened (and, if ``decode``, fully loaded) PIL image. ``where`` names the record
    and path in every error.
    """
    from PIL import Image

    with pil_guard(where):
        im = Image.open(fp)
        if im.format not in IMAGE_FORMATS:
            raise ImageError(f"{where}: unsupported image format {im.format!r} (allowed: PNG, JPEG, WEBP, GIF)")
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{where}: empty image ({w}x{h})")
        if w * h > max_pixels:
            raise ImageError(f"{where}: image is {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,}")
        if decode:
            im.load()
    return im


def open_rgb_image(path: Path, where: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A fully loaded RGB PIL image from a file whose path is already checked (``resolve_inside``).

    The format and pixel cap are checked on the header before decoding; ``where`` names the record
    and path in every error.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageError(f"{where}: cannot be read ({e.strerror})") from None
    with f:
        im = inspect_image(f, where, max_pixels)
        with pil_guard(where):
            return to_rgb(im)


def to_rgb(im):
    """RGB view of any PIL image; transparency is composited over white (how a page shows it)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def encode_png(im) -> bytes:
    """Lossless PNG bytes of a PIL image (deterministic: the same pixels give the same bytes)."""
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        im = to_rgb(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def resolve_inside(root: Path, rel: str, record_id: str) -> Path:
    """Absolute path of dataset-relative ``rel``, proven (after resolving symlinks) to lie in ``root``."""
    check_image_path(rel, record_id)
    root_resolved = root.resolve()
    target = (root_resolved / rel).resolve()
    if not target.is_relative_to(root_resolved):
        raise ImageError(f"record {record_id!r}: image path {rel!r} resolves outside the dataset root {str(root)!r}")
    return target


# --------------------------------------------------------------------------------- manifest
def dataset_file(root: Path, rel: str) -> Path:
    """``root / rel`` (the manifest or a shard), refused if it resolves outside the root (a symlink out)."""
    path = root / rel
    root_resolved = root.resolve()
    if not path.resolve().is_relative_to(root_resolved):
        raise DatasetError(f"{path}: resolves outside the dataset root {str(root)!r} "
                           f"(to {str(path.resolve())!r}); a dataset's files must lie inside it")
    return path


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"{str(root)!r} is not a dataset directory (no such directory)")
    if not path.is_file():
        raise DatasetError(f"{str(root)!r} is not a dataset directory: no {MANIFEST}")
    dataset_file(root, MANIFEST)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DatasetError(f"{path}: shards[{i}].num_records must be a non-negative integer, got {n!r}")
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
    to be fsync'ed before a shard naming it is committed; None when the same bytes were there)."""
    where = f"record {record_id!r}: image"
    if _is_pil(image):
        w, h = image.size
        if w * h > max_pixels:
            raise ImageError(f"{where} is {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,}")
        data, ext = encode_png(image), "png"
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
                    raise DatasetError(f"{str(self.root)!r} already holds a dataset; pass append=True to add to it")
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
        self._shard_file = None  # open tmp file of the current shard
        self._shard_count = 0
        self._pending_images: list[Path] = []  # stored since the last commit, fsync'ed at commit
        self._closed = False

    def _clean_uncommitted(self) -> None:
        """Remove what a killed writer left: tmp files and shards the manifest does not list."""
        listed = {s["path"] for s in self.manifest["shards"]}
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
        line = rec.to_jsonl_line()  # validates again, now with every image a stored path
        if self._shard_file is None:
            self._open_shard()
        self._shard_file.write(line + "\n")
        self._ids.add(rec.id)
        self._shard_count += 1
        if self._shard_count >= self.shard_size:
            self._commit_shard()

    def _tmp_path(self, index: int) -> Path:
        return self.root / SHARD_DIR / f".part-{index:05d}.jsonl.tmp"

    def _open_shard(self) -> None:
        self._shard_file = open(self._tmp_path(self._next_shard), "w", encoding="utf-8")
        self._shard_count = 0

    def _commit_shard(self) -> None:
        """tmp shard -> fsync -> rename, then the manifest listing it (also tmp + rename)."""
        f, index = self._shard_file, self._next_shard
        f.flush()
        os.fsync(f.fileno())
        f.close()
        fsync_files(self._pending_images)  # images first: a committed shard must not outlive its images
        self._pending_images.clear()
        rel = shard_name(index)
        os.replace(self._tmp_path(index), self.root / rel)
        fsync_dir(self.root / SHARD_DIR)
        self.manifest["shards"].append({"path": rel, "num_records": self._shard_count})
        self.manifest["num_records"] += self._shard_count
        self.manifest["updated"] = _now()
        atomic_write_bytes(self.root / MANIFEST, _manifest_bytes(self.manifest))
        self._name_changed = False
        self._shard_file, self._shard_count, self._next_shard = None, 0, index + 1

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
        self._tmp = self.root / SHARD_DIR / f".part-{index:05d}.jsonl.tmp"
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
        self._file.write(rec.to_jsonl_line() + "\n")
        self._ids.add(rec.id)

    def commit(self) -> int:
        """Make the shard durable and put it in place; returns its record count (0: no file at all)."""
        f = self._file
        f.flush()
        os.fsync(f.fileno())
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

    def iter_shard(self, index: int) -> Iterator[Record]:
        """Records of one shard (shards are the unit of parallel work, as in datatrove)."""
        entry = self.manifest["shards"][index]
        path = dataset_file(self.root, entry["path"])
        n = 0
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise DatasetError(f"{path}: shard listed in the manifest cannot be opened ({e.strerror})") from None
        with f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    raise DatasetError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from None
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    raise DatasetError(f"{path}:{lineno}: empty line")
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                try:
                    rec = Record.from_json(d)
                except RecordError as e:
                    raise RecordError(f"{path}:{lineno}: {e}") from None
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
