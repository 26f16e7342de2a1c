"""Parquet export/import of a dataset, for the HF `datasets` ecosystem (DESIGN section 3).

One row per record::

    id: string, source: string,
    messages: string   JSON list of messages; an image part is {"type": "image", "index": k}
    images: list<struct<bytes: binary, path: string>>   image k of the record, bytes embedded
    meta: string       JSON object

Design choices:
- ``images`` carries the HF ``datasets`` Image feature in the ``huggingface`` schema metadata
  (as ``datasets`` itself writes it), so ``datasets.Dataset.from_parquet(path)`` decodes it as a
  list of PIL images. The list is declared as ``Sequence`` (not ``List``): datasets 5.x still
  reads ``Sequence`` and datasets 3.x knows nothing else.
- ``images`` has one entry per image part, in conversation order, so consumers that pair the
  k-th ``{"type": "image"}`` part with the k-th image (the usual HF chat convention) are right
  too. ``path`` keeps the original dataset-relative path, for information only.
- Both directions stream: export flushes a row group every ``rows_per_group`` records or
  ``bytes_per_group`` image bytes; import reads one record batch at a time and refuses files
  whose row groups exceed a byte cap (checked in the footer, before reading any data).
- A parquet file is untrusted input: import never opens a path named in it, re-validates every
  record through ``DatasetWriter`` (image bytes decoded under the pixel cap, format checked) and
  names the file and row in every error. Image bytes are stored unchanged, so
  export -> import reproduces the same records and content-addressed paths (an image a record
  kept under a path of its own comes back content-addressed) and the dataset's name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import track

from duetgen.data.dataset import Dataset, DatasetError, DatasetWriter, building_new_dataset
from duetgen.data.images import DEFAULT_MAX_PIXELS
from duetgen.data.record import Record, RecordError, TextPart

IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("messages", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.field("element", IMAGE_STRUCT))),  # "element": the name datasets writes
        pa.field("meta", pa.string()),
    ],
    metadata={
        "huggingface": json.dumps(
            {"info": {"features": {
                "id": {"dtype": "string", "_type": "Value"},
                "source": {"dtype": "string", "_type": "Value"},
                "messages": {"dtype": "string", "_type": "Value"},
                "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
                "meta": {"dtype": "string", "_type": "Value"},
            }}}
        )
    },
)
DUETGEN_METADATA = b"duetgen"  # the file's schema metadata: {"name": the dataset's name}, restored by import
DEFAULT_MAX_ROW_GROUP_BYTES = 2 << 30  # import refuses a row group that would take > 2 GiB to hold


def _record_to_row(rec: Record, ds: Dataset) -> dict[str, Any]:
    messages, images = [], []
    for m in rec.messages:
        content = []
        for p in m.content:
            if isinstance(p, TextPart):
                content.append({"type": "text", "text": p.text})
            else:
                content.append({"type": "image", "index": len(images)})
                # Decoded in full: a truncated file exported "fine" and was then refused by import.
                images.append({"bytes": ds.read_image_bytes(p.path, record_id=rec.id, decode=True), "path": p.path})
        messages.append({"role": m.role, "content": content})
    return {"id": rec.id, "source": rec.source, "images": images,
            "messages": json.dumps(messages, ensure_ascii=False, separators=(",", ":")),
            "meta": json.dumps(rec.meta, ensure_ascii=False, separators=(",", ":"))}


def export_parquet(dataset_root: str | os.PathLike, out_path: str | os.PathLike, rows_per_group: int = 1000,
                   bytes_per_group: int = 256 << 20, progress: bool = True) -> int:
    """Write every record of the dataset, images embedded, to one parquet file. Returns the row count.

    The file appears atomically (written as ``.<name>.tmp`` next to it, then renamed).
    """
    ds = Dataset(dataset_root)
    out_path = Path(out_path)
    if Path(os.path.abspath(out_path)).resolve().is_relative_to(ds.root.resolve()):
        raise DatasetError(f"{str(out_path)!r} lies inside the dataset being exported ({str(ds.root)!r}): writing "
                           "there could replace its manifest or a shard; write the Parquet file elsewhere")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    rows: list[dict[str, Any]] = []
    buffered_bytes = n = 0
    try:
        schema = SCHEMA.with_metadata({**SCHEMA.metadata, DUETGEN_METADATA: json.dumps({"name": ds.name})})
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            def flush():
                nonlocal rows, buffered_bytes
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=len(rows))
                rows, buffered_bytes = [], 0

            for rec in track(ds, total=len(ds), description="export parquet",
                             disable=not progress, console=Console(stderr=True)):
                row = _record_to_row(rec, ds)
                rows.append(row)
                buffered_bytes += sum(len(im["bytes"]) for im in row["images"])
                n += 1
                if len(rows) >= rows_per_group or buffered_bytes >= bytes_per_group:
                    flush()
            flush()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _row_to_record(row: dict[str, Any], where: str) -> Record:
    """Rebuild a Record whose image parts hold the embedded bytes (the writer verifies them)."""
    rid = row.get("id")
    if not isinstance(rid, str) or not rid:
        raise RecordError(f"{where}: 'id' must be a non-empty string, got {rid!r}")
    where = f"{where} (record {rid!r})"
    try:
        messages = json.loads(row["messages"])
        meta = json.loads(row["meta"]) if row.get("meta") is not None else {}
    except (TypeError, RecursionError, ValueError) as e:  # (JSON, a 4,300-digit integer)
        raise RecordError(f"{where}: 'messages'/'meta' is not valid JSON ({e})") from None
    images = row.get("images") or []
    if not isinstance(messages, list):
        raise RecordError(f"{where}: 'messages' must be a JSON list")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        for j, p in enumerate(content if isinstance(content, list) else []):  # other shapes: from_json explains
            if isinstance(p, dict) and p.get("type") == "image":
                k = p.get("index")
                if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(images):
                    raise RecordError(f"{where}: messages[{i}].content[{j}].index {k!r} is not an index into its "
                                      f"{len(images)} image(s)")
                data = images[k].get("bytes") if isinstance(images[k], dict) else None
                if not isinstance(data, bytes):
                    raise RecordError(f"{where}: image {k} has no embedded bytes "
                                      "(paths in a parquet file are never opened)")
                # Record.from_json takes the bytes as an in-memory image part; "index" is not a record field.
                m["content"][j] = {"type": "image", "image": data}
    source = "unknown" if row.get("source") is None else row["source"]  # (a file not written by export)
    return Record.from_json({"id": rid, "source": source, "messages": messages, "meta": meta})


def _rows(pf, path: Path, batch_size: int):
    """The file's rows as dicts; data that does not decode (a corrupt page, a string column that is not UTF-8) is a
    DatasetError naming the file and the first row of the batch, not pyarrow's or Python's traceback."""
    start = 0
    batches = pf.iter_batches(batch_size=batch_size, columns=SCHEMA.names)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            rows = batch.to_pylist()
        except (pa.ArrowException, UnicodeDecodeError, OSError) as e:
            raise DatasetError(f"{path}: the rows from {start} on do not decode ({type(e).__name__}: {e})") from None
        yield from rows
        start += len(rows)


def import_parquet(path: str | os.PathLike, out_root: str | os.PathLike, shard_size: int = 1000,
                   max_pixels: int = DEFAULT_MAX_PIXELS, max_row_group_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES,
                   batch_size: int = 64, name: str | None = None, progress: bool = True) -> int:
    """Read a parquet file written by ``export_parquet`` (or shaped like it) into a new dataset.

    All or nothing: the dataset is built in a hidden sibling folder and renamed to ``out_root``
    only when every row passed validation. ``out_root`` must not exist or be an empty folder.
    Returns the number of records written.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the reader forever
        raise DatasetError(f"{path}: not a regular file")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    for field in SCHEMA:
        if field.name not in schema.names:
            raise DatasetError(f"{path}: missing column {field.name!r} (expected {SCHEMA.names})")
        if not schema.field(field.name).type.equals(field.type):
            raise DatasetError(f"{path}: column {field.name!r} has type {schema.field(field.name).type}, "
                               f"expected {field.type}")
    md = pf.metadata
    for g in range(md.num_row_groups):  # footer only: no data read yet
        size = md.row_group(g).total_byte_size
        if size > max_row_group_bytes:
            raise DatasetError(f"{path}: row group {g} holds {size:,} bytes, over the cap of {max_row_group_bytes:,}")

    if name is None:  # the exported dataset's own name
        try:
            name = json.loads((schema.metadata or {}).get(DUETGEN_METADATA, b"{}")).get("name")
        except (ValueError, AttributeError):
            name = None
        name = name if isinstance(name, str) else None
    n = 0
    with building_new_dataset(out_root) as building, \
            DatasetWriter(building, shard_size=shard_size, name=name, max_pixels=max_pixels) as writer:
        for row in track(_rows(pf, path, batch_size), total=md.num_rows, description="import parquet",
                         disable=not progress, console=Console(stderr=True)):
            where = f"{path} row {n}"
            try:
                writer.write(_row_to_record(row, where))
            except RecordError as e:
                msg = str(e)
                raise type(e)(msg if msg.startswith(str(path)) else f"{where}: {msg}") from None
            n += 1
    return n

