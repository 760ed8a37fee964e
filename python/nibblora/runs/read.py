"""Reading run stores: what the TUI and scripts use. Nothing here blocks a running trainer.

A runs.sqlite that cannot be read (truncated, overwritten, not SQLite, another program's database, a config that
is not JSON) raises RunStoreError with the reason; `scan_runs` reports such stores beside the readable runs
instead of leaving them out, so a damaged run is shown as unreadable rather than silently missing.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from nibblora.errors import RunStoreError
from nibblora.runs.store import DB_NAME, HEARTBEAT_SECONDS, connect, db_path

# A run whose heartbeat is older than this (and whose pid we cannot check) is taken as dead.
STALE_AFTER_SECONDS = 12 * HEARTBEAT_SECONDS
# A store this young that is empty or has no tables yet is most likely being created by its trainer right now.
CREATING_GRACE_SECONDS = 5.0
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_HEADER_BYTES = 100
# The tables and runs columns this reader needs; a database without them is not a run store (or another version).
REQUIRED_TABLES = ("runs", "metrics", "events", "logs")
RUNS_COLUMNS = (
    "run_id",
    "name",
    "status",
    "pid",
    "host",
    "created_at",
    "updated_at",
    "heartbeat_at",
    "ended_at",
    "total_steps",
    "stop_requested",
    "config_json",
)
UNREADABLE = "unreadable"  # the status a damaged store's row shows


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


def effective_status(
    stored: str, pid: int | None, host: str | None, heartbeat_at: float | None, now: float | None = None
) -> str:
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
        self.path = path
        _check_file(path)
        try:
            self.conn = connect(path, timeout=5.0)
        except sqlite3.Error as err:
            raise _store_error(path, err) from None
        try:
            self.conn.execute("PRAGMA query_only=1")
            _check_schema(self.conn, path)
        except BaseException:
            self.conn.close()
            raise

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """All rows of one read; a damaged page or missing table becomes RunStoreError naming the file."""
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise _store_error(self.path, err) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _json(self, text: object, what: str) -> object:
        try:
            return json.loads(text)  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise RunStoreError(self.path, f"{what} is not valid JSON ({err})") from None

    def runs(self) -> list[RunInfo]:
        rows = self._query(
            "SELECT run_id, name, status, pid, host, created_at, updated_at, heartbeat_at, ended_at, total_steps, "
            "stop_requested, config_json FROM runs ORDER BY created_at"
        )
        return [
            RunInfo(
                self.run_dir,
                r[0],
                r[1],
                effective_status(r[2], r[3], r[4], r[7]),
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                r[9],
                bool(r[10]),
                self._json(r[11], f"run {r[0]!r}'s config_json"),
            )
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
        return [r[0] for r in self._query("SELECT DISTINCT name FROM metrics WHERE run_id=? ORDER BY name", (run_id,))]

    def metric(self, name: str, run_id: str | None = None, since_step: int = -1) -> list[tuple[int, float]]:
        """[(step, value)] of one metric, steps in order, only steps after `since_step` (for polling)."""
        run_id = run_id or self.run().run_id
        return [
            (s, v)
            for s, v in self._query(
                "SELECT step, value FROM metrics WHERE run_id=? AND name=? AND step>? ORDER BY step",
                (run_id, name, since_step),
            )
        ]

    def metrics(self, run_id: str | None = None, since_step: int = -1) -> dict[int, dict[str, float]]:
        """{step: {name: value}} for every step after `since_step`."""
        run_id = run_id or self.run().run_id
        out: dict[int, dict[str, float]] = {}
        for step, name, value in self._query(
            "SELECT step, name, value FROM metrics WHERE run_id=? AND step>? ORDER BY step, name", (run_id, since_step)
        ):
            out.setdefault(step, {})[name] = value
        return out

    def metric_rows(self, run_id: str | None = None, since_step: int = -1) -> list[tuple[int, str, float, float]]:
        """[(step, name, value, time)] after `since_step`, by step: the write time tells a resumed run's rewritten
        steps from the ones its earlier attempt left behind."""
        run_id = run_id or self.run().run_id
        return self._query(
            "SELECT step, name, value, time FROM metrics WHERE run_id=? AND step>? ORDER BY step, name",
            (run_id, since_step),
        )

    def latest(self, names: list[str] | tuple[str, ...], run_id: str | None = None) -> dict[str, tuple[int, float]]:
        """{name: (step, value)} of each metric's newest step, for a run list (one indexed lookup per name)."""
        run_id = run_id or self.run().run_id
        out = {}
        for name in names:
            rows = self._query(
                "SELECT step, value FROM metrics WHERE run_id=? AND name=? ORDER BY step DESC LIMIT 1", (run_id, name)
            )
            if rows:
                out[name] = (rows[0][0], rows[0][1])
        return out

    def steps_per_second(self, run_id: str | None = None, window: int = 20) -> float | None:
        """Recent training speed: steps per second over the last `window` logged steps (None with fewer than 2)."""
        run_id = run_id or self.run().run_id
        rows = self._query(
            "SELECT step, time FROM metrics WHERE run_id=? AND name='loss' ORDER BY step DESC LIMIT ?", (run_id, window)
        )
        if len(rows) < 2 or rows[0][1] <= rows[-1][1]:
            return None
        return (rows[0][0] - rows[-1][0]) / (rows[0][1] - rows[-1][1])

    def events(self, run_id: str | None = None, since_id: int = 0) -> list[dict]:
        run_id = run_id or self.run().run_id
        rows = self._query(
            "SELECT id, time, step, kind, message, data_json FROM events WHERE run_id=? AND id>? ORDER BY id",
            (run_id, since_id),
        )
        return [
            dict(
                id=i,
                time=t,
                step=s,
                kind=k,
                message=m,
                data=None if d is None else self._json(d, f"event {i}'s data_json"),
            )
            for i, t, s, k, m, d in rows
        ]

    def logs(self, run_id: str | None = None, since_id: int = 0) -> list[dict]:
        run_id = run_id or self.run().run_id
        rows = self._query(
            "SELECT id, time, level, message FROM logs WHERE run_id=? AND id>? ORDER BY id", (run_id, since_id)
        )
        return [dict(id=i, time=t, level=lv, message=m) for i, t, lv, m in rows]


