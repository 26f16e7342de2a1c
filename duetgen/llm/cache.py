"""SQLite response cache for the LLM client: a rerun costs nothing.

Design choices:
- One table, keyed by a sha256 the client computes over model, template version, the canonical
  rendered messages (image bytes replaced by their sha256) and every sampling setting. The cache
  itself knows nothing about prompts; it stores the reply text and its token usage.
- WAL journal + busy timeout, so several processes (local workers, Ray actors) can share one file
  and readers never block the writer. Inside one process a lock serialises the one connection,
  which is opened with ``check_same_thread=False`` because asyncio code may reach it from the
  sync wrappers' threads.
- Only successful HTTP replies are stored (the client decides); API errors are never cached, so a
  rerun retries them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path


class ResponseCache:
    """A key -> (reply text, usage) store in one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, model TEXT NOT NULL, template_version TEXT NOT NULL,"
            " text TEXT NOT NULL, usage TEXT NOT NULL, created REAL NOT NULL)"
        )

    def get(self, key: str) -> tuple[str, dict] | None:
        with self._lock:
            row = self._conn.execute("SELECT text, usage FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return row[0], json.loads(row[1])

    def put(self, key: str, *, model: str, template_version: str, text: str, usage: dict) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (key, model, template_version, text, usage, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, template_version, text, json.dumps(usage), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # The connection cannot cross a process boundary; a worker reopens the file by path.
    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])
