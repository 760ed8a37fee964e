"""The run store: one SQLite database (WAL mode) per run directory, written by the trainer, read by anyone.

Tables (see docs/training.md for the full schema):
    runs     one row per run: id, name, status, pid, host, heartbeat, config (JSON), stop_requested, times
    metrics  (run_id, step, name) -> value; stable flat names: loss, lr, grad_norm, tokens_per_s, ...
    nonfinite_metrics  (run_id, step, name) -> 'nan' | 'inf' | '-inf': values `metrics` cannot hold (SQLite
             stores NaN as NULL); a (step, name) is in exactly one of the two tables
    events   what happened when: started, checkpoint, eval, resumed, stopped, finished, failed
    logs     the run's log lines

WAL mode lets readers read while the writer writes: a reader never blocks the writer, and a reader that dies
holds nothing. The writer commits after each step so a reader sees every finished step.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

from nibblora.errors import RunStoreError

DB_NAME = "runs.sqlite"
STATUSES = ("running", "finished", "failed", "stopped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    host TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    heartbeat_at REAL,
    ended_at REAL,
    config_json TEXT NOT NULL,
    total_steps INTEGER,
    stop_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE IF NOT EXISTS nonfinite_metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    step INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data_json TEXT
);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (run_id, name, step);
"""

# The columns each table must have: a store from an older version gains new tables, never loses columns.
COLUMNS = {
    "runs": {
        "run_id",
        "name",
        "status",
        "pid",
        "host",
        "created_at",
        "updated_at",
        "heartbeat_at",
        "ended_at",
        "config_json",
        "total_steps",
        "stop_requested",
    },
    "metrics": {"run_id", "step", "name", "value", "time"},
    "nonfinite_metrics": {"run_id", "step", "name", "value", "time"},
    "events": {"id", "run_id", "time", "step", "kind", "message", "data_json"},
    "logs": {"id", "run_id", "time", "level", "message"},
}

HEARTBEAT_SECONDS = 5.0
_OPENING = "opening the run store"


def db_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / DB_NAME


