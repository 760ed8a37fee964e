"""A damaged runs.sqlite is shown as unreadable, with the reason, in `qlora-tui --once`, in the job list and by
nibblora.runs.scan_runs; it never silently disappears, and the readable runs beside it still show."""

import os
import shutil
import sqlite3
import time

import pytest
from helpers_tui import drive, monitor, table_rows, utc, write_run
from textual.widgets import Static

from nibblora.runs import UNREADABLE, RunStoreError, RunWriter, open_run, scan_runs
from nibblora.tui import cli
from nibblora.tui.app import JobScreen, QloraTUI
from nibblora.tui.jobs import JobIndex

OLD = time.time() - 3600  # damage written an hour ago: not a store being created right now


def _age(path):
    for p in (path, path.with_name(path.name + "-wal")):
        if p.exists():
            os.utime(p, (OLD, OLD))


def _good_store(run_dir):
    return write_run(run_dir, "victim", "lora", 200, 200, "finished") / "runs.sqlite"


def truncated(run_dir):
    db = _good_store(run_dir)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.truncate(size // 3)
    return "damaged"


def random_bytes(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "runs.sqlite").write_bytes(os.urandom(8192))
    return "is not a SQLite database"


def header_only(run_dir):
    db = _good_store(run_dir)
    head = db.read_bytes()[:100]
    db.write_bytes(head)
    return "damaged"


def wrong_schema(run_dir):
    run_dir.mkdir(parents=True)
    conn = sqlite3.connect(run_dir / "runs.sqlite")
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.commit()
    conn.close()
    return "not a run store (no table runs, metrics, events, logs; it has recipes)"


def wal_garbage(run_dir):
    """A trainer killed before its first checkpoint of the WAL (the store's content lives in runs.sqlite-wal),
    then the WAL overwritten: the main file alone holds no tables."""
    writer = RunWriter.open(run_dir / "live", run_id="victim", name="victim", config={}, total_steps=10)
    writer._stop_heartbeat.set()
    writer._heartbeat.join()
    writer.log_metrics(1, {"loss": 2.0})
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "live" / "runs.sqlite", run_dir / "runs.sqlite")  # as kill -9 leaves it
    wal = run_dir / "live" / "runs.sqlite-wal"
    (run_dir / "runs.sqlite-wal").write_bytes(os.urandom(wal.stat().st_size))
    writer.conn.close()
    shutil.rmtree(run_dir / "live")
    return "holds no tables"


def zero_length(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "runs.sqlite").write_bytes(b"")
    return "is empty (0 bytes)"


def bad_config_json(run_dir):
    db = _good_store(run_dir)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE runs SET config_json = '{not json'")
    conn.commit()
    conn.close()
    return "run 'victim''s config_json is not valid JSON"


DAMAGE = [truncated, random_bytes, header_only, wrong_schema, wal_garbage, zero_length, bad_config_json]


@pytest.fixture(params=DAMAGE, ids=[d.__name__ for d in DAMAGE])
def damaged_root(request, tmp_path, monkeypatch):
    """A runs directory with one readable run and one damaged store; returns (root, damaged dir, reason)."""
    utc(monkeypatch)
    root = tmp_path / "runs"
    write_run(root / "healthy", "healthy", "qlora", 5, 10, "finished")
    reason = request.param(root / "broken")
    _age(root / "broken" / "runs.sqlite")
    return root, root / "broken", reason


def test_opening_a_damaged_store_raises_run_store_error_naming_the_file(damaged_root):
    _, broken, reason = damaged_root
    with pytest.raises(RunStoreError) as info:
        with open_run(broken) as store:
            for run in store.runs():
                store.latest(("loss", "tokens_per_s", "mem_peak_bytes"), run.run_id)
                store.metric_rows(run.run_id)
    assert reason in info.value.reason
    assert str(info.value).startswith(f"reading runs: {broken / 'runs.sqlite'}: ")
    assert "\n" not in str(info.value) and not info.value.transient


def test_scan_runs_reports_the_damaged_store_beside_the_readable_runs(damaged_root):
    root, broken, reason = damaged_root
    scan = scan_runs(root)
    assert [r.name for r in scan.runs] == ["healthy"]
    [bad] = scan.unreadable
    assert bad.run_dir == broken and reason in bad.reason


def test_job_index_lists_the_damaged_store_as_unreadable_with_the_reason(damaged_root):
    root, broken, reason = damaged_root
    jobs = {job.name: job for job in JobIndex(root).poll()}
    assert set(jobs) == {"healthy", "broken"}
    assert jobs["healthy"].status == "finished" and jobs["healthy"].error is None
    assert jobs["broken"].status == UNREADABLE and reason in jobs["broken"].error


def test_once_shows_the_damaged_store_and_why(damaged_root, capsys):
    root, broken, reason = damaged_root
    assert cli.main(["--once", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"runs under {root}: 2"
    [row] = [line for line in out if line.startswith("broken ")]
    assert row.split()[:3] == ["broken", "?", UNREADABLE]
    [line] = [line for line in out if line.startswith("unreadable: ")]
    assert line.startswith(f"unreadable: {broken / 'runs.sqlite'}: ") and reason in line


def test_a_store_being_created_right_now_is_not_reported(tmp_path):
    """An empty runs.sqlite written a moment ago is a trainer creating it: neither a run nor 'unreadable' yet."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "runs.sqlite").write_bytes(b"")
    assert JobIndex(tmp_path).poll() == []
    scan = scan_runs(tmp_path)
    assert scan.runs == [] and scan.unreadable == []
    _age(tmp_path / "new" / "runs.sqlite")
    assert [u.reason for u in scan_runs(tmp_path).unreadable] == [
        "is empty (0 bytes): its trainer died while creating it, or the file was truncated"
    ]


def test_a_store_damaged_after_it_was_read_turns_unreadable(tmp_path, monkeypatch):
    utc(monkeypatch)
    db = write_run(tmp_path / "run", "run", "lora", 5, 10, "finished") / "runs.sqlite"
    index = JobIndex(tmp_path)
    assert [j.status for j in index.poll()] == ["finished"]
    db.write_bytes(b"\0" * 4096)
    _age(db)
    [job] = index.poll()
    assert job.status == UNREADABLE and "is not a SQLite database" in job.error


def test_the_job_list_shows_the_unreadable_store_and_enter_says_why(tmp_path, monkeypatch):
    utc(monkeypatch)
    root = tmp_path / "runs"
    write_run(root / "healthy", "healthy", "qlora", 5, 10, "finished")
    zero_length(root / "broken")
    _age(root / "broken" / "runs.sqlite")
    app = QloraTUI(root, hardware=monitor())

    async def scenario(pilot):
        rows = {row[1]: row for row in table_rows(app)}
        assert rows["broken"][3] == UNREADABLE and rows["healthy"][3] == "finished"
        problems = str(app.screen.query_one("#unreadable", Static).render())
        assert "broken/runs.sqlite: is empty (0 bytes)" in problems
        key = next(k for k, job in app.jobs.items() if job.error is not None)
        app.open_job(key)
        await pilot.pause()
        assert not isinstance(app.screen, JobScreen)
        assert any("is empty (0 bytes)" in str(n.message) for n in app._notifications)

    drive(app, scenario)
