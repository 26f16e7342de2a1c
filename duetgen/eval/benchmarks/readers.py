"""Readers that turn benchmark inputs and model outputs into records (DESIGN section 3).

On-disk forms read here:

- a DuetGen dataset directory (``manifest.json`` + shards + images): prompts or predictions;
- InterleavedBench's LLaVA-style JSON (``interleaved_bench.json``): a list of
  ``{"id", "task_name", "conversations": [{"from": "human", "value": "... <image> ..."},
  {"from": "gpt", "value": ...}], "image": [paths], "goal"?, "category"?, "dataset_id"?}``;
  the ``k``-th ``<image>`` token of the human turn is ``image[k]``; the images after those are the
  ground truth, placed at the gpt turn's ``<image>`` tokens when it has as many, else kept as a list;
- CoMM's prediction layout (HKUST-LongGroup/CoMM ``eval/eval_metric.py``): one folder per sample,
  ``<root>/<data_id>_taskN/results.json`` with ``model_input``, ``model_output`` (``<IMAGE>`` marks
  each image), ``input_image_list`` and ``output_gt_image_list`` (files under ``<sample>/origin/``)
  and ``prediction_image_list`` (files directly in ``<sample>/``);
- ImgEdit Basic's ``basic_edit.json`` (``{key: {"id": image path, "prompt", "edit_type"}}``, images
  under the original-images root) and its predictions, ``<key>.png`` in one folder; the user's copy
  of its judge prompts (``prompts.json``: ``{edit_type: prompt with <edit_prompt>}``);
- GEdit-Bench (``stepfun-ai/GEdit-Bench``) from a local Parquet or ``datasets.save_to_disk`` copy
  (``task_type``, ``key``, ``instruction``, ``instruction_language``, ``input_image``), and its
  predictions in the official layout ``<root>/fullset/<task_type>/<language>/<key>.png``;
- GenEval's ``evaluation_metadata.jsonl`` (one prompt per line) and the ``results.jsonl`` its
  ``evaluate_images.py`` writes (one line per image: ``filename``, ``tag``, ``correct``, ...).

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

from duetgen.data.dataset import Dataset, json_problem, resolve_inside
from duetgen.data.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, ImageError, open_rgb_image
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart, check_image_path

MAX_JSON_BYTES = 64 * 1024 * 1024  # InterleavedBench's file is ~1 MB; a CoMM results.json is < 10 kB
MAX_IMAGES_PER_SAMPLE = 64
INTERLEAVEDBENCH_IMAGE_TOKEN = "<image>"
COMM_IMAGE_TOKEN = "<IMAGE>"
_COMM_SAMPLE_RE = re.compile(r"^(?P<data_id>.+)_(?P<task>task\d+)$")
COMM_LAYOUT = ("<root>/<data_id>_taskN/results.json, input and ground-truth images in <root>/<data_id>_taskN/origin/, "
               "predicted images in <root>/<data_id>_taskN/")


class ReaderError(RecordError):
    """A benchmark or prediction file is malformed. The message names the file and the field."""


class ImageSource(Protocol):
    """Opens the image paths of some records (a Dataset, or an ImageFolder)."""

    root: Path

    def image_path(self, path: str, record_id: str = "?") -> Path: ...

    def open_image(self, path: str, record_id: str = "?"): ...

    def read_bytes(self, path: str, record_id: str = "?") -> bytes: ...  # (a Dataset: read_image_bytes)


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

    def read_bytes(self, path: str, record_id: str = "?") -> bytes:
        """The file's bytes, at most ``DEFAULT_MAX_IMAGE_BYTES`` (a PNG padded with 400 MB was stored whole)."""
        where = f"record {record_id!r}: image {path!r}"
        try:
            with open(self.image_path(path, record_id), "rb") as f:
                data = f.read(DEFAULT_MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise ImageError(f"{where}: cannot be read ({e.strerror})") from None
        if len(data) > DEFAULT_MAX_IMAGE_BYTES:
            raise ImageError(f"{where}: over the cap of {DEFAULT_MAX_IMAGE_BYTES:,} bytes")
        return data

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r})"