def connect(path: Path, *, timeout: float = 30.0) -> sqlite3.Connection:
    """A connection in WAL mode. `timeout` is how long a write waits for another writer's lock."""
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across a process crash (kill -9) in WAL mode; only a power loss can drop the last commits.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class RunWriter:
    """The trainer's handle on its run: status, metrics, events, logs, and a heartbeat thread.

    Open with `RunWriter.open(run_dir, run_id, name, config)`; reopening an existing run (a resume) sets it back
    to running under the new pid. Only rank 0 of a distributed job writes.
    """

    def __init__(self, conn: sqlite3.Connection, run_id: str):
        self.conn = conn
        self.run_id = run_id
        self._lock = threading.Lock()
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @classmethod
    def open(
        cls, run_dir: str | Path, run_id: str, name: str, config: dict, total_steps: int | None = None
    ) -> RunWriter:
        """RunStoreError (one line naming the file and what to do) when runs.sqlite is damaged or not a store."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = db_path(run_dir)
        conn = None
        try:
            conn = connect(path)
            conn.executescript(SCHEMA)
            _check_store(conn, path)
            writer = cls._register(conn, run_id, name, config, total_steps)
        except sqlite3.DatabaseError as err:
            if conn is not None:
                conn.close()
            raise RunStoreError(
                path,
                f"damaged or not a run store ({err}); move it "
                "away (or delete it) to start a new one, or choose another output_dir",
                phase=_OPENING,
            ) from None
        except RunStoreError:
            conn.close()
            raise
        writer._start_heartbeat()
        return writer

    @classmethod
    def _register(
        cls, conn: sqlite3.Connection, run_id: str, name: str, config: dict, total_steps: int | None
    ) -> RunWriter:
        now = time.time()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            exists = conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if exists:
                conn.execute(
                    "UPDATE runs SET status='running', pid=?, host=?, updated_at=?, heartbeat_at=?, ended_at=NULL, "
                    "config_json=?, total_steps=?, stop_requested=0 WHERE run_id=?",
                    (os.getpid(), socket.gethostname(), now, now, json.dumps(config), total_steps, run_id),
                )
            else:
                conn.execute(
                    "INSERT INTO runs (run_id, name, status, pid, host, created_at, updated_at, heartbeat_at, "
                    "config_json, total_steps) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, name, os.getpid(), socket.gethostname(), now, now, now, json.dumps(config), total_steps),
                )
        return cls(conn, run_id)

    def _start_heartbeat(self) -> None:
        # A thread, not the loop, beats: one training step may take longer than a reader's patience.
        def beat() -> None:
            while not self._stop_heartbeat.wait(HEARTBEAT_SECONDS):
                self._execute("UPDATE runs SET heartbeat_at=? WHERE run_id=?", (time.time(), self.run_id))

        self._heartbeat = threading.Thread(target=beat, name="nibblora-run-heartbeat", daemon=True)
        self._heartbeat.start()

    def _execute(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self.conn.execute(sql, args)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics of one step (replacing that step's earlier values, as after a resume). Non-finite values
        (NaN, +-inf) go to nonfinite_metrics as text: `metrics.value` is a NOT NULL REAL and SQLite turns NaN
        into NULL."""
        now = time.time()
        values = {name: float(value) for name, value in metrics.items()}
        finite = [(self.run_id, step, name, v, now) for name, v in values.items() if math.isfinite(v)]
        nonfinite = [(self.run_id, step, name, repr(v), now) for name, v in values.items() if not math.isfinite(v)]
        with self._lock, self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "DELETE FROM metrics WHERE run_id=? AND step=? AND name=?", [row[:3] for row in nonfinite]
            )
            self.conn.executemany(
                "DELETE FROM nonfinite_metrics WHERE run_id=? AND step=? AND name=?", [row[:3] for row in finite]
            )
            self.conn.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, step, name, value, time) VALUES (?, ?, ?, ?, ?)", finite
            )
            self.conn.executemany(
                "INSERT OR REPLACE INTO nonfinite_metrics (run_id, step, name, value, time) VALUES (?, ?, ?, ?, ?)",
                nonfinite,
            )
            self.conn.execute("UPDATE runs SET updated_at=?, heartbeat_at=? WHERE run_id=?", (now, now, self.run_id))

    def event(self, kind: str, message: str, step: int | None = None, data: dict | None = None) -> None:
        self._execute(
            "INSERT INTO events (run_id, time, step, kind, message, data_json) VALUES (?, ?, ?, ?, ?, ?)",
            (self.run_id, time.time(), step, kind, message, None if data is None else json.dumps(data)),
        )

    def log(self, message: str, level: str = "info") -> None:
        self._execute(
            "INSERT INTO logs (run_id, time, level, message) VALUES (?, ?, ?, ?)",
            (self.run_id, time.time(), level, message),
        )

    def stop_requested(self) -> bool:
        """True once someone called `nibblora.runs.request_stop` on this run."""
        with self._lock:
            row = self.conn.execute("SELECT stop_requested FROM runs WHERE run_id=?", (self.run_id,)).fetchone()
        return bool(row and row[0])

    def finish(self, status: str, message: str = "", step: int | None = None) -> None:
        """End the run as finished, failed or stopped (with an event saying why) and close the database."""
        if status not in STATUSES or status == "running":
            raise ValueError(f"a run ends as finished, failed or stopped, not {status!r}")
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        now = time.time()
        self.event(status, message or status, step)
        self._execute(
            "UPDATE runs SET status=?, updated_at=?, ended_at=? WHERE run_id=?", (status, now, now, self.run_id)
        )
        self.conn.close()


def _check_store(conn: sqlite3.Connection, path: Path) -> None:
    """RunStoreError unless SQLite finds the file intact and every table has the columns this version writes."""
    rows = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    if rows != ["ok"]:
        problems = [line for row in rows for line in str(row).splitlines() if line and not line.startswith("***")]
        more = f" and {len(problems) - 1} more problems" if len(problems) > 1 else ""
        raise RunStoreError(
            path,
            f"damaged ({(problems or rows)[0]}{more}); move it "
            "away (or delete it) to start a new one, or choose another output_dir",
            phase=_OPENING,
        )
    for table, columns in COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not columns <= have:
            raise RunStoreError(
                path,
                f"has a table {table} without the columns "
                f"{', '.join(sorted(columns - have))}; it is not a nibblora run store: move it away "
                "or choose another output_dir",
                phase=_OPENING,
            )
