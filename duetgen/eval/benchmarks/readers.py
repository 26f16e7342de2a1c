"""Readers that turn benchmark inputs and model outputs into records (DESIGN section 3).

Three on-disk forms are read:

- a DuetGen dataset directory (``manifest.json`` + shards + images): prompts or predictions;
- InterleavedBench's LLaVA-style JSON (``interleaved_bench.json``): a list of
  ``{"id", "task_name", "conversations": [{"from": "human", "value": "... <image> ..."},
  {"from": "gpt", "value": ...}], "image": [paths], "goal"?, "category"?, "dataset_id"?}``;
  the ``k``-th ``<image>`` token, counted over the human turn and then the gpt turn, is ``image[k]``;
- CoMM's prediction layout: ``<root>/<data_id>/results.json`` with ``model_input``,
  ``model_output`` (``<IMAGE>`` marks each image), ``input_image_list``, ``output_gt_image_list``
  and ``prediction_image_list`` (file names inside the sample folder).

Design choices:
- Everything read here is untrusted. JSON files are size-capped before parsing, image paths go
  through ``check_image_path`` and must resolve inside their root (symlinks too), and images are
  opened with the dataset's pixel cap, checked on the header before decoding.
- A mismatch between image tokens and image lists is an error naming the file and the counts,
  never silently padded or truncated (STYLE principle 12).
- Every reader returns records plus an ``ImageSource`` for their image paths; the judge never
  sees a filesystem path that did not pass these checks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

from duetgen.data.record import (
    DEFAULT_MAX_PIXELS,
    Dataset,
    ImageError,
    ImagePart,
    Message,
    Record,
    RecordError,
    TextPart,
    check_image_path,
    open_rgb_image,
    resolve_inside,
)

MAX_JSON_BYTES = 64 * 1024 * 1024  # InterleavedBench's file is ~1 MB; a CoMM results.json is < 10 kB
MAX_IMAGES_PER_SAMPLE = 64
INTERLEAVEDBENCH_IMAGE_TOKEN = "<image>"
COMM_IMAGE_TOKEN = "<IMAGE>"
_COMM_TASK_RE = re.compile(r"task\d+")


class ReaderError(RecordError):
    """A benchmark or prediction file is malformed. The message names the file and the field."""


class ImageSource(Protocol):
    """Opens the image paths of some records (a Dataset, or an ImageFolder)."""

    root: Path

    def image_path(self, path: str, record_id: str = "?") -> Path: ...

    def open_image(self, path: str, record_id: str = "?"): ...


class ImageFolder:
    """Images under a folder, opened with the same containment and pixel-cap checks as a Dataset."""

    def __init__(self, root: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.max_pixels = max_pixels

    def image_path(self, path: str, record_id: str = "?") -> Path:
        p = resolve_inside(self.root, path, record_id)
        if not p.is_file():
            raise ImageError(f"record {record_id!r}: image {path!r} not found under {str(self.root)!r}")
        return p

    def open_image(self, path: str, record_id: str = "?"):
        return open_rgb_image(self.image_path(path, record_id), f"record {record_id!r}: image {path!r}",
                              self.max_pixels)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r})"


def _read_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ReaderError(f"{path}: cannot be read ({e.strerror})") from None
    if size > MAX_JSON_BYTES:
        raise ReaderError(f"{path}: {size:,} bytes, over the cap of {MAX_JSON_BYTES:,}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ReaderError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ReaderError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _interleave(text: str, token: str, images: list[str], where: str) -> list[TextPart | ImagePart]:
    """Split ``text`` at ``token`` and put ``images`` (paths) in the gaps, in order."""
    chunks = text.split(token)
    if len(chunks) - 1 != len(images):
        raise ReaderError(f"{where}: {len(chunks) - 1} {token} token(s) but {len(images)} image(s)")
    parts: list[TextPart | ImagePart] = []
    for i, chunk in enumerate(chunks):
        if chunk.strip():
            parts.append(TextPart(chunk.strip()))
        if i < len(images):
            parts.append(ImagePart(images[i]))
    return parts


# ----------------------------------------------------------------------------- DuetGen datasets
def read_records(root: str | os.PathLike) -> tuple[list[Record], Dataset]:
    """All records of a dataset directory (validated), and the dataset as their image source."""
    ds = Dataset(root)
    return list(ds), ds


# ----------------------------------------------------------------------------- InterleavedBench
def read_interleavedbench(json_path: str | os.PathLike, images_root: str | os.PathLike | None = None
                          ) -> tuple[list[Record], ImageFolder]:
    """InterleavedBench's ``interleaved_bench.json`` as prompt records (one user turn each).

    The human turn becomes the user message; the gpt turn, when present, is kept as the reference
    in ``meta["reference"]`` (text with its image paths) since InterleavedEval is reference-free.
    ``meta["category"]`` is the ``task_name``. Image paths are relative to ``images_root``
    (default: the JSON file's folder).
    """
    path = Path(json_path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ReaderError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    images = ImageFolder(images_root if images_root is not None else path.parent)
    records, seen = [], set()
    for i, s in enumerate(data):
        where = f"{path}: sample [{i}]"
        if not isinstance(s, dict):
            raise ReaderError(f"{where}: must be an object")
        sid = s.get("id")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
            raise ReaderError(f"{where}: 'id' must be a non-empty string or integer, got {sid!r}")
        rid = str(sid)
        where = f"{path}: sample {rid!r}"
        if rid in seen:
            raise ReaderError(f"{where}: duplicate id")
        seen.add(rid)
        task = s.get("task_name")
        if not isinstance(task, str) or not task:
            raise ReaderError(f"{where}: 'task_name' must be a non-empty string")
        conv = s.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise ReaderError(f"{where}: 'conversations' must be a non-empty list")
        img_list = s.get("image", [])
        if not isinstance(img_list, list) or not all(isinstance(x, str) for x in img_list):
            raise ReaderError(f"{where}: 'image' must be a list of paths")
        if len(img_list) > MAX_IMAGES_PER_SAMPLE:
            raise ReaderError(f"{where}: {len(img_list)} images, over the cap of {MAX_IMAGES_PER_SAMPLE}")
        for p in img_list:
            try:
                check_image_path(p, rid)
            except RecordError as e:
                raise ReaderError(f"{where}: {e}") from None
        turns = {}
        for j, t in enumerate(conv):
            if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
                raise ReaderError(f"{where}: conversations[{j}] must be {{from: human|gpt, value: string}}")
            if t["from"] in turns:
                raise ReaderError(f"{where}: conversations[{j}]: more than one {t['from']!r} turn")
            turns[t["from"]] = t["value"]
        if "human" not in turns:
            raise ReaderError(f"{where}: no 'human' turn")
        n_in = turns["human"].count(INTERLEAVEDBENCH_IMAGE_TOKEN)
        n_ref = turns.get("gpt", "").count(INTERLEAVEDBENCH_IMAGE_TOKEN)
        if n_in + n_ref != len(img_list):
            raise ReaderError(f"{where}: {n_in} <image> token(s) in the human turn and {n_ref} in the gpt turn, "
                              f"but {len(img_list)} image path(s)")
        user = _interleave(turns["human"], INTERLEAVEDBENCH_IMAGE_TOKEN, img_list[:n_in], where + " human turn")
        if not user:
            raise ReaderError(f"{where}: the human turn is empty")
        meta: dict[str, Any] = {"category": task, "task_name": task, "benchmark": "interleavedbench"}
        for k in ("goal", "category", "dataset_id"):
            if k in s:
                meta["interleavedbench_" + k] = s[k]
        if "gpt" in turns:
            meta["reference"] = {"text": turns["gpt"], "images": img_list[n_in:]}
        records.append(Record(id=rid, messages=[Message("user", user)], source="interleavedbench", meta=meta))
    return records, images


# ----------------------------------------------------------------------------- CoMM
def is_comm_results_dir(root: str | os.PathLike) -> bool:
    root = Path(root)
    return root.is_dir() and not (root / "manifest.json").exists() and any(root.glob("*/results.json"))


def read_comm_results(root: str | os.PathLike) -> tuple[list[Record], ImageFolder]:
    """CoMM's per-sample prediction folders as records: user turn = ``model_input`` with its input
    images, assistant turn = ``model_output`` with ``prediction_image_list`` in its ``<IMAGE>`` slots.

    The record id is the sample folder's name; ``meta["category"]`` is the CoMM task (``task1`` ..
    ``task4``) when the folder name carries it; ground-truth image paths go to ``meta["gt_images"]``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"{root}: not a directory")
    folders = sorted(p.parent for p in root.glob("*/results.json"))
    if not folders:
        raise ReaderError(f"{root}: no <sample>/results.json found (CoMM prediction layout)")
    records = []
    for d in folders:
        rid = d.name
        path = d / "results.json"
        s = _read_json(path)
        if not isinstance(s, dict):
            raise ReaderError(f"{path}: must be a JSON object")
        for k in ("model_input", "model_output"):
            if not isinstance(s.get(k), str):
                raise ReaderError(f"{path}: {k!r} must be a string")
        lists = {}
        for k in ("input_image_list", "output_gt_image_list", "prediction_image_list"):
            v = s.get(k, [])
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ReaderError(f"{path}: {k!r} must be a list of file names")
            if len(v) > MAX_IMAGES_PER_SAMPLE:
                raise ReaderError(f"{path}: {k!r} has {len(v)} images, over the cap of {MAX_IMAGES_PER_SAMPLE}")
            try:
                lists[k] = [check_image_path(f"{rid}/{x}", rid) for x in v]
            except RecordError as e:
                raise ReaderError(f"{path}: {k}: {e}") from None
        # Task 1-2 style inputs carry no <IMAGE> token while listing none; task 3 lists its context images.
        user = _interleave(s["model_input"], COMM_IMAGE_TOKEN, lists["input_image_list"], f"{path}: model_input")
        output = _interleave(s["model_output"], COMM_IMAGE_TOKEN, lists["prediction_image_list"],
                             f"{path}: model_output")
        if not user:
            raise ReaderError(f"{path}: 'model_input' is empty")
        if not output:
            raise ReaderError(f"{path}: 'model_output' is empty and lists no prediction image")
        m = _COMM_TASK_RE.search(rid)
        meta = {"category": m.group(0) if m else "all", "benchmark": "comm", "gt_images": lists["output_gt_image_list"]}
        records.append(Record(id=rid, messages=[Message("user", user), Message("assistant", output)],
                              source="comm", meta=meta))
    return records, ImageFolder(root)


# ----------------------------------------------------------------------------- predictions
def read_predictions(path: str | os.PathLike) -> tuple[list[Record], ImageSource, str]:
    """Model outputs from a dataset directory or a CoMM results folder: (records, images, format)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        recs, ds = read_records(path)
        return recs, ds, "records"
    if is_comm_results_dir(path):
        recs, folder = read_comm_results(path)
        return recs, folder, "comm_results"
    raise ReaderError(f"{path}: neither a DuetGen dataset (no manifest.json) nor a CoMM results folder "
                      "(no <sample>/results.json)")