def file_inside(root: Path, path: Path) -> Path:
    """``path``, found inside the input folder ``root``, proven to resolve inside it (a symlink out to a
    secret or to /dev/zero is refused) and to be a regular file."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise ReaderError(f"{path}: resolves outside {str(root)!r} (to {str(real)!r}); an input's files must lie "
                          "inside it")
    if not real.is_file():
        raise ReaderError(f"{path}: not a regular file")
    return path


def _read_bytes(path: Path) -> bytes:
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise ReaderError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)  # bounded: a device or a growing file has no honest st_size
    except OSError as e:
        raise ReaderError(f"{path}: cannot be read ({e.strerror})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ReaderError(f"{path}: over the cap of {MAX_JSON_BYTES:,} bytes")
    return raw


def _read_json(path: Path) -> Any:
    raw = _read_bytes(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ReaderError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ReaderError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting deeper than Python's stack
        raise ReaderError(f"{path}: unreadable JSON ({json_problem(e)})") from None


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
    # Repeated ids occur in the real file: such a sample is keyed "<id>#<index>" (its position in
    # the list), the original id kept in meta; unique ids stay the key.
    id_counts: dict[str, int] = {}
    for s in data:
        if isinstance(s, dict) and isinstance(s.get("id"), (str, int)) and not isinstance(s.get("id"), bool):
            id_counts[str(s["id"])] = id_counts.get(str(s["id"]), 0) + 1
    records = []
    for i, s in enumerate(data):
        where = f"{path}: sample [{i}]"
        if not isinstance(s, dict):
            raise ReaderError(f"{where}: must be an object")
        sid = s.get("id")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
            raise ReaderError(f"{where}: 'id' must be a non-empty string or integer, got {sid!r}")
        rid = str(sid) if id_counts[str(sid)] == 1 else f"{sid}#{i}"
        where = f"{path}: sample [{i}] {str(sid)!r}"
        if rid != str(sid) and rid in id_counts:
            raise ReaderError(f"{where}: the key {rid!r} given to this repeated id is another sample's id")
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
        if n_in > len(img_list):
            raise ReaderError(f"{where}: {n_in} <image> token(s) in the human turn but {len(img_list)} image path(s)")
        user = _interleave(turns["human"], INTERLEAVEDBENCH_IMAGE_TOKEN, img_list[:n_in], where + " human turn")
        if not user:
            raise ReaderError(f"{where}: the human turn is empty")
        meta: dict[str, Any] = {"category": task, "task_name": task, "benchmark": "interleavedbench",
                                "interleavedbench_id": sid, "interleavedbench_index": i}
        for k in ("goal", "category", "dataset_id"):
            if k in s:
                meta["interleavedbench_" + k] = s[k]
        if "gpt" in turns or img_list[n_in:]:
            # ground-truth images: placed at the gpt turn's <image> tokens only when the counts agree
            gpt = turns.get("gpt", "")
            placed = gpt.count(INTERLEAVEDBENCH_IMAGE_TOKEN) == len(img_list) - n_in
            meta["reference"] = {"text": gpt, "images": img_list[n_in:], "images_at_tokens": placed}
        records.append(Record(id=rid, messages=[Message("user", user)], source="interleavedbench", meta=meta))
    return records, images


# ----------------------------------------------------------------------------- CoMM
def is_comm_results_dir(root: str | os.PathLike) -> bool:
    root = Path(root)
    return root.is_dir() and not (root / "manifest.json").exists() and any(root.glob("*/results.json"))


def read_comm_results(root: str | os.PathLike) -> tuple[list[Record], ImageFolder]:
    """CoMM's per-sample prediction folders as records: user turn = ``model_input`` with its input
    images, assistant turn = ``model_output`` with ``prediction_image_list`` in its ``<IMAGE>`` slots.

    The layout is CoMM's own (``COMM_LAYOUT``): every sub-folder is ``<data_id>_taskN`` with a
    ``results.json``; input and ground-truth images live in its ``origin/`` folder, predictions
    directly in it. The record id is the folder name, ``meta["category"]`` its task (``task1`` ..
    ``task4``); ground-truth image paths go to ``meta["gt_images"]``. All tasks are read; the
    harness keeps the one a run judges. A folder outside this layout is an error naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"{root}: not a directory (CoMM layout: {COMM_LAYOUT})")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ReaderError(f"{root}: no sample folder found (CoMM layout: {COMM_LAYOUT})")
    records = []
    for d in folders:
        rid = d.name
        path = d / "results.json"
        m = _COMM_SAMPLE_RE.match(rid)
        if m is None or not path.is_file():
            why = "its name does not end in _taskN" if m is None else "it has no results.json"
            raise ReaderError(f"{d}: not a CoMM sample folder ({why}); expected layout: {COMM_LAYOUT}")
        s = _read_json(file_inside(root, path))  # a sample folder or its results.json linked out is refused
        if not isinstance(s, dict):
            raise ReaderError(f"{path}: must be a JSON object")
        for k in ("model_input", "model_output"):
            if not isinstance(s.get(k), str):
                raise ReaderError(f"{path}: {k!r} must be a string")
        lists = {}
        for k, folder in (("input_image_list", "origin/"), ("output_gt_image_list", "origin/"),
                          ("prediction_image_list", "")):
            v = s.get(k, [])
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ReaderError(f"{path}: {k!r} must be a list of file names")
            if len(v) > MAX_IMAGES_PER_SAMPLE:
                raise ReaderError(f"{path}: {k!r} has {len(v)} images, over the cap of {MAX_IMAGES_PER_SAMPLE}")
            try:
                lists[k] = [check_image_path(f"{rid}/{folder}{x}", rid) for x in v]
            except RecordError as e:
                raise ReaderError(f"{path}: {k}: {e}") from None
        # Task 1 and 3 inputs carry their context images (<IMAGE> tokens); tasks 2 and 4 have none.
        user = _interleave(s["model_input"], COMM_IMAGE_TOKEN, lists["input_image_list"], f"{path}: model_input")
        output = _interleave(s["model_output"], COMM_IMAGE_TOKEN, lists["prediction_image_list"],
                             f"{path}: model_output")
        if not user:
            raise ReaderError(f"{path}: 'model_input' is empty")
        if not output:
            raise ReaderError(f"{path}: 'model_output' is empty and lists no prediction image")
        meta = {"category": m.group("task"), "benchmark": "comm", "comm_data_id": m.group("data_id"),
                "gt_images": lists["output_gt_image_list"]}
        records.append(Record(id=rid, messages=[Message("user", user), Message("assistant", output)],
                              source="comm", meta=meta))
    return records, ImageFolder(root)


