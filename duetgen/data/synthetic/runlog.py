"""Run bookkeeping shared by the synthetic and alignment builders: reports, progress logs, resume.

Design choices:
- Every run writes ``<out>/reports/<command>-<UTC time>.json``: counters, cost, and every skipped
  input with a reason code and a detail string (STYLE principle 1: every drop carries a reason).
  Written atomically, also when the run stops on an exception.
- Resume never trusts a marker alone. The dataset's committed records are the truth for work
  that produced a record (a record in an uncommitted shard is lost on a crash, so its marker
  would lie); the append-only progress log holds the rest: inputs finished *without* a record
  (dropped by a filter, refused by the API), so they are not paid for twice.
- The progress log is JSONL appended with flush + fsync per line; a torn last line (killed
  mid-write) is ignored, a torn line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from duetgen.data.dataset import MANIFEST, Dataset, DatasetError, atomic_write_bytes


class RunReport:
    """Counters + skipped items of one run; ``save`` writes the JSON report."""

    def __init__(self, command: str, config: dict[str, Any] | None = None):
        self.command = command
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.config = config or {}
        self.counts: Counter[str] = Counter()
        self.skip_reasons: Counter[str] = Counter()
        self.skipped: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        self.skip_reasons[reason] += 1
        self.skipped.append({"item": item, "reason": reason, "detail": detail})

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "started": self.started.isoformat(timespec="seconds"),
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "config": self.config, "counts": dict(self.counts), "skip_reasons": dict(self.skip_reasons),
                **self.extra, "skipped": self.skipped}

    def save(self, out_dir: str | Path) -> Path:
        d = Path(out_dir) / "reports"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.command}-{self.started.strftime('%Y%m%dT%H%M%S%fZ')}.json"
        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n").encode())
        return path


class ProgressLog:
    """Append-only JSONL of finished work items (``{"key": ..., ...}``), durable per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").split("\n")
        last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except (ValueError, RecursionError):  # (JSON; a 4,300-digit integer; nesting past the stack)
                if i == last:  # torn by a kill mid-append: that item simply was not finished
                    return
                raise DatasetError(f"{self.path}:{i + 1}: malformed progress line") from None
            if not isinstance(e, dict) or not isinstance(e.get("key"), str):
                raise DatasetError(f"{self.path}:{i + 1}: progress line needs a string 'key'")
            yield e

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        with open(self.path, "a+b") as f:  # (appends go to the end, wherever reads moved the position)
            end = f.seek(0, os.SEEK_END)
            if end > 0:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a previous run killed mid-line: that item was not finished, drop the
                    f.truncate(_last_line_end(f, end))  # torn line (left mid-file, it made the log unreadable)
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        """Empty the log (durably): what it held is done elsewhere."""
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(0)
                os.fsync(f.fileno())


def _last_line_end(f, end: int) -> int:
    """The offset just after the last newline before ``end`` (0 if none), reading backwards 64 KiB at a time."""
    pos = end
    while pos > 0:
        start = max(0, pos - (1 << 16))
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def committed_records(root: str | Path) -> Iterator[Any]:
    """Records already committed in the dataset at ``root`` (none if there is no dataset yet)."""
    if not (Path(root) / MANIFEST).exists():
        return iter(())
    return iter(Dataset(root))
