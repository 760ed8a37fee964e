"""The TUI's view of the run stores: a job list that rereads only stores that changed, and one run's series,
read incrementally (only the rows after the last poll).

Nothing here touches Textual: the app calls these from worker threads, and `--once` calls them directly.
Every read is a short read transaction on a query-only connection (see nibblora.runs.read), so a running trainer
is never blocked.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from nibblora.runs import DB_NAME, RunInfo, RunStoreError, UnreadableStore, effective_status, open_run

LIST_METRICS = ("loss", "tokens_per_s", "mem_peak_bytes")
RESCAN_SECONDS = 5.0  # how often the runs directory is walked for new run stores


@dataclass
class Job:
    """One row of the job list."""

    info: RunInfo
    step: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    mem_peak_bytes: float | None = None
    steps_per_s: float | None = None
    gpu_memory_bytes: int | None = None  # what NVML says this job's process holds, over all GPUs
    error: str | None = None  # why its run store cannot be read (status 'unreadable'); None for a readable run

    @property
    def key(self) -> str:
        return f"{self.info.run_dir}::{self.info.run_id}"

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def method(self) -> str:
        return str(self.info.config.get("train", {}).get("mode", "?"))

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def total_steps(self) -> int | None:
        return self.info.total_steps

    @property
    def eta_seconds(self) -> float | None:
        """Seconds to the last step at the recent speed; None unless running with a known speed."""
        if self.status != "running" or not self.steps_per_s or self.total_steps is None or self.step is None:
            return None
        return max(self.total_steps - self.step, 0) / self.steps_per_s


def attach_gpu_memory(jobs: list[Job], processes: dict[int, int]) -> None:
    """Set each running job's GPU memory from NVML's per-process numbers ({pid: bytes}, summed over GPUs).
    Only jobs on this host can be matched by pid."""
    host = socket.gethostname()
    for job in jobs:
        pid = job.info.pid
        ours = job.status == "running" and job.info.host == host and pid in processes
        job.gpu_memory_bytes = processes[pid] if ours else None


def _signature(db: Path) -> tuple:
    """Changes whenever the writer commits: the database and its WAL file's size and mtime."""
    sig = []
    for path in (db, db.with_name(db.name + "-wal")):
        try:
            st = os.stat(path)
            sig.append((st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append(None)
    return tuple(sig)


def read_jobs_of(run_dir: Path) -> list[Job]:
    """Every run in one run store, with its latest step, loss, speed. Opens and closes its own connection."""
    with open_run(run_dir) as store:
        jobs = []
        for info in store.runs():
            latest = store.latest(LIST_METRICS, info.run_id)
            step = max((s for s, _ in latest.values()), default=None)
            jobs.append(
                Job(
                    info,
                    step=step,
                    loss=latest.get("loss", (None, None))[1],
                    tokens_per_s=latest.get("tokens_per_s", (None, None))[1],
                    mem_peak_bytes=latest.get("mem_peak_bytes", (None, None))[1],
                    steps_per_s=store.steps_per_second(info.run_id) if info.status == "running" else None,
                )
            )
        return jobs


class JobIndex:
    """All jobs under a runs directory. `poll()` rereads only the stores whose files changed since the last
    poll (a finished run costs two stat calls), and walks the directory for new stores every few seconds.
    Connections are not held between polls, so hundreds of runs hold no file descriptors."""

    def __init__(self, root: str | Path, rescan_seconds: float = RESCAN_SECONDS):
        self.root = Path(root)
        self.rescan_seconds = rescan_seconds
        self._dbs: list[Path] = []
        self._last_scan = -1e18
        self._cache: dict[Path, tuple[tuple, list[Job]]] = {}
        self.errors: dict[Path, str] = {}

    def _scan(self) -> None:
        if self.root.is_dir():
            self._dbs = sorted(self.root.rglob(DB_NAME))
        else:
            self._dbs = []
        self._last_scan = time.monotonic()

    def poll(self, force_rescan: bool = False) -> list[Job]:
        if force_rescan or time.monotonic() - self._last_scan >= self.rescan_seconds:
            self._scan()
        jobs: list[Job] = []
        live = set()
        for db in self._dbs:
            live.add(db)
            sig = _signature(db)
            cached = self._cache.get(db)
            if cached is not None and cached[0] == sig:
                for job in cached[1]:
                    # Nothing was written; a running job may still have died since (pid / heartbeat check).
                    i = job.info
                    i.status = effective_status(i.stored_status, i.pid, i.host, i.heartbeat_at)
                jobs.extend(cached[1])
                continue
            try:
                found = read_jobs_of(db.parent)
            except FileNotFoundError:
                continue  # removed since the last walk
            except RunStoreError as err:
                self.errors[db] = str(err)
                if err.transient:
                    # Being created this instant, or locked for a moment: keep what we had and read it again.
                    if cached is not None:
                        jobs.extend(cached[1])
                    continue
                # Damaged: one row that says so (with the reason), never a run that silently disappears.
                store = UnreadableStore(db.parent, err.reason, sig[0][1] / 1e9 if sig[0] else time.time())
                found = [Job(store.run_info(), error=err.reason)]
            else:
                self.errors.pop(db, None)
            self._cache[db] = (sig, found)
            jobs.extend(found)
        for gone in set(self._cache) - live:
            del self._cache[gone]
        return jobs


@dataclass
class RunSeries:
    """Everything one run has recorded, kept up to date by `poll()`, which reads only new rows."""

    run_dir: Path
    run_id: str
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> {step: value}
    logs: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    info: RunInfo | None = None
    last_step: int = -1
    last_log_id: int = 0
    last_event_id: int = 0
    max_log_lines: int = 2000
    _cursor: int = -1  # metric rows after this step are read at the next poll
    _resumed_at: float | None = None  # write time of the latest resume

    def poll(self) -> tuple[int, list[dict]]:
        """Read what was written since the last poll; returns (new metric rows, new log lines).

        A store being created this instant (or locked for a moment) gives (0, []); a damaged one raises
        RunStoreError."""
        try:
            return self._poll()
        except RunStoreError as err:
            if err.transient:
                return 0, []
            raise

    def _poll(self) -> tuple[int, list[dict]]:
        with open_run(self.run_dir) as store:
            self.info = store.run(self.run_id)
            events = store.events(self.run_id, since_id=self.last_event_id)
            for event in events:
                if event["kind"] == "resumed" and event["step"] is not None:
                    # The resumed run rewrites every step after its checkpoint: read them again as they come.
                    self._resumed_at = event["time"]
                    self._cursor = min(self._cursor, event["step"])
            rows = store.metric_rows(self.run_id, since_step=self._cursor)
            logs = store.logs(self.run_id, since_id=self.last_log_id)
        for step, name, value, _ in rows:
            self.metrics.setdefault(name, {})[step] = value
        # Rows the earlier attempt left beyond the resumed run's progress are shown (the store still has them)
        # but do not advance the cursor, so their rewrites are read when they come.
        current = [step for step, _, _, t in rows if self._resumed_at is None or t >= self._resumed_at]
        if current:
            self._cursor = max(self._cursor, max(current))
        if rows:
            self.last_step = max(self.last_step, max(step for step, *_ in rows))
        if events:
            self.last_event_id = events[-1]["id"]
            self.events.extend(events)
        if logs:
            self.last_log_id = logs[-1]["id"]
            self.logs.extend(logs)
            del self.logs[: -self.max_log_lines]
        return len(rows), logs

    def series(self, name: str) -> list[tuple[int, float]]:
        return sorted(self.metrics.get(name, {}).items())

    def eval_sets(self) -> list[str]:
        names = [n for n in self.metrics if n.startswith("eval_") and n.endswith("_loss")]
        return sorted(n[len("eval_") : -len("_loss")] for n in names)

    def latest(self, name: str) -> float | None:
        values = self.metrics.get(name)
        return values[max(values)] if values else None
