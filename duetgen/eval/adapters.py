"""Adapters: put any system's outputs on a benchmark as records (DESIGN section 3).

Two ways in:

1. ``import_outputs(src, out)``: another system's outputs, already generated, become a DuetGen
   dataset. ``src`` is a DuetGen dataset, a CoMM results folder (``<id>/results.json``), or a plain
   folder of ``*.jsonl`` record files whose image paths are relative to that folder (the simplest
   thing to write from any codebase). ``duetgen eval run --pred`` also reads the first two as
   they are; importing validates everything once and stores the images content-addressed.
2. ``run_model(model, prompts, out)``: run a model that implements ``Model`` on the benchmark
   prompts and write its answers (resumable: ids already in ``out`` are skipped).

The DuetGen model itself: its interleaved decode loop (``duetgen/infer/engine.py``, DESIGN
section 7) does not exist yet, so there is no DuetGen checkpoint adapter here. When it lands, the
adapter is a small ``Model`` whose ``generate`` loads the checkpoint once and calls that loop;
nothing in the harness changes. Until then, nothing here pretends to run DuetGen.

Design choices:
- A narrow model interface (lm-evaluation-harness style): the model gets the request messages
  with input images as PIL RGB images and returns the answer's parts (text, and images as PIL or
  encoded bytes). It never sees benchmark files or paths.
- Outputs carry the request (with its input images) plus the answer, so an output dataset is a
  self-contained record of what was asked and answered; ``meta`` keeps the prompt's meta
  (category, ...) and adds the model's name.
- Shards are committed every ``shard_size`` records, so a crash loses at most one open shard and a
  rerun continues after the last committed record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

from duetgen.data.record import (Dataset, DatasetWriter, ImagePart, Message, Part, Record, RecordError, TextPart)
from duetgen.eval.benchmarks.readers import (ImageFolder, ImageSource, ReaderError, is_comm_results_dir,
                                             read_comm_results, read_interleavedbench, read_records)

MAX_JSONL_BYTES = 1024 * 1024 * 1024  # one record file of a plain folder; records are streamed line by line


@runtime_checkable
class Model(Protocol):
    """What a model needs to implement to be run on a benchmark."""

    name: str  # shown in reports and stored in every output record's meta

    def generate(self, request: list[Message]) -> list[Part]:
        """The assistant's interleaved answer to ``request`` (input images are PIL RGB images);
        image parts of the answer hold PIL images or encoded PNG/JPEG/WebP bytes."""
        ...


# ----------------------------------------------------------------------------- importing outputs
def _iter_jsonl_folder(src: Path) -> Iterable[Record]:
    files = sorted(src.glob("*.jsonl"))
    if not files:
        raise ReaderError(f"{src}: no *.jsonl record files")
    for path in files:
        if path.stat().st_size > MAX_JSONL_BYTES:
            raise ReaderError(f"{path}: over the cap of {MAX_JSONL_BYTES:,} bytes")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield Record.from_json(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ReaderError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                except RecordError as e:
                    raise ReaderError(f"{path}:{lineno}: {e}") from None


def _with_loaded_images(rec: Record, images: ImageSource) -> Record:
    """A copy whose image parts hold the stored bytes (checked by the source), ready for a writer."""
    messages = []
    for m in rec.messages:
        parts = []
        for p in m.content:
            if isinstance(p, ImagePart):
                src = images.image_path(p.path, rec.id)  # containment + existence
                images.open_image(p.path, rec.id)  # format and pixel cap, before the bytes are trusted
                parts.append(ImagePart(src.read_bytes()))
            else:
                parts.append(TextPart(p.text))
        messages.append(Message(m.role, parts))
    return Record(id=rec.id, messages=messages, source=rec.source, meta=dict(rec.meta))


def import_outputs(src: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                   shard_size: int = 1000) -> int:
    """Validate another system's outputs and write them as a new DuetGen dataset; return the count."""
    src = Path(src)
    if (src / "manifest.json").is_file():
        records, images = read_records(src)
    elif is_comm_results_dir(src):
        records, images = read_comm_results(src)
    elif src.is_dir():
        records, images = _iter_jsonl_folder(src), ImageFolder(src)
    else:
        raise ReaderError(f"{src}: not a directory")
    n = 0
    seen: set[str] = set()
    with DatasetWriter(out, shard_size=shard_size, name=name or src.name) as w:
        for rec in records:
            if rec.id in seen:
                raise ReaderError(f"{src}: record id {rec.id!r} appears twice")
            seen.add(rec.id)
            if name is not None:
                rec.meta.setdefault("model", name)
            w.write(_with_loaded_images(rec, images))
            n += 1
    return n


# ----------------------------------------------------------------------------- running a model
def read_prompts(prompts: str | os.PathLike, images: str | os.PathLike | None = None) -> tuple[list[Record], ImageSource]:
    """Benchmark prompts from a dataset directory or an InterleavedBench JSON file."""
    p = Path(prompts)
    if p.is_file() and p.suffix == ".json":
        return read_interleavedbench(p, images)
    return read_records(p)


def run_model(model: Model, prompts: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
              limit: int | None = None, shard_size: int = 50, progress: bool = True) -> int:
    """Run ``model`` on every prompt not yet answered in ``out``; return how many were generated."""
    if not isinstance(model, Model):
        raise TypeError(f"{type(model).__name__} does not implement the Model protocol (name, generate)")
    records, source = read_prompts(prompts, images)
    if limit is not None:
        records = records[:limit]
    done = {r.id for r in Dataset(out)} if (Path(out) / "manifest.json").is_file() else set()
    todo = [r for r in records if r.id not in done]
    from duetgen.eval.harness import _progress_bar, split_record

    n = 0
    with DatasetWriter(out, shard_size=shard_size, append=True, name=model.name) as w, \
            _progress_bar(progress, len(todo), f"generating with {model.name}") as advance:
        for rec in todo:
            request, _ = split_record(rec)  # a prompt with a reference answer: only the request goes in
            shown = [Message(m.role, [ImagePart(source.open_image(p.path, rec.id)) if isinstance(p, ImagePart)
                                      else TextPart(p.text) for p in m.content]) for m in request]
            answer = model.generate(shown)
            if not isinstance(answer, list) or not all(isinstance(p, (TextPart, ImagePart)) for p in answer):
                raise TypeError(f"{model.name}.generate must return a list of TextPart / ImagePart (item {rec.id!r})")
            stored = _with_loaded_images(Record(rec.id, request, rec.source, rec.meta), source)
            out_rec = Record(id=rec.id, source=model.name, meta=dict(rec.meta, model=model.name),
                             messages=stored.messages + [Message("assistant", answer)])
            w.write(out_rec)
            n += 1
            advance()
    return n
