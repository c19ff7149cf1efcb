"""Stored responses for the Responses API: `previous_response_id` chains, GET and DELETE.

One SQLite file, so conversations survive a restart. Each row keeps the response and the full
list of input items the model saw (the chain before it included), so continuing a conversation is
one lookup however long the chain, and deleting an earlier response breaks nothing after it.

Rows belong to the API key that created them (stored as a digest, never the key): another key's
response reads as "not found", so ids cannot be probed. Rows expire after `ttl_seconds`, and the
oldest are dropped whenever the stored bytes pass `max_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 30 * 24 * 3600
DEFAULT_MAX_BYTES = 2**30

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL
)
"""
# Columns added after the first release; older files gain them on open (their rows belong to no
# key, so they stay visible only on a server without keys, and age out).
_ADDED_COLUMNS = {"owner": "TEXT NOT NULL DEFAULT ''", "size": "INTEGER NOT NULL DEFAULT 0"}


def owner_of(api_key: str | None) -> str:
    """The owner tag of rows created with `api_key` ("" without authentication)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""


class StoreError(ValueError):
    """The responses file cannot be used."""


class ResponseStore:
    """Responses by id in a SQLite file (":memory:" for a store that dies with the process)."""

    def __init__(
        self,
        path: str | Path,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if ttl_seconds <= 0 or max_bytes <= 0:
            raise ValueError("the responses store needs a positive TTL and size cap")
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the event loop and worker threads, serialised by a lock:
        # every query is a primary-key lookup, far shorter than a decode step.
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in columns:
                    self._db.execute(f"ALTER TABLE responses ADD COLUMN {name} {kind}")
            self._db.execute(
                "UPDATE responses SET size = length(response) + length(input_items) WHERE size = 0"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at)")
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"the stored-responses file {path} cannot be opened ({exc}); move it away or pass "
                "--responses-db with another path"
            ) from None

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]], owner: str = "") -> None:
        body, items = json.dumps(response), json.dumps(input_items)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, response, input_items, owner, size) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (response["id"], time.time(), body, items, owner, len(body) + len(items)),
            )
            self._evict()

    def get(self, response_id: str, owner: str = "") -> dict[str, Any] | None:
        row = self._row(response_id, owner)
        return None if row is None else json.loads(row[0])

    def input_items(self, response_id: str, owner: str = "") -> list[dict[str, Any]] | None:
        row = self._row(response_id, owner)
        return None if row is None else json.loads(row[1])

    def conversation(self, response_id: str, owner: str = "") -> list[dict[str, Any]] | None:
        """Every item of the conversation up to and including this response's output."""
        row = self._row(response_id, owner)
        return None if row is None else json.loads(row[1]) + json.loads(row[0])["output"]

    def delete(self, response_id: str, owner: str = "") -> bool:
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ? AND created_at > ?",
                (response_id, owner, time.time() - self.ttl_seconds),
            )
            return cursor.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, response_id: str, owner: str) -> tuple[str, str] | None:
        with self._lock:
            return self._db.execute(
                "SELECT response, input_items FROM responses WHERE id = ? AND owner = ? AND created_at > ?",
                (response_id, owner, time.time() - self.ttl_seconds),
            ).fetchone()

    def _evict(self) -> None:
        """Drop expired rows, then the oldest until the rest fit in `max_bytes` (under the lock)."""
        self._db.execute("DELETE FROM responses WHERE created_at <= ?", (time.time() - self.ttl_seconds,))
        total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0]
        if total <= self.max_bytes:
            return
        dropped = 0
        for row_id, size in self._db.execute("SELECT id, size FROM responses ORDER BY created_at").fetchall():
            if total <= self.max_bytes:
                break
            self._db.execute("DELETE FROM responses WHERE id = ?", (row_id,))
            total -= size
            dropped += 1
        log.info("stored responses over %d bytes: dropped the %d oldest", self.max_bytes, dropped)
