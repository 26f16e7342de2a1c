"""SQLite caches: the LLM client's response cache, and the store it shares with the judge's score cache.

Design choices:
- ``SqliteStore`` is the mechanism: one table in one SQLite file, WAL journal + busy timeout, so
  several processes (local workers, Ray actors) can share one file and readers never block the
  writer. Inside one process a lock serialises the one connection, which is opened with
  ``check_same_thread=False`` because asyncio code may reach it from the sync wrappers' threads.
  Subclasses give the table (``ResponseCache`` here, ``duetgen.eval.judge.ScoreCache``).
- ``ResponseCache``: keyed by a sha256 the client computes over model, template version, the
  canonical rendered messages (image bytes replaced by their sha256) and every sampling setting.
  It knows nothing about prompts; it stores the reply text, its token usage, and whether the
  reply was a refusal (``message.refusal`` instead of content).
- Only answers are stored (the client decides); API errors are never cached, so a rerun retries them.
- A file written before the ``refusal`` column existed gains it on open (default 0: an answer).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple


class SqliteStore:
    """One table in one SQLite file, safe to share between threads and processes (WAL)."""

    table: str  # the table's name (set by subclasses)
    columns: str  # its column definitions, "key TEXT PRIMARY KEY" first (set by subclasses)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {self.table} ({self.columns})")

    def _fetch_one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()

    def _execute(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._conn.execute(sql, args)

    def __len__(self) -> int:
        return self._fetch_one(f"SELECT COUNT(*) FROM {self.table}")[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # The connection cannot cross a process boundary; a worker reopens the file by path.
    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])


class CachedReply(NamedTuple):
    text: str  # the reply text, or the refusal message when ``refusal``
    usage: dict  # prompt_tokens, completion_tokens
    refusal: bool  # the API refused (message.refusal) instead of answering


class ResponseCache(SqliteStore):
    """A key -> (reply text, usage, refusal) store in one SQLite file."""

    table = "responses"
    columns = ("key TEXT PRIMARY KEY, model TEXT NOT NULL, template_version TEXT NOT NULL,"
               " text TEXT NOT NULL, usage TEXT NOT NULL, created REAL NOT NULL,"
               " refusal INTEGER NOT NULL DEFAULT 0")

    def __init__(self, path: str | Path):
        super().__init__(path)
        with self._lock:
            names = {row[1] for row in self._conn.execute(f"PRAGMA table_info({self.table})")}
            if "refusal" not in names:  # a cache file from before refusals were told apart
                try:
                    self._conn.execute(f"ALTER TABLE {self.table} ADD COLUMN refusal INTEGER NOT NULL DEFAULT 0")
                except sqlite3.OperationalError as e:  # another process added it first
                    if "duplicate column" not in str(e):
                        raise

    def get(self, key: str) -> CachedReply | None:
        row = self._fetch_one(f"SELECT text, usage, refusal FROM {self.table} WHERE key = ?", (key,))
        if row is None:
            return None
        return CachedReply(row[0], json.loads(row[1]), bool(row[2]))

    def put(self, key: str, *, model: str, template_version: str, text: str, usage: dict,
            refusal: bool = False) -> None:
        self._execute(
            f"INSERT OR REPLACE INTO {self.table} (key, model, template_version, text, usage, created, refusal)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, model, template_version, text, json.dumps(usage), time.time(), int(refusal)),
        )