# ----------------------------------------------------------------------------- ImgEdit
IMGEDIT_LAYOUT = "basic_edit.json = {key: {id: <image path under --images>, prompt, edit_type}}; predictions <pred>/<key>.png"


def read_imgedit(json_path: str | os.PathLike, images_root: str | os.PathLike | None = None
                 ) -> tuple[list[Record], ImageFolder]:
    """ImgEdit Basic's ``basic_edit.json`` as prompt records: user = [source image, edit prompt],
    id = the key, ``meta["category"]`` = ``edit_type``. Image paths (``id``) are relative to
    ``images_root`` (ImgEdit's original-images root; default: the JSON file's folder)."""
    path = Path(json_path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise ReaderError(f"{path}: expected a JSON object of edits ({IMGEDIT_LAYOUT})")
    records = []
    for key, item in data.items():
        where = f"{path}: edit {key!r}"
        if not key or "/" in key or "\\" in key or key.startswith(".") or "\0" in key:
            # the key names its prediction file <key>.png: "a" and "./a" would share one
            raise ReaderError(f"{where}: a key must be a plain file name (no '/', no leading '.')")
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item.get(k) for k in
                                                 ("id", "prompt", "edit_type")):
            raise ReaderError(f"{where}: needs string fields id, prompt, edit_type ({IMGEDIT_LAYOUT})")
        try:
            image = check_image_path(item["id"], key)
        except RecordError as e:
            raise ReaderError(f"{where}: {e}") from None
        records.append(Record(id=str(key), source="imgedit",
                              messages=[Message("user", [ImagePart(image), TextPart(item["prompt"])])],
                              meta={"category": item["edit_type"], "benchmark": "imgedit"}))
    return records, ImageFolder(images_root if images_root is not None else path.parent)


IMGEDIT_EDIT_TYPES = ("add", "remove", "replace", "adjust", "style", "action", "extract", "background", "compose")
IMGEDIT_PROMPT_PLACEHOLDER = "<edit_prompt>"
IMGEDIT_PROMPTS_LAYOUT = ("ImgEdit's judge prompt file (basic_bench.py --prompts_json) = {edit_type: prompt text with "
                          f"{IMGEDIT_PROMPT_PLACEHOLDER} where the instruction goes}}, one entry for each of "
                          f"{', '.join(IMGEDIT_EDIT_TYPES)}")


