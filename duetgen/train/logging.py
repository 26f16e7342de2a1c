"""What a training run shows and leaves behind: a progress bar, TensorBoard scalars, a JSONL log, sample pages.

    with MetricsLogger(run_dir, total_steps=1000, start_step=resumed_step, unit="tok") as log:
        for step in range(start + 1, total + 1):
            ...
            log.log(step, loss=loss, lr=lr, items=tokens_this_step, grad_norm=norm)
    write_samples_html(run_dir / "samples" / "step-0000100.html", records, title="step 100")

Design choices:
- One call per step feeds three sinks: a rich progress bar (step/total, loss, lr, tokens/s or
  samples/s, ETA), TensorBoard scalars (``torch.utils.tensorboard.SummaryWriter``; the
  ``tensorboard`` package is a dependency, pinned 2.21.0), and ``metrics.jsonl``, one JSON object per
  step, which needs nothing to read (docs and benchmarks point at it).
- Resume-aware: a resumed run starts at ``start_step``; entries after it that a killed run wrote
  are dropped from ``metrics.jsonl`` (rewritten atomically) and TensorBoard is opened with
  ``purge_step`` so the curve has no doubled segment.
- Only the main rank logs (``enabled=False`` elsewhere makes every call a no-op), so a distributed
  run prints one bar and writes one log.
- Throughput is measured between consecutive ``log`` calls (wall time including data loading),
  the number a user planning a run needs; the first call after start only sets the clock.
- Sample pages reuse ``duetgen.data.view`` (the dataset viewer's look and escaping). Images made in
  memory during training are written as PNG files next to the page; dataset images are linked
  relative to the page with the dataset's own containment checks.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from duetgen.data.dataset import Dataset, atomic_write_bytes
from duetgen.data.images import encode_png, inspect_image
from duetgen.data.record import ImagePart, Message, Record, RecordError


def _scalar(name: str, value: Any) -> float:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a number or a one-element tensor, "
                        f"got {type(value).__name__}") from None


class MetricsLogger:
    """Progress bar + TensorBoard + ``metrics.jsonl`` under ``log_dir``; a context manager."""

    def __init__(self, log_dir: str | os.PathLike, total_steps: int, *, start_step: int = 0, unit: str = "tok",
                 enabled: bool = True, progress: bool = True, tensorboard: bool = True,
                 description: str = "train"):
        self.enabled = enabled
        if not enabled:
            return
        if total_steps < 1 or not 0 <= start_step <= total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= start_step <= total_steps, "
                             f"got {start_step}/{total_steps}")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.unit = unit
        self.jsonl_path = self.log_dir / "metrics.jsonl"
        self._trim_jsonl(start_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked

            self.writer = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=start_step + 1)
        self._last_time: float | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not progress)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total_steps, completed=start_step,
                                           loss="-", lr="-", rate="-")

    def _trim_jsonl(self, start_step: int) -> None:
        """Drop entries a killed run wrote after the checkpoint we resume from (atomic rewrite)."""
        if not self.jsonl_path.exists():
            return
        kept = []
        for n, line in enumerate(self.jsonl_path.read_text(encoding="utf-8").splitlines()):
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):  # a line cut by the kill: nothing after it can be trusted anyway
                break
            if not isinstance(entry, dict):
                break
            if entry.get("step", math.inf) <= start_step:
                kept.append(line)
        atomic_write_bytes(self.jsonl_path, "".join(k + "\n" for k in kept).encode("utf-8"))

    def log(self, step: int, *, loss: Any, lr: float, items: int | None = None, **scalars: Any) -> dict[str, float]:
        """Record one step. ``items``: tokens (or samples) processed since the previous call, for throughput."""
        if not self.enabled:
            return {}
        now = time.perf_counter()
        entry: dict[str, float] = {"step": step, "loss": _scalar("loss", loss), "lr": _scalar("lr", lr)}
        entry.update({k: _scalar(k, v) for k, v in scalars.items()})
        rate_name = f"{self.unit}_per_s"
        if items is not None and self._last_time is not None and now > self._last_time:
            entry[rate_name] = items / (now - self._last_time)
        self._last_time = now
        entry["time"] = time.time()
        self._jsonl.write(json.dumps(entry, allow_nan=True) + "\n")
        self._jsonl.flush()  # a SIGKILL loses nothing flushed: the page cache outlives the process
        if self.writer is not None:
            for k, v in entry.items():
                if k not in ("step", "time"):
                    self.writer.add_scalar(f"train/{k}", v, step)
        rate = f"{entry[rate_name]:,.0f} {self.unit}/s" if rate_name in entry else "-"
        self.progress.update(self.task, completed=step, loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}",
                             rate=rate)
        return entry

    def log_scalars(self, step: int, prefix: str, **scalars: Any) -> None:
        """Extra scalars (e.g. eval metrics) to TensorBoard and the JSONL log, without touching the bar."""
        if not self.enabled:
            return
        entry = {"step": step, **{f"{prefix}/{k}": _scalar(k, v) for k, v in scalars.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(entry, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            for k, v in entry.items():
                if k not in ("step", "time"):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        self._jsonl.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a ``metrics.jsonl`` (the loss curve, for tests, docs and benchmarks)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- sample pages -----------------------------------------------------------------------------------


def write_samples_html(out_path: str | os.PathLike, records: Sequence[Record], *, title: str, subtitle: str = "",
                       dataset: Dataset | None = None) -> Path:
    """A page showing ``records`` (e.g. generations at this step) as chats; returns its path.

    In-memory images (PIL images or encoded bytes) are written as PNGs into ``<page stem>_files/``;
    stored paths are resolved in ``dataset`` (linked relative to the page). Written atomically.
    """
    from PIL import Image

    from duetgen.data.view import dataset_image_src, page_html, render_record_html

    out_path = Path(out_path)
    files_dir = out_path.with_name(out_path.stem + "_files")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    shown: list[Record] = []
    for i, rec in enumerate(records):
        messages = []
        for j, m in enumerate(rec.messages):
            content = []
            for k, p in enumerate(m.content):
                if isinstance(p, ImagePart) and not isinstance(p.image, str):
                    im = p.image
                    if isinstance(im, (bytes, bytearray)):
                        im = inspect_image(io.BytesIO(im), f"record {rec.id!r}: messages[{j}].content[{k}]")
                    if not isinstance(im, Image.Image):
                        raise RecordError(f"record {rec.id!r}: messages[{j}].content[{k}] holds a "
                                          f"{type(p.image).__name__}, not an image")
                    files_dir.mkdir(exist_ok=True)
                    name = f"{i:04d}-{j:02d}-{k:02d}.png"
                    atomic_write_bytes(files_dir / name, encode_png(im))
                    rel = f"{files_dir.name}/{name}"
                    written.add(rel)
                    p = ImagePart(rel)
                content.append(p)
            messages.append(Message(role=m.role, content=content))
        shown.append(Record(id=rec.id, messages=messages, source=rec.source, meta=rec.meta))

    dataset_src = dataset_image_src(dataset, out_path.parent) if dataset is not None else None

    def image_src(path: str) -> str:
        if path in written:
            return quote(path)
        if dataset_src is None:
            raise RecordError(f"image {path!r} is a stored path but no dataset was given to resolve it")
        return dataset_src(path)

    body = "\n".join(render_record_html(r, image_src, index=n + 1) for n, r in enumerate(shown))
    atomic_write_bytes(out_path, page_html(title, body or "<p>No samples.</p>", subtitle=subtitle).encode("utf-8"))
    return out_path
