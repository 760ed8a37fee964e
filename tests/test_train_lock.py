"""One trainer per output folder: a second one refuses with the first one's pid, in one line, exit code 2."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_train import tiny_checkpoint, tiny_rows

from nibblora.errors import RunStoreError
from nibblora.runs import open_run, request_stop
from nibblora.train.lock import OutputDirInUseError, lock_run_folder

PYTHON_PATH = str(Path(__file__).resolve().parents[1] / "python")


def test_the_lock_is_exclusive_and_released_on_exit(tmp_path):
    with lock_run_folder(tmp_path / "run") as path:
        assert path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(OutputDirInUseError, match=f"in use by another trainer \\(pid {os.getpid()} "):
            with lock_run_folder(tmp_path / "run"):
                pass
    with lock_run_folder(tmp_path / "run"):
        pass


def test_a_second_trainer_on_the_same_output_dir_refuses_with_the_first_ones_pid(tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "model")
    data = tiny_rows(16).to_jsonl(tmp_path / "rows.jsonl")
    config = tmp_path / "c.toml"
    config.write_text(
        f'output_dir = "{tmp_path / "run"}"\n[model]\npath = "{model_dir}"\ndtype = "float32"\n'
        f'gradient_checkpointing = false\n[data]\ntrain = "{data}"\n[lora]\nr = 4\n'
        '[train]\nmode = "lora"\nmax_steps = 100000\ngrad_accum = 1\ndevice = "cpu"\n'
        "[checkpoint]\nevery = 0\n"
    )
    env = dict(os.environ, PYTHONPATH=PYTHON_PATH, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "nibblora.train", str(config), "--quiet"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            try:
                with open_run(tmp_path / "run") as store:
                    if store.metric("loss"):
                        break
            except (FileNotFoundError, sqlite3.DatabaseError, RunStoreError):  # not created yet, or still empty
                pass
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nibblora.train: error: output_dir ")
        assert f"in use by another trainer (pid {first.pid} " in lines[0]
        assert first.poll() is None  # the first one trains on, untouched
        request_stop(tmp_path / "run")
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    with open_run(tmp_path / "run") as store:
        info = store.run()
        kinds = [e["kind"] for e in store.events()]
    assert (info.status, info.pid) == ("stopped", first.pid)
    assert kinds.count("started") == 1 and "failed" not in kinds