def read_imgedit_judge_prompts(path: str | os.PathLike) -> dict:
    """The user's copy of ImgEdit's official judge prompts (``prompts.json``) as one judge template
    per edit type: ``{edit_type: PromptTemplate}``.

    basic_bench.py sends one user message: ``prompts[edit_type]`` with ``<edit_prompt>`` replaced by
    the instruction, then the source and the edited image; the templates do the same (no system
    turn, no reply schema: the reply is prose, read by ``judge.LineScores``). A file in another
    layout is an error naming the layout and the first key that breaks it; so is a prompt without
    the placeholder (the judge would never see the instruction) and one holding ``{name}``, which
    our template syntax would take for a field."""
    from duetgen.llm.templates import PromptTemplate

    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise ReaderError(f"{path}: expected a JSON object of prompts, got {type(data).__name__}; "
                          f"layout: {IMGEDIT_PROMPTS_LAYOUT}")
    templates = {}
    for key, text in data.items():
        where = f"{path}: key {key!r}"
        if key not in IMGEDIT_EDIT_TYPES:
            raise ReaderError(f"{where} is not an ImgEdit Basic edit type; layout: {IMGEDIT_PROMPTS_LAYOUT}")
        if not isinstance(text, str) or IMGEDIT_PROMPT_PLACEHOLDER not in text:
            raise ReaderError(f"{where}: must be a prompt string containing {IMGEDIT_PROMPT_PLACEHOLDER}; "
                              f"layout: {IMGEDIT_PROMPTS_LAYOUT}")
        t = PromptTemplate.from_dict({
            "name": f"imgedit_official_{key}", "version": "user-file",
            "description": f"ImgEdit Basic's official judge prompt for '{key}', from the user's prompts.json",
            "user": [{"type": "text", "text": text.replace(IMGEDIT_PROMPT_PLACEHOLDER, "{instruction}")},
                     {"type": "image", "field": "source"}, {"type": "image", "field": "edited"}]}, where=where)
        if t.fields() != {"instruction", "source", "edited"}:
            extra = sorted(t.fields() - {"instruction", "source", "edited"})
            raise ReaderError(f"{where}: holds {{{extra[0]}}}, which our templates would read as a field; "
                              f"layout: {IMGEDIT_PROMPTS_LAYOUT}")
        templates[key] = t
    missing = [t for t in IMGEDIT_EDIT_TYPES if t not in data]
    if missing:
        raise ReaderError(f"{path}: no prompt for edit type {missing[0]!r}; layout: {IMGEDIT_PROMPTS_LAYOUT}")
    return templates


def read_edit_predictions(pred: str | os.PathLike, prompts: list[Record], layout: str
                          ) -> tuple[list[Record], ImageSource, str]:
    """An editing benchmark's predictions: a DuetGen dataset (from ``eval generate``), or the
    benchmark's own layout of edited images (``layout``: "imgedit" ``<key>.png``; "gedit"
    ``fullset/<task_type>/<language>/<key>.png``). In the own layout, a prompt without its file
    has no prediction (``missing``), so every record here has its edited image."""
    pred = Path(pred)
    if (pred / "manifest.json").is_file():
        recs, ds = read_records(pred)
        return recs, ds, "records"
    if not pred.is_dir():
        raise ReaderError(f"{pred}: not a directory")
    out = []
    for p in prompts:
        rel = f"{p.id}.png" if layout == "imgedit" else f"fullset/{p.id}.png"
        if (pred / rel).is_file():
            out.append(Record(id=p.id, source=layout, meta=dict(p.meta),
                              messages=[*p.messages, Message("assistant", [ImagePart(rel)])]))
    if not out:
        expected = IMGEDIT_LAYOUT if layout == "imgedit" else GEDIT_LAYOUT
        first = f"{prompts[0].id}.png" if layout == "imgedit" else f"fullset/{prompts[0].id}.png" if prompts else "?"
        raise ReaderError(f"{pred}: no edited image of any benchmark item (first expected: {pred / first}); "
                          f"expected layout: {expected}")
    return out, ImageFolder(pred), f"{layout}_images"


# ----------------------------------------------------------------------------- GEdit-Bench
GEDIT_LAYOUT = ("a Parquet file or folder of the stepfun-ai/GEdit-Bench dataset (columns task_type, key, instruction, "
                "instruction_language, input_image), or a datasets.save_to_disk folder; predictions "
                "<pred>/fullset/<task_type>/<instruction_language>/<key>.png")
GEDIT_COLUMNS = ("task_type", "key", "instruction", "instruction_language")


