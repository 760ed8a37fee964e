"""Reading run stores for the dashboard: a real training run's store, incremental polling, `--once`, and a
reader that opens the store while a trainer writes to it."""

import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from helpers_tui import GIB, h200, monitor, synthetic_runs, trained_runs, utc

from nibblora.tui import cli, jobs
from nibblora.tui.jobs import JobIndex, RunSeries


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    return trained_runs(tmp_path_factory)


def test_job_index_reads_a_real_training_run(real_root):
    [job] = JobIndex(real_root).poll()
    assert (job.name, job.method, job.status, job.step, job.total_steps) == ("tiny-lora", "lora", "finished", 6, 6)
    assert job.loss is not None and 0 < job.loss < 10 and job.tokens_per_s > 0
    assert job.eta_seconds is None  # not running


def test_run_series_has_every_recorded_metric_and_log_line(real_root):
    series = RunSeries(real_root / "tiny-lora", "tiny-lora")
    rows, logs = series.poll()
    assert [s for s, _ in series.series("loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in series.series("eval_val_loss")] == [2, 4, 6]
    assert series.eval_sets() == ["val"]
    for name in ("lr", "grad_norm", "tokens_per_s", "mem_peak_bytes", "mem_estimate_bytes"):
        assert len(series.series(name)) == 6, name
    assert any("step 6/6" in line["message"] for line in logs)
    assert series.info.status == "finished"
    # Nothing new: the next poll reads no rows.
    assert series.poll() == (0, [])


def test_once_prints_a_plain_summary(real_root, capsys):
    assert cli.main(["--once", str(real_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"runs under {real_root}: 1"
    assert out[1].split() == ["name", "method", "status", "step", "loss", "tok/s", "GPU", "mem", "ETA", "started"]
    assert out[2].split()[:4] == ["tiny-lora", "lora", "finished", "6/6"]
    assert any(line.startswith("CPU ") for line in out)
    assert "\x1b" not in "".join(out)  # plain text, no colour codes


def test_once_on_a_missing_directory_is_an_error(tmp_path, capsys):
    assert cli.main(["--once", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_once_summary_of_synthetic_runs(tmp_path, monkeypatch):
    utc(monkeypatch)
    root = synthetic_runs(tmp_path)
    from nibblora.tui.text import summary

    # The running job's process (this one) holds 3 GiB on the GPU; other pids are not ours.
    snapshot = monitor([h200(procs={os.getpid(): 3 * GIB, 1: GIB})]).read()
    text = summary(JobIndex(root).poll(), snapshot, "runs")
    assert text.splitlines() == [
        "runs under runs: 4",
        "name             method  status    step     loss   tok/s  GPU mem  ETA    started",
        "llama-lora-r16   lora    finished  100/100  2.112  1,000  -        -      2024-05-01 12:00",
        "qwen-qlora       qlora   stopped   40/100   1.857  1,000  -        -      2024-05-01 12:01",
        "mistral-full     full    failed    12/200   2.146  1,000  -        -      2024-05-01 12:05",
        "llama-qlora-r64  qlora   running   30/100   2.019  1,050  3.0 GiB  2m20s  2024-05-01 12:10",
        "",
        "GPU0 NVIDIA H200  mem 40.0 GiB / 141.0 GiB (28%)  util 87%  temp 61C  power 512/700 W",
        "CPU 12% of 16 cores  RAM 20.0 GiB / 128.0 GiB",
    ]


def test_job_index_rereads_only_stores_that_changed(tmp_path, monkeypatch):
    root = synthetic_runs(tmp_path)
    index = JobIndex(root)
    assert len(index.poll()) == 4
    reads = []
    real = jobs.read_jobs_of
    monkeypatch.setattr(jobs, "read_jobs_of", lambda d: reads.append(d.name) or real(d))
    assert len(index.poll()) == 4
    assert reads == []  # nothing changed on disk: no store was opened
    from nibblora.runs import request_stop

    request_stop(root / "llama-qlora-r64")
    index.poll()
    assert reads == ["llama-qlora-r64"]


WRITER = textwrap.dedent("""
    import sys, time
    from nibblora.runs import RunWriter
    writer = RunWriter.open(sys.argv[1], run_id="w", name="w", config={"train": {"mode": "lora"}}, total_steps=400)
    for step in range(1, 401):
        writer.log_metrics(step, {"loss": 1.0 / step, "lr": 1e-4, "tokens_per_s": 10.0 * step})
        writer.log(f"step {step}")
        if step % 50 == 0:
            time.sleep(0.01)
    writer.finish("finished")
""")


def test_reading_while_a_run_writes_loses_no_rows(tmp_path):
    """A trainer process writes 400 steps as fast as it can while the dashboard polls incrementally: every step,
    every metric and every log line arrives exactly once, in order, and the writer never fails."""
    run_dir = tmp_path / "w"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], stderr=subprocess.PIPE)
    series = RunSeries(run_dir, "w")
    index = JobIndex(tmp_path, rescan_seconds=0)
    polls = 0
    logs = []
    while True:
        done = writer.poll() is not None
        if (run_dir / "runs.sqlite").exists():
            try:
                _, new_logs = series.poll()
            except (KeyError, sqlite3.OperationalError):  # the store is being created: no tables or no run yet
                new_logs = []
            logs += new_logs
            index.poll()
            polls += 1
        if done:
            break
        time.sleep(0.002)  # a dashboard polls far less often; this keeps many polls without starving the writer
    _, new_logs = series.poll()
    logs += new_logs
    assert writer.returncode == 0, writer.stderr.read().decode()
    assert polls > 1
    assert [s for s, _ in series.series("loss")] == list(range(1, 401))
    assert series.series("tokens_per_s")[-1] == (400, 4000.0)
    assert [line["message"] for line in logs] == [f"step {i}" for i in range(1, 401)]
    [job] = index.poll()
    assert (job.status, job.step) == ("finished", 400)


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    from nibblora.runs import RunWriter

    def open_writer():
        return RunWriter.open(tmp_path, run_id="r", name="r", config={}, total_steps=5)

    writer = open_writer()
    for step in (1, 2, 3):
        writer.log_metrics(step, {"loss": float(step)})
    series = RunSeries(tmp_path, "r")
    series.poll()
    writer.finish("failed")
    writer = open_writer()  # resumed from the checkpoint at step 1: steps 2 and 3 run again
    writer.event("resumed", "resumed from step 1", 1)
    writer.log_metrics(2, {"loss": 20.0})
    series.poll()
    # Step 3 is still the first attempt's until the resumed run reaches it: the store says so, and so do we.
    assert series.series("loss") == [(1, 1.0), (2, 20.0), (3, 3.0)]
    writer.log_metrics(3, {"loss": 30.0})
    series.poll()
    assert series.series("loss") == [(1, 1.0), (2, 20.0), (3, 30.0)]
    writer.finish("finished")
