"""Adapters from public image generation / editing datasets to records (paper section 3.2).

The paper aggregates ShareGPT-4o-Image, NHR-Edit, OmniGen 1 & 2 (X2I), UniWorld-V1 and Echo-4o
(text-to-image, editing, multi-reference generation) for the stage-2 context alignment. Every
sample becomes::

    user: [input image(s) and the instruction, in the order the format gives]
    assistant: [target image]

The fields each reader relies on (from each project's released files and training code):

- ``sharegpt4o`` (FreedomIntelligence/ShareGPT-4o-Image): JSON lists ``text_to_image.json`` and
  ``text_and_image_to_image.json``; ``input_prompt``, ``output_image``, optional
  ``input_image`` (list of paths); ``*_resolution`` kept in meta. Paths relative to the folder
  holding the JSON file (where the image tars are extracted).
- ``nhr-edit`` (iitolstykh/NHR-Edit): ``train/metadata.jsonl``; ``source_file_name``,
  ``edited_file_name``, ``edit_instruction``; ``sample_id``, ``augmented_instructions``,
  ``category``, ``kind``, ``style``, ``img_width``, ``img_height`` kept in meta. Paths relative
  to the folder holding ``metadata.jsonl``.
- ``omnigen`` (OmniGen toy_data / X2I, and OmniGen2's training jsonl): ``task_type``,
  ``instruction``, ``input_images`` (list, may be empty or null), ``output_image``. Placeholders
  ``<img><|image_k|></img>`` in the instruction put image k at that position; without
  placeholders the input images come first.
- ``uniworld`` (UniWorld-V1 training json): a JSON list of ``{"image": str | [str], "conversations":
  [{"from": "human"|"gpt", "value": ...}]}``; ``<image>`` in human turns are the input images in
  order and ``<gen_image>`` in the gpt turn marks generation of the *last* listed image. Samples
  without ``<gen_image>`` are understanding data and are skipped (``not_generation``). Paths are
  relative to the image root given with the json (UniWorld's ``data.txt`` pairs them).
- ``echo4o`` (Yejy53/Echo-4o-Image): jsonl or a JSON list with ``instruction``, ``output_image``,
  ``task_type`` and, for Multi-Reference-Image, ``input_images``. Image paths are written with the
  logical root ``/Echo-4o-Image/<subset>/...``, mapped to ``<image root>/<subset>/...``.

Design choices:
- Untrusted paths: every image path must resolve (symlinks included) inside the image root;
  absolute paths, ``..`` escapes and URLs are refused (``path_outside_root``). Files are
  header-checked before use and capped in size. Nothing is downloaded.
- Bad rows never stop a run: missing or mistyped fields (``missing_field``, ``bad_field``),
  malformed JSON lines (``bad_json``), missing files (``missing_image``), non-images
  (``bad_image``) are skipped with the row named in the report; records already written stay.
- Idempotent reruns: record ids are stable (format + sample id, or + file and row number), and
  ids already committed in the output are skipped.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from duetgen.data.dataset import MAX_RECORD_LINE_BYTES, DatasetWriter, atomic_write_bytes, capped_lines, json_problem
from duetgen.data.images import DEFAULT_MAX_PIXELS, ImageError, inspect_image
from duetgen.data.record import ImagePart, Message, Record, RecordError, TextPart
from duetgen.data.synthetic.runlog import RunReport, committed_records

MAX_IMAGE_BYTES = 64 << 20
_OMNIGEN_PH = re.compile(r"<img><\|image_(\d+)\|></img>")
ECHO_LOGICAL_ROOT = "/Echo-4o-Image/"


class Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Sample:
    """A format-neutral sample: user parts ("text", str) / ("image", path), then the target path."""

    key: str  # stable within the source (sample id, or file:row)
    user: list[tuple[str, str]]
    target: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        n = sum(kind == "image" for kind, _ in self.user)
        return "t2i" if n == 0 else ("edit" if n == 1 else "multi_ref")


# ----------------------------------------------------------------------------- row readers
def _rows_json_list(path: Path) -> Iterator[tuple[str, Any]]:
    """The samples of a JSON list file, one at a time: memory holds one sample (capped like a record line), not
    the file (json.loads of a 50 MB list peaked at 2.8 GB). A list that breaks off stops the file there, named."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise RecordError(f"{str(path)!r} cannot be read ({e.strerror})") from None
    with f:
        yield from ((f"{path.name}[{i}]", row) for i, row in enumerate(_json_list_items(f, repr(str(path)))))