class TableImages:
    """Images stored in a column of Arrow tables (a local ``datasets`` / Parquet copy), read one
    table batch at a time. A path is ``<record id>/input_image``; the pixel cap applies as for files."""

    def __init__(self, root: Path, rows: dict[str, tuple[int, int]], loaders: list, column: str,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = root
        self._rows = rows  # record id -> (loader index, row)
        self._loaders = loaders  # index -> callable returning that batch's image column
        self._column = column
        self._cached: tuple[int, Any] | None = None
        self.max_pixels = max_pixels

    def _bytes(self, path: str, record_id: str) -> bytes:
        rid, _, col = path.rpartition("/")
        if col != self._column or rid not in self._rows:
            raise ImageError(f"record {record_id!r}: image {path!r} is not in {str(self.root)!r}")
        li, row = self._rows[rid]
        if self._cached is None or self._cached[0] != li:
            self._cached = (li, self._loaders[li]())
        cell = self._cached[1][row].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, bytes) or not data:
            raise ImageError(f"record {record_id!r}: image {path!r} has no bytes in {str(self.root)!r}")
        return data

    def image_path(self, path: str, record_id: str = "?") -> Path:
        self._bytes(path, record_id)  # existence
        return self.root / path  # a name for hashes and messages, not a file

    def read_bytes(self, path: str, record_id: str = "?") -> bytes:
        """The stored image file's bytes (what a file source gives with ``image_path(...).read_bytes()``)."""
        return self._bytes(path, record_id)

    def stat_key(self, path: str, record_id: str = "?") -> list:
        import hashlib

        return [hashlib.sha256(self._bytes(path, record_id)).hexdigest()]

    def open_image(self, path: str, record_id: str = "?"):
        import io
        import tempfile

        data = self._bytes(path, record_id)
        with tempfile.NamedTemporaryFile(suffix=".img") as f:  # open_rgb_image checks format and cap on a file
            f.write(data)
            f.flush()
            return open_rgb_image(Path(f.name), f"record {record_id!r}: image {path!r}", self.max_pixels)


def _row_group(pf, f: Path, rg: int, columns: list[str]):
    """One row group's columns; a corrupt page is an error naming the file and row group (pyarrow's names
    neither)."""
    try:
        return pf.read_row_group(rg, columns=columns)
    except Exception as e:  # pyarrow raises OSError, ArrowInvalid and others for a bad page
        raise ReaderError(f"{f}#{rg}: row group {rg} does not decode ({type(e).__name__}: {e})") from None


