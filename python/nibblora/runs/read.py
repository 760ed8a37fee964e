"""Reading run stores: what the TUI and scripts use. Nothing here blocks a running trainer."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from nibblora.runs.store import DB_NAME, HEARTBEAT_SECONDS, connect, db_path

# A run whose heartbeat is older than this (and whose pid we cannot check) is taken as dead.
STALE_AFTER_SECONDS = 12 * HEARTBEAT_SECONDS


@dataclass
class RunInfo:
    """One run as the store has it. `status` is the effective one: a 'running' run whose process is gone reads
    'failed' (`stored_status` keeps what the database says)."""

    run_dir: Path
    run_id: str
    name: str
    status: str
    stored_status: str
    pid: int | None
    host: str | None
    created_at: float
    updated_at: float
    heartbeat_at: float | None
    ended_at: float | None
    total_steps: int | None
    stop_requested: bool
    config: dict


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed child that nobody has waited for yet is a zombie: it exists but is dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def effective_status(stored: str, pid: int | None, host: str | None, heartbeat_at: float | None,
                     now: float | None = None) -> str:
    """'failed' for a run marked running whose process died (same host: pid check; elsewhere: stale heartbeat)."""
    if stored != "running":
        return stored
    if pid is not None and host == socket.gethostname():
        return "running" if _process_alive(pid) else "failed"
    now = time.time() if now is None else now
    if heartbeat_at is not None and now - heartbeat_at > STALE_AFTER_SECONDS:
        return "failed"
    return "running"


class RunStore:
    """Read access to the run store in `run_dir` (its runs.sqlite). Every call is one short read transaction."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        path = db_path(self.run_dir)
        if not path.is_file():
            raise FileNotFoundError(f"reading runs: no {DB_NAME} in {self.run_dir}; is this a training output_dir?")
        self.conn = connect(path, timeout=5.0)
        self.conn.execute("PRAGMA query_only=1")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def runs(self) -> list[RunInfo]:
        rows = self.conn.execute(
            "SELECT run_id, name, status, pid, host, created_at, updated_at, heartbeat_at, ended_at, total_steps, "
            "stop_requested, config_json FROM runs ORDER BY created_at"
        ).fetchall()
        return [
            RunInfo(self.run_dir, r[0], r[1], effective_status(r[2], r[3], r[4], r[7]), r[2], r[3], r[4], r[5], r[6],
                    r[7], r[8], r[9], bool(r[10]), json.loads(r[11]))
            for r in rows
        ]

    def run(self, run_id: str | None = None) -> RunInfo:
        """One run (the latest when run_id is None)."""
        runs = self.runs()
        if run_id is not None:
            runs = [r for r in runs if r.run_id == run_id]
        if not runs:
            raise KeyError(f"no run {run_id or ''} in {db_path(self.run_dir)}".replace("  ", " "))
        return runs[-1]

    def metric_names(self, run_id: str | None = None) -> list[str]:
        run_id = run_id or self.run().run_id
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT name FROM metrics WHERE run_id=? ORDER BY name", (run_id,))]

    def metric(self, name: str, run_id: str | None = None, since_step: int = -1) -> list[tuple[int, float]]:
        """[(step, value)] of one metric, steps in order, only steps after `since_step` (for polling)."""
        run_id = run_id or self.run().run_id
        return [(s, v) for s, v in self.conn.execute(
            "SELECT step, value FROM metrics WHERE run_id=? AND name=? AND step>? ORDER BY step",
            (run_id, name, since_step))]

    def metrics(self, run_id: str | None = None, since_step: int = -1) -> dict[int, dict[str, float]]:
        """{step: {name: value}} for every step after `since_step`."""
        run_id = run_id or self.run().run_id
        out: dict[int, dict[str, float]] = {}
        for step, name, value in self.conn.execute(
            "SELECT step, name, value FROM metrics WHERE run_id=? AND step>? ORDER BY step, name", (run_id, since_step)
        ):
            out.setdefault(step, {})[name] = value
        return out

    def metric_rows(self, run_id: str | None = None, since_step: int = -1) -> list[tuple[int, str, float, float]]:
        """[(step, name, value, time)] after `since_step`, by step: the write time tells a resumed run's rewritten
        steps from the ones its earlier attempt left behind."""
        run_id = run_id or self.run().run_id
        return self.conn.execute(
            "SELECT step, name, value, time FROM metrics WHERE run_id=? AND step>? ORDER BY step, name",
            (run_id, since_step)).fetchall()

    def latest(self, names: list[str] | tuple[str, ...], run_id: str | None = None) -> dict[str, tuple[int, float]]:
        """{name: (step, value)} of each metric's newest step, for a run list (one indexed lookup per name)."""
        run_id = run_id or self.run().run_id
        out = {}
        for name in names:
            row = self.conn.execute(
                "SELECT step, value FROM metrics WHERE run_id=? AND name=? ORDER BY step DESC LIMIT 1", (run_id, name)
            ).fetchone()
            if row is not None:
                out[name] = (row[0], row[1])
        return out

    def steps_per_second(self, run_id: str | None = None, window: int = 20) -> float | None:
        """Recent training speed: steps per second over the last `window` logged steps (None with fewer than 2)."""
        run_id = run_id or self.run().run_id
        rows = self.conn.execute(
            "SELECT step, time FROM metrics WHERE run_id=? AND name='loss' ORDER BY step DESC LIMIT ?", (run_id, window)
        ).fetchall()
        if len(rows) < 2 or rows[0][1] <= rows[-1][1]:
            return None
        return (rows[0][0] - rows[-1][0]) / (rows[0][1] - rows[-1][1])

    def events(self, run_id: str | None = None, since_id: int = 0) -> list[dict]:
        run_id = run_id or self.run().run_id
        rows = self.conn.execute(
            "SELECT id, time, step, kind, message, data_json FROM events WHERE run_id=? AND id>? ORDER BY id",
            (run_id, since_id))
        return [dict(id=i, time=t, step=s, kind=k, message=m, data=None if d is None else json.loads(d))
                for i, t, s, k, m, d in rows]

    def logs(self, run_id: str | None = None, since_id: int = 0) -> list[dict]:
        run_id = run_id or self.run().run_id
        rows = self.conn.execute(
            "SELECT id, time, level, message FROM logs WHERE run_id=? AND id>? ORDER BY id", (run_id, since_id))
        return [dict(id=i, time=t, level=lv, message=m) for i, t, lv, m in rows]


def open_run(run_dir: str | Path) -> RunStore:
    """Open the run store of a training output directory for reading."""
    return RunStore(run_dir)


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every run under `root` (any depth), latest activity last."""
    found = []
    for path in sorted(Path(root).rglob(DB_NAME)):
        try:
            with RunStore(path.parent) as store:
                found.extend(store.runs())
        except sqlite3.DatabaseError:
            continue  # not a run store, or one being created this instant
    return sorted(found, key=lambda r: r.updated_at)


def request_stop(run_dir: str | Path, run_id: str | None = None) -> None:
    """Ask a running trainer to stop gracefully: it writes a checkpoint at the end of its current step, then
    exits with status 'stopped'. The one write a reader makes; it waits at most a few seconds for the lock."""
    path = db_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"requesting stop: no {DB_NAME} in {run_dir}")
    conn = connect(path, timeout=10.0)
    try:
        if run_id is None:
            conn.execute("UPDATE runs SET stop_requested=1 WHERE status='running'")
        else:
            conn.execute("UPDATE runs SET stop_requested=1 WHERE run_id=?", (run_id,))
    finally:
        conn.close()
