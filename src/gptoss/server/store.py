"""Stored responses for the Responses API: `previous_response_id` chains, GET and DELETE.

One SQLite file, so conversations survive a restart. Each row keeps the response and the full
list of input items the model saw (the chain before it included), so continuing a conversation is
one lookup however long the chain, and deleting an earlier response breaks nothing after it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL
)
"""


class ResponseStore:
    """Responses by id in a SQLite file (":memory:" for a store that dies with the process)."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the event loop and worker threads, serialised by a lock:
        # every query is a primary-key lookup, far shorter than a decode step.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                (response["id"], time.time(), json.dumps(response), json.dumps(input_items)),
            )

    def get(self, response_id: str) -> dict[str, Any] | None:
        row = self._row(response_id)
        return None if row is None else json.loads(row[0])

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        row = self._row(response_id)
        return None if row is None else json.loads(row[1])

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every item of the conversation up to and including this response's output."""
        row = self._row(response_id)
        return None if row is None else json.loads(row[1]) + json.loads(row[0])["output"]

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, response_id: str) -> tuple[str, str] | None:
        with self._lock:
            return self._db.execute(
                "SELECT response, input_items FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
