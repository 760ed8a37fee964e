"""The run store: SQLite in WAL mode, readers beside a live writer, dead runs shown as failed."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time

import pytest

from nibblora.errors import RunStoreError
from nibblora.runs import RunWriter, effective_status, list_runs, open_run, request_stop


def test_writer_and_reader_round_trip_metrics_events_logs(tmp_path):
    root, tmp_path = tmp_path, tmp_path / "r1"
    writer = RunWriter.open(tmp_path, "r1", "r1", {"train": {"lr": 0.1}}, total_steps=3)
    reader = open_run(tmp_path)  # opened while the writer is live
    writer.log_metrics(1, {"loss": 2.0, "lr": 0.1})
    writer.log_metrics(2, {"loss": 1.5, "lr": 0.05})
    writer.event("checkpoint", "checkpoint at step 2", 2, {"path": "x"})
    writer.log("hello")
    assert reader.metric("loss") == [(1, 2.0), (2, 1.5)]
    assert reader.metric("loss", since_step=1) == [(2, 1.5)]
    assert reader.metrics()[2] == {"loss": 1.5, "lr": 0.05}
    assert reader.events()[-1]["data"] == {"path": "x"}
    assert reader.logs()[-1]["message"] == "hello"
    info = reader.run()
    assert (info.status, info.config, info.total_steps) == ("running", {"train": {"lr": 0.1}}, 3)
    assert reader.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    writer.log_metrics(2, {"loss": 1.25})  # a resumed run rewrites the steps after its checkpoint
    assert reader.metric("loss")[-1] == (2, 1.25)
    writer.finish("finished", step=2)
    assert reader.run().status == "finished"
    reader.close()
    assert [r.run_id for r in list_runs(root)] == ["r1"]


def test_a_reader_holding_a_transaction_never_blocks_the_writer(tmp_path):
    writer = RunWriter.open(tmp_path, "r", "r", {})
    reader = sqlite3.connect(str(tmp_path / "runs.sqlite"))
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM metrics").fetchone()  # a read snapshot stays open
    start = time.perf_counter()
    for step in range(50):
        writer.log_metrics(step, {"loss": 1.0})
    assert time.perf_counter() - start < 5.0
    reader.close()
    writer.finish("finished")


def test_a_run_whose_process_died_reads_as_failed(tmp_path):
    code = (
        "import sys, os; sys.path.insert(0, sys.argv[2]); from nibblora.runs import RunWriter; "
        "RunWriter.open(sys.argv[1], 'dead', 'dead', {}); os._exit(0)"
    )
    python_dir = str(__import__("nibblora").__path__[0].rsplit("/", 1)[0])
    subprocess.run([sys.executable, "-c", code, str(tmp_path), python_dir], check=True)
    with open_run(tmp_path) as store:
        info = store.run()
    assert (info.stored_status, info.status) == ("running", "failed")


def test_a_stale_heartbeat_on_another_host_reads_as_failed():
    now = 10_000.0
    assert effective_status("running", 123, "elsewhere", now - 10, now) == "running"
    assert effective_status("running", 123, "elsewhere", now - 3600, now) == "failed"
    assert effective_status("finished", 123, "elsewhere", now - 3600, now) == "finished"


def test_request_stop_sets_the_flag_the_writer_polls(tmp_path):
    writer = RunWriter.open(tmp_path, "r", "r", {})
    assert not writer.stop_requested()
    request_stop(tmp_path)
    assert writer.stop_requested()
    writer.finish("stopped")
    with pytest.raises(FileNotFoundError):
        request_stop(tmp_path / "nowhere")


def test_opening_a_folder_without_a_run_store_names_the_folder(tmp_path):
    from nibblora.runs import open_run

    with pytest.raises(FileNotFoundError, match=f"no runs.sqlite in {tmp_path}"):
        open_run(tmp_path)


def test_non_finite_metrics_are_recorded_beside_the_finite_ones(tmp_path):
    writer = RunWriter.open(tmp_path, "r", "r", {})
    writer.log_metrics(1, {"loss": 2.0, "grad_norm": 1.0})
    writer.log_metrics(2, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
    with open_run(tmp_path) as store:
        assert store.metric("loss") == [(1, 2.0)]  # readers of `metrics` see only finite values
        assert store.metrics()[2] == {"lr": 0.1}
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    rows = conn.execute("SELECT step, name, value FROM nonfinite_metrics ORDER BY name").fetchall()
    assert rows == [(2, "grad_norm", "inf"), (2, "loss", "nan")]
    writer.log_metrics(2, {"loss": 1.5})  # a resumed run rewrites step 2 with a finite loss: one value per key
    assert conn.execute("SELECT name FROM nonfinite_metrics").fetchall() == [("grad_norm",)]
    conn.close()
    with open_run(tmp_path) as store:
        assert store.metric("loss") == [(1, 2.0), (2, 1.5)]
    writer.finish("finished")


def _filled_store(run_dir):
    writer = RunWriter.open(run_dir, "r", "r", {"x": 1})
    for step in range(400):
        writer.log_metrics(step, {"loss": 1.0, "lr": 0.1, "grad_norm": 2.0})
    writer.finish("finished")
    conn = sqlite3.connect(run_dir / "runs.sqlite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file, nothing in the WAL
    conn.close()
    return run_dir / "runs.sqlite"


def _scramble(path, start, count, seed):
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for i in rng.sample(range(start, len(data)), count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zeroed header": lambda p: p.write_bytes(bytes(100) + p.read_bytes()[100:]),
    "random bytes": lambda p: p.write_bytes(random.Random(1).randbytes(8192)),
    "flipped bytes": lambda p: _scramble(p, 4096, 200, 0),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
    "another database": lambda p: (p.unlink(), sqlite3.connect(p).execute("CREATE TABLE metrics (x)")),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_a_damaged_store_is_one_error_naming_the_file(tmp_path, damage):
    path = _filled_store(tmp_path)
    CORRUPTIONS[damage](path)
    with pytest.raises(RunStoreError, match=f"^opening the run store: {path}: .*move it away"):
        RunWriter.open(tmp_path, "r", "r", {})


def test_the_trainer_over_a_damaged_store_exits_2_with_one_line(tmp_path, capsys):
    from nibblora.train.cli import main

    (tmp_path / "runs.sqlite").write_bytes(random.Random(3).randbytes(4096))
    config = tmp_path / "c.toml"
    config.write_text(
        f'output_dir = "{tmp_path}"\n[model]\npath = "{tmp_path / "no-model"}"\n'
        f'[data]\ntrain = "{tmp_path / "rows.jsonl"}"\n[train]\ndevice = "cpu"\n'
    )
    before = (tmp_path / "runs.sqlite").read_bytes()
    assert main([str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nibblora.train: error: opening the run store: {tmp_path}/runs.sqlite")
    assert (tmp_path / "runs.sqlite").read_bytes() == before  # left as it was, for the user to look at
