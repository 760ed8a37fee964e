"""Checkpoints and resume: a run killed with SIGKILL and started again reproduces the uninterrupted run's losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_train import tiny_checkpoint, tiny_config, tiny_rows

from nibblora.runs import open_run, request_stop
from nibblora.train import train
from nibblora.train.checkpointing import checkpoint_dirs

PYTHON_PATH = str(Path(__file__).resolve().parents[1] / "python")
STEPS = 160


def write_config(path: Path, model_dir: Path, data: Path, output_dir: Path, max_steps: int = STEPS) -> Path:
    path.write_text(f"""
output_dir = "{output_dir}"
[model]
path = "{model_dir}"
dtype = "float32"
gradient_checkpointing = false
[lora]
r = 4
alpha = 8.0
dropout = 0.1   # dropout draws random numbers: the RNG state must survive the kill too
[data]
train = "{data}"
batch_size = 4
[train]
mode = "qlora"
max_steps = {max_steps}
lr = 5e-3
grad_accum = 1
warmup_steps = 5
device = "cpu"
[checkpoint]
every = 40
keep_last = 2
""")
    return path


def launch(config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=PYTHON_PATH, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "nibblora.train", str(config), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_step(run_dir: Path) -> int:
    try:
        with open_run(run_dir) as store:
            losses = store.metric("loss")
    except Exception:  # the database may not exist yet
        return 0
    return losses[-1][0] if losses else 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir = tiny_checkpoint(root / "model")
    data = tiny_rows(64).to_jsonl(root / "train.jsonl")
    return root, model_dir, data


def test_resume_after_kill_9_reproduces_the_uninterrupted_losses(setup):
    root, model_dir, data = setup
    reference = launch(write_config(root / "ref.toml", model_dir, data, root / "ref"))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    config = write_config(root / "run.toml", model_dir, data, root / "run")
    proc = launch(config)
    deadline = time.time() + 300
    while last_step(root / "run") < 60 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = last_step(root / "run")
    assert 60 <= killed_at < STEPS, "the run finished before it could be killed; make it longer"
    with open_run(root / "run") as store:
        assert store.run().status == "failed"  # stored as running, but its process is gone

    again = launch(config)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    with open_run(root / "run") as store, open_run(root / "ref") as ref:
        assert store.run().status == "finished"
        resumed = [e for e in store.events() if e["kind"] == "resumed"]
        assert len(resumed) == 1 and resumed[0]["step"] in (40, 80, 120) and resumed[0]["step"] <= killed_at
        losses, expected = store.metric("loss"), ref.metric("loss")
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert losses == expected  # bit for bit: same rows, same dropout masks, same optimizer state
    assert [p.name for p in checkpoint_dirs(root / "run")] == ["step-00000120", "step-00000160"]


def test_stop_request_checkpoints_and_ends_as_stopped(setup, tmp_path):
    root, model_dir, data = setup
    proc = launch(write_config(tmp_path / "c.toml", model_dir, data, tmp_path / "run", max_steps=100000))
    deadline = time.time() + 120
    while last_step(tmp_path / "run") < 5 and time.time() < deadline:
        time.sleep(0.05)
    request_stop(tmp_path / "run")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    with open_run(tmp_path / "run") as store:
        info = store.run()
        assert info.status == "stopped"
        stopped_at = store.metric("loss")[-1][0]
    assert checkpoint_dirs(tmp_path / "run")[-1].name == f"step-{stopped_at:08d}"


def test_a_failing_run_is_recorded_as_failed(setup, tmp_path):
    _, model_dir, _ = setup
    config = tiny_config(model_dir, tmp_path / "run", data={"pad_token_id": 0})
    with pytest.raises(ValueError, match="empty"):
        train(config, tiny_rows(0), quiet=True)
    with open_run(tmp_path / "run") as store:
        assert store.run().status == "failed"
        assert "empty" in store.events()[-1]["message"]