def _gedit_tables(root: Path) -> list[tuple[str, Any, Any]]:
    """(name, table without images, loader of the image column) per Parquet row group / Arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [root] if root.is_file() else sorted(root.rglob("*.parquet")) or sorted(root.rglob("*.arrow"))
    if not files:
        raise ReaderError(f"{root}: no *.parquet or *.arrow file; expected {GEDIT_LAYOUT}")
    out = []
    for f in files:
        if f.suffix == ".parquet":
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ReaderError(f"{f}: not a readable Parquet file ({e})") from None
            missing = [c for c in (*GEDIT_COLUMNS, "input_image") if c not in pf.schema_arrow.names]
            if missing:
                raise ReaderError(f"{f}: missing column(s) {missing}; expected {GEDIT_LAYOUT}")
            for rg in range(pf.num_row_groups):
                out.append((f"{f}#{rg}", _row_group(pf, f, rg, list(GEDIT_COLUMNS)),
                            lambda pf=pf, f=f, rg=rg: _row_group(pf, f, rg, ["input_image"]).column("input_image")))
        else:
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(f))).read_all()  # memory-mapped: images stay on disk
            except Exception as e:
                raise ReaderError(f"{f}: not a readable Arrow stream file ({e})") from None
            missing = [c for c in (*GEDIT_COLUMNS, "input_image") if c not in table.column_names]
            if missing:
                raise ReaderError(f"{f}: missing column(s) {missing}; expected {GEDIT_LAYOUT}")
            out.append((str(f), table.select(list(GEDIT_COLUMNS)), lambda t=table: t.column("input_image")))
    return out


def read_gedit(root: str | os.PathLike, language: str = "en") -> tuple[list[Record], TableImages]:
    """GEdit-Bench's rows as prompt records (user = [input image, instruction]); only rows whose
    ``instruction_language`` is ``language`` ("all": every row). id = ``<task_type>/<language>/<key>``
    (the official prediction layout's path), ``meta["category"]`` = ``task_type``."""
    root = Path(root)
    if not root.exists():
        raise ReaderError(f"{root}: does not exist; expected {GEDIT_LAYOUT}")
    rows: dict[str, tuple[int, int]] = {}
    loaders, records, languages = [], [], set()
    for li, (name, table, loader) in enumerate(_gedit_tables(root)):
        loaders.append(loader)
        for row, r in enumerate(table.to_pylist()):
            if not all(isinstance(r[c], str) and r[c] for c in GEDIT_COLUMNS):
                raise ReaderError(f"{name}: row {row}: {list(GEDIT_COLUMNS)} must be non-empty strings")
            languages.add(r["instruction_language"])
            if language != "all" and r["instruction_language"] != language:
                continue
            rid = f"{r['task_type']}/{r['instruction_language']}/{r['key']}"
            for part in rid.split("/"):
                if part in ("", ".", "..") or "\\" in part:
                    raise ReaderError(f"{name}: row {row}: id {rid!r} is not a safe relative path")
            if rid in rows:
                raise ReaderError(f"{name}: row {row}: {rid!r} appears twice")
            rows[rid] = (li, row)
            records.append(Record(id=rid, source="gedit", meta={"category": r["task_type"], "benchmark": "gedit",
                                                                "instruction_language": r["instruction_language"]},
                                  messages=[Message("user", [ImagePart(f"{rid}/input_image"),
                                                             TextPart(r["instruction"])])]))
    if not records:
        raise ReaderError(f"{root}: no row with instruction_language {language!r} (found: {sorted(languages)})")
    return records, TableImages(root, rows, loaders, "input_image")


# ----------------------------------------------------------------------------- GenEval
GENEVAL_LAYOUT = ("<out>/<5-digit prompt index>/metadata.jsonl (the prompt's JSON line) and "
                  "<out>/<index>/samples/<5-digit sample>.png; scores: evaluate_images.py's results.jsonl")


def _json_lines(path: Path):
    """(line number, parsed value) of each non-blank line of a JSONL file; a malformed line is an error naming it."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReaderError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ReaderError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:
            raise ReaderError(f"{path}:{lineno}: unreadable JSON ({json_problem(e)})") from None


def read_geneval_metadata(path: str | os.PathLike) -> list[dict]:
    """GenEval's ``evaluation_metadata.jsonl``: one JSON object per line, each with ``tag`` and ``prompt``."""
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"{path}: not a file (GenEval's evaluation_metadata.jsonl)")
    out = []
    for lineno, d in _json_lines(path):
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or not isinstance(d.get("tag"), str):
            raise ReaderError(f"{path}:{lineno}: each line needs string 'tag' and 'prompt'")
        out.append(d)
    if not out:
        raise ReaderError(f"{path}: no prompt")
    return out


def read_geneval_results(path: str | os.PathLike) -> list[dict]:
    """GenEval's ``results.jsonl`` grouped per prompt: ``[{"id": <prompt folder>, "category": tag,
    "prompt", "correct": [bool per image], "files": [...]}]`` in folder order. The prompt folder is
    the image's ``<index>/samples/<n>.png`` parent; a line of another shape is an error naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise ReaderError(f"{path}: not found (GenEval's evaluate_images.py writes results.jsonl; layout: {GENEVAL_LAYOUT})")
    groups: dict[str, dict] = {}
    for lineno, d in _json_lines(path):
        if not (isinstance(d, dict) and isinstance(d.get("filename"), str) and isinstance(d.get("tag"), str)
                and isinstance(d.get("correct"), bool)):
            raise ReaderError(f"{path}:{lineno}: needs filename (string), tag (string), correct (bool)")
        parts = Path(d["filename"]).parts
        if len(parts) < 3 or parts[-2] != "samples" or not parts[-3].isdigit():
            raise ReaderError(f"{path}:{lineno}: filename {d['filename']!r} is not <index>/samples/<n>.png "
                              f"(layout: {GENEVAL_LAYOUT})")
        g = groups.setdefault(parts[-3], {"id": parts[-3], "category": d["tag"], "prompt": d.get("prompt"),
                                          "correct": [], "files": []})
        if g["category"] != d["tag"]:
            raise ReaderError(f"{path}:{lineno}: prompt folder {parts[-3]} has images of two tags "
                              f"({g['category']!r}, {d['tag']!r})")
        if os.path.normpath(d["filename"]) in map(os.path.normpath, g["files"]):
            raise ReaderError(f"{path}:{lineno}: image {d['filename']!r} has a result line already")
        g["correct"].append(d["correct"])
        g["files"].append(d["filename"])
    if not groups:
        raise ReaderError(f"{path}: no result line")
    return [groups[k] for k in sorted(groups)]


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