def _json_list_items(f, where: str, chunk: int = 1 << 20) -> Iterator[Any]:
    """Items of a JSON list read from binary ``f``: each decoded by ``json`` alone (ijson, the streaming library,
    took 2.2 GB on a 60 KB nesting bomb: docs/decisions.md), at most ``MAX_RECORD_LINE_BYTES`` characters each."""
    utf8, decoder = codecs.getincrementaldecoder("utf-8")(), json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:  # read on (positions stay valid when nothing was read); False at the end of the file
        nonlocal buf, pos, eof
        if eof:
            return False
        raw = f.read(max(chunk, len(buf) - pos))  # doubles while one item outgrows the buffer
        eof = not raw
        try:
            text = utf8.decode(raw, final=eof)
        except UnicodeDecodeError as e:
            raise RecordError(f"{where}: not valid UTF-8 ({e.reason})") from None
        if text:
            buf, pos = buf[pos:] + text, 0
        return not eof

    def next_char() -> str:  # the next non-space character ('' at the end), not consumed
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos:pos + 1]

    if next_char() != "[":
        raise RecordError(f"{where}: expected a JSON list of samples")
    pos += 1
    if next_char() == "]":
        return
    i = 0
    while True:
        next_char()
        while True:
            try:
                item, end = decoder.raw_decode(buf, pos)
                error = None
            except json.JSONDecodeError as e:  # cut by the buffer's end, or broken
                if e.pos < len(buf) - 16 and not e.msg.startswith("Unterminated string"):  # broken (a cut literal,
                    raise RecordError(f"{where}[{i}]: not valid JSON ({e.msg})") from None  # escape, is short)
                end, error = len(buf), e
            except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting past the stack
                raise RecordError(f"{where}[{i}]: unreadable JSON ({json_problem(e)})") from None
            if end - pos > MAX_RECORD_LINE_BYTES:  # (at most twice the cap is read to find out)
                raise RecordError(f"{where}[{i}]: a sample over the cap of {MAX_RECORD_LINE_BYTES:,} characters")
            if error is None and (not isinstance(item, (int, float)) or buf[end:].strip("0123456789+-.eE")):
                break  # (a number that reaches the buffer's end may go on in the next read)
            if not more():
                if error is not None:
                    raise RecordError(f"{where}[{i}]: not valid JSON ({error.msg})") from None
                break
        yield item
        pos, i = end, i + 1
        sep = next_char()
        pos += 1
        if sep == "]":
            if next_char():
                raise RecordError(f"{where}: text after the list's end")
            return
        if sep != ",":
            raise RecordError(f"{where}[{i - 1}]: expected ',' or ']' after it, got {sep or 'the end of the file'!r}")


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        f = open(path, "rb")  # decoded line by line: one line that is not UTF-8 is one bad row
    except OSError as e:
        raise RecordError(f"{str(path)!r} cannot be read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(capped_lines(f, MAX_RECORD_LINE_BYTES), 1):
            if raw is None:  # never held whole: one bad row
                yield f"{path.name}:{n}", Skip("bad_json", f"a line over the cap of {MAX_RECORD_LINE_BYTES:,} bytes")
                continue
            if not raw.strip():
                continue
            try:
                yield f"{path.name}:{n}", json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield f"{path.name}:{n}", Skip("bad_json", f"not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
            except json.JSONDecodeError as e:
                yield f"{path.name}:{n}", Skip("bad_json", e.msg)
            except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting past the stack
                yield f"{path.name}:{n}", Skip("bad_json", json_problem(e))


def _rows_auto(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON list file (``.json``) or JSON lines (anything else)."""
    return _rows_json_list(path) if path.suffix == ".json" else _rows_jsonl(path)


# ----------------------------------------------------------------------------- field helpers
def _str(row: dict, key: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise Skip("missing_field", key)
        return None
    v = row[key]
    if not isinstance(v, str):
        raise Skip("bad_field", f"{key} must be a non-empty string, got {type(v).__name__}")
    if not v.strip():
        raise Skip("bad_field", f"{key} is empty")
    return v


def _str_list(row: dict, key: str) -> list[str]:
    v = row.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise Skip("bad_field", f"{key} must be a list of paths")
    return v


def _meta(row: dict, keys: tuple[str, ...]) -> dict:
    return {k: row[k] for k in keys if k in row and isinstance(row[k], (str, int, float, bool, list))}


# ----------------------------------------------------------------------------- the five formats
def sharegpt4o_sample(row: dict, where: str) -> Sample:
    prompt = _str(row, "input_prompt")
    target = _str(row, "output_image")
    inputs = _str_list(row, "input_image")
    return Sample(where, [("image", p) for p in inputs] + [("text", prompt)], target,
                  _meta(row, ("input_image_resolution", "output_image_resolution")))


def nhr_edit_sample(row: dict, where: str) -> Sample:
    src = _str(row, "source_file_name")
    dst = _str(row, "edited_file_name")
    instr = _str(row, "edit_instruction")
    sid = row.get("sample_id")
    key = str(sid) if isinstance(sid, (str, int)) and str(sid) else where
    return Sample(key, [("image", src), ("text", instr)], dst,
                  _meta(row, ("sample_id", "augmented_instructions", "category", "kind", "style",
                              "img_width", "img_height")))


def omnigen_sample(row: dict, where: str) -> Sample:
    instr = _str(row, "instruction")
    target = _str(row, "output_image")
    inputs = _str_list(row, "input_images")
    return Sample(where, _interleave_placeholders(instr, inputs, _OMNIGEN_PH, one_based=True), target,
                  _meta(row, ("task_type",)))


def _interleave_placeholders(text: str, images: list[str], pattern: re.Pattern, one_based: bool) -> list:
    parts: list[tuple[str, str]] = []
    used: set[int] = set()
    pos = 0
    for m in pattern.finditer(text):
        k = int(m.group(1)) - (1 if one_based else 0)
        if not 0 <= k < len(images):
            raise Skip("bad_placeholder", f"{m.group(0)} but {len(images)} input image(s)")
        if text[pos : m.start()].strip():
            parts.append(("text", text[pos : m.start()].strip()))
        parts.append(("image", images[k]))
        used.add(k)
        pos = m.end()
    if text[pos:].strip():
        parts.append(("text", text[pos:].strip()))
    unreferenced = [("image", p) for k, p in enumerate(images) if k not in used]
    if not any(kind == "text" for kind, _ in parts):
        raise Skip("bad_field", "instruction has no text besides image placeholders")
    return unreferenced + parts


def uniworld_sample(row: dict, where: str) -> Sample:
    images = _str_list(row, "image")
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise Skip("missing_field", "conversations")
    user: list[tuple[str, str]] = []
    gen_text, gen_turns, k = "", 0, 0
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Skip("bad_field", f"conversations[{j}] must have a string 'value'")
        who, value = turn.get("from"), turn["value"]
        if who == "human":
            for piece_k, piece in enumerate(value.split("<image>")):
                if piece_k > 0:
                    if k >= len(images):
                        raise Skip("image_count_mismatch", f"more <image> tags than images ({len(images)})")
                    user.append(("image", images[k]))
                    k += 1
                if piece.strip():
                    user.append(("text", piece.strip()))
        elif who == "gpt":
            if "<gen_image>" in value:
                gen_turns += 1
                gen_text = value.replace("<gen_image>", "").strip()
        else:
            raise Skip("bad_field", f"conversations[{j}].from is {who!r} (expected human or gpt)")
    if gen_turns == 0:
        raise Skip("not_generation", "no <gen_image> turn (an understanding sample)")
    if gen_turns > 1:
        raise Skip("bad_field", f"{gen_turns} <gen_image> turns; one target per sample is supported")
    if k != len(images) - 1:
        raise Skip("image_count_mismatch", f"{k} <image> tag(s) + 1 target but {len(images)} image(s)")
    if not any(kind == "text" for kind, _ in user):
        raise Skip("missing_field", "no instruction text in the human turns")
    meta = {"assistant_text": gen_text} if gen_text else {}
    return Sample(where, user, images[-1], meta)


def echo4o_sample(row: dict, where: str) -> Sample:
    instr = _str(row, "instruction")
    target = _echo_path(_str(row, "output_image"))
    inputs = [_echo_path(p) for p in _str_list(row, "input_images")]
    return Sample(where, [("image", p) for p in inputs] + [("text", instr)], target, _meta(row, ("task_type",)))


def _echo_path(p: str) -> str:
    return p[len(ECHO_LOGICAL_ROOT):] if p.startswith(ECHO_LOGICAL_ROOT) else p


@dataclass
class Format:
    name: str
    source: str  # the record's ``source``
    rows: Callable[[Path], Iterator[tuple[str, Any]]]
    sample: Callable[[dict, str], Sample]
    default_file: str  # looked for when the given source is a folder


FORMATS = {
    "sharegpt4o": Format("sharegpt4o", "sharegpt4o-image", _rows_json_list, sharegpt4o_sample, "text_to_image.json"),
    "nhr-edit": Format("nhr-edit", "nhr-edit", _rows_jsonl, nhr_edit_sample, "metadata.jsonl"),
    "omnigen": Format("omnigen", "omnigen-x2i", _rows_auto, omnigen_sample, "data.jsonl"),
    "uniworld": Format("uniworld", "uniworld-v1", _rows_json_list, uniworld_sample, "data.json"),
    "echo4o": Format("echo4o", "echo-4o-image", _rows_auto, echo4o_sample, "data.jsonl"),
}


# ----------------------------------------------------------------------------- images and records
def _read_image(root: Path, rel: str) -> bytes:
    shown = repr(rel) if len(rel) <= 200 else repr(rel[:200]) + f"... ({len(rel):,} characters)"
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", rel) or rel.startswith(("/", "\\")) or re.match(r"^[a-zA-Z]:", rel):
        raise Skip("path_outside_root", f"{shown} is absolute or a URL")
    if "\0" in rel:  # (legal in JSON; the OS refuses it with a ValueError)
        raise Skip("bad_field", f"{shown} holds a NUL character")
    try:
        root_r = root.resolve()
        p = (root_r / rel).resolve()
        if not p.is_relative_to(root_r):
            raise Skip("path_outside_root", f"{shown} leaves the image root")
        if not p.is_file():
            raise Skip("missing_image", f"{shown} not found under {str(root)!r}")
        size = p.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise Skip("bad_image", f"{shown} is {size:,} bytes, over {MAX_IMAGE_BYTES:,}")
        data = p.read_bytes()
    except OSError as e:  # a name too long, a permission, a loop of links: this row's, not the run's
        raise Skip("missing_image", f"{shown} cannot be read ({e.strerror})") from None
    try:
        inspect_image(io.BytesIO(data), f"image {rel!r}", DEFAULT_MAX_PIXELS, decode=True)
    except ImageError as e:
        raise Skip("bad_image", str(e)) from None
    return data


def sample_to_record(fmt: Format, s: Sample, image_root: Path, file_name: str) -> Record:
    """The record of one sample; its id hashes the annotation file's name and the sample's key (``check_sources``)."""
    user = [TextPart(v) if kind == "text" else ImagePart(_read_image(image_root, v)) for kind, v in s.user]
    target = ImagePart(_read_image(image_root, s.target))
    rid = f"{fmt.name}-{hashlib.sha256(f'{file_name}|{s.key}'.encode()).hexdigest()[:16]}"
    meta = {"task": s.task, "source_key": s.key, "source_file": file_name, **s.meta}
    return Record(id=rid, source=fmt.source, messages=[Message("user", user), Message("assistant", [target])],
                  meta=meta)


SOURCES_FILE = "adapt-sources.json"  # in the output: {annotation file name: {"path": resolved path, "head": sha256}}
_HEAD_BYTES = 4096  # what tells two annotation files of one name apart (a copy or a move has the same start)


def _head_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()


def check_sources(out_dir: Path, files: list[Path]) -> None:
    """Refuse an annotation file whose name another file already used in this output: record ids hash the file's
    name and the row's key, so a second ``data.jsonl`` (``edit/`` and ``t2i/`` of one release) hashed the first's
    ids, and its rows were taken as done, silently (an audit). The same file reached another way (moved, copied,
    another mount: the registered path gone, or the same first 4 KB) is the same file."""
    path = out_dir / SOURCES_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    for f in files:
        resolved, head = str(f.resolve()), _head_digest(f)
        seen = known.get(f.name)
        if seen and seen["path"] != resolved and Path(seen["path"]).exists() and seen["head"] != head:
            raise RecordError(
                f"{str(out_dir)!r} already holds records of another annotation file named {f.name!r} "
                f"({seen['path']}): their ids would collide with {str(f)!r}'s; adapt it into another --out and "
                "combine the two with `duetgen data mix`")
        known[f.name] = {"path": resolved, "head": head}
    atomic_write_bytes(path, (json.dumps(known, indent=1) + "\n").encode())


def resolve_source(fmt: Format, source: str | Path) -> list[Path]:
    """The annotation files to read: the given file, or the format's file(s) inside a folder."""
    p = Path(source)
    if p.is_file():
        return [p]
    if p.is_dir():
        if fmt.name == "sharegpt4o":
            files = [p / n for n in ("text_to_image.json", "text_and_image_to_image.json") if (p / n).is_file()]
        else:
            files = [p / fmt.default_file] if (p / fmt.default_file).is_file() else []
        if not files:
            raise RecordError(f"{str(p)!r} holds no {fmt.name} annotation file (expected {fmt.default_file!r}); "
                              "pass the annotation file itself")
        return files
    raise RecordError(f"{fmt.name} source {str(p)!r} does not exist")


def adapt(fmt_name: str, source: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
          limit: int | None = None, shard_size: int = 1000, report: RunReport | None = None,
          progress: bool = True) -> RunReport:
    """Convert one public dataset's annotations (+ images) into records in ``out_dir``."""
    if fmt_name not in FORMATS:
        raise ValueError(f"unknown format {fmt_name!r}; known: {sorted(FORMATS)}")
    fmt = FORMATS[fmt_name]
    files = resolve_source(fmt, source)
    out_dir = Path(out_dir)
    report = report or RunReport(f"adapt-{fmt_name}")
    report.config.update({"format": fmt_name, "source": str(source), "image_root": str(image_root) if image_root else None})
    committed = {r.id for r in committed_records(out_dir)}
    written = 0
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(f"adapt {fmt_name}", total=None)
    try:
        with DatasetWriter(out_dir, shard_size=shard_size, append=True, name=out_dir.name) as writer:
            check_sources(out_dir, files)  # (under the writer's lock)
            for path in files:
                root = Path(image_root) if image_root is not None else path.parent
                for where, row in fmt.rows(path):
                    if limit is not None and written >= limit:
                        break
                    if bar is not None:
                        bar.advance(task)
                    report.count("rows")
                    try:
                        if isinstance(row, Skip):
                            raise row
                        if not isinstance(row, dict):
                            raise Skip("bad_field", f"a sample must be a JSON object, got {type(row).__name__}")
                        s = fmt.sample(row, where)
                        rec = sample_to_record(fmt, s, root, path.name)
                        if rec.id in committed:
                            report.count("already_done")
                            continue
                        writer.write(rec)
                    except Skip as e:
                        report.skip(where, e.reason, e.detail)
                        continue
                    except RecordError as e:
                        report.skip(where, "invalid_record", str(e))
                        continue
                    written += 1
                    report.count(f"written_{s.task}")
        report.extra["dataset_records"] = writer.num_records
    finally:
        if bar is not None:
            bar.stop()
        report.save(out_dir)
    return report
