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

On disk: ``duetgen.data.dataset`` (``DatasetWriter`` / ``Dataset``: atomic JSONL shards plus
content-addressed images, docs/record-format.md); reading image bytes safely: ``duetgen.data.images``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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
                elif not (isinstance(p.image, (bytes, bytearray)) or is_pil_image(p.image)):
                    raise RecordError(
                        f"record {rec.id!r}: messages[{i}].content[{j}].image must be a path, bytes or a PIL image"
                    )
            else:
                raise RecordError(f"record {rec.id!r}: messages[{i}].content[{j}]: unknown part {type(p).__name__}")


def is_pil_image(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def text(s: str) -> TextPart:
    return TextPart(s)


def image(x: Any) -> ImagePart:
    return ImagePart(x)