def open_run(run_dir: str | Path) -> RunStore:
    """Open the run store of a training output directory for reading."""
    return RunStore(run_dir)


@dataclass
class UnreadableStore:
    """A runs.sqlite that could not be read, and why (`RunStoreError.reason`)."""

    run_dir: Path
    reason: str
    modified_at: float  # the file's mtime: when it was last written

    def run_info(self) -> RunInfo:
        """A RunInfo placeholder for run lists: status 'unreadable', named after its folder, no config."""
        return RunInfo(
            self.run_dir,
            "",
            self.run_dir.name,
            UNREADABLE,
            UNREADABLE,
            None,
            None,
            self.modified_at,
            self.modified_at,
            None,
            None,
            None,
            False,
            {},
        )


@dataclass
class RunScan:
    """What `scan_runs` found: the readable runs (latest activity last) and the stores it could not read."""

    runs: list[RunInfo]
    unreadable: list[UnreadableStore]


def read_store_runs(run_dir: Path) -> list[RunInfo]:
    """The runs of one store; RunStoreError (with `.transient`) when it cannot be read."""
    with RunStore(run_dir) as store:
        return store.runs()


def scan_runs(root: str | Path) -> RunScan:
    """Every run store under `root` (any depth): the runs of the readable ones, and each unreadable one with its
    reason. A store that is probably being created this instant (empty or without tables, written in the last
    few seconds) is left out of both."""
    runs: list[RunInfo] = []
    unreadable: list[UnreadableStore] = []
    for path in sorted(Path(root).rglob(DB_NAME)):
        try:
            runs.extend(read_store_runs(path.parent))
        except RunStoreError as err:
            if not err.transient:
                unreadable.append(UnreadableStore(path.parent, err.reason, _mtime(path)))
        except FileNotFoundError:
            continue  # removed between the walk and the read
    return RunScan(sorted(runs, key=lambda r: r.updated_at), unreadable)


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every readable run under `root` (any depth), latest activity last. Unreadable stores are not in this list;
    `scan_runs` reports them."""
    return scan_runs(root).runs


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _recently_written(path: Path) -> bool:
    return time.time() - _mtime(path) < CREATING_GRACE_SECONDS


def _check_file(path: Path) -> None:
    """Refuse what SQLite would misread: an empty file (SQLite takes it as a new, empty database) and a file
    that is not SQLite at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(SQLITE_HEADER_BYTES)
    except OSError as err:
        raise RunStoreError(path, f"cannot be opened ({err.strerror or err})") from None
    if not head:
        raise RunStoreError(
            path,
            "is empty (0 bytes): its trainer died while creating it, or the file was truncated",
            transient=_recently_written(path),
        )
    if not head.startswith(SQLITE_MAGIC):
        raise RunStoreError(path, f"is not a SQLite database (it starts with {head[:16]!r})")
    if len(head) < SQLITE_HEADER_BYTES:
        raise RunStoreError(path, f"is truncated ({len(head)} bytes, shorter than a SQLite header)")


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")} if "runs" in tables else set()
    except sqlite3.Error as err:
        raise _store_error(path, err) from None
    if not tables:
        wal = path.with_name(path.name + "-wal")
        hint = (
            f"; its write-ahead log {wal.name} ({wal.stat().st_size} bytes) holds no valid commits"
            if wal.is_file() and wal.stat().st_size
            else ""
        )
        raise RunStoreError(path, f"holds no tables: not a run store{hint}", transient=_recently_written(path))
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise RunStoreError(
            path,
            f"is a SQLite database but not a run store (no table {', '.join(missing)}; "
            f"it has {', '.join(sorted(tables))})",
        )
    missing_columns = [c for c in RUNS_COLUMNS if c not in columns]
    if missing_columns:
        raise RunStoreError(
            path,
            f"has a runs table without column {', '.join(missing_columns)}: another "
            "program's database, or an incompatible nibblora version",
        )


def _store_error(path: Path, err: sqlite3.Error) -> RunStoreError:
    """RunStoreError for an sqlite3 error: a lock is transient, anything else means the file is damaged."""
    message = str(err)
    if isinstance(err, sqlite3.OperationalError) and ("locked" in message or "busy" in message):
        return RunStoreError(path, f"is locked ({message}); try again", transient=True)
    if isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.OperationalError):
        return RunStoreError(path, f"is damaged ({message})")
    return RunStoreError(path, f"cannot be read ({message})")


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
