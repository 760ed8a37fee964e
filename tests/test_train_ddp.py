"""torchrun with two CPU processes (gloo) trains the same adapter as one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import tiny_checkpoint, tiny_rows
from safetensors.torch import load_file

from nibblora.runs import open_run

PYTHON_PATH = str(Path(__file__).resolve().parents[1] / "python")
K = 4


def config_text(model_dir: Path, data: Path, output_dir: Path, batch_size: int) -> str:
    return f"""
output_dir = "{output_dir}"
[model]
path = "{model_dir}"
dtype = "float32"
gradient_checkpointing = true
[lora]
r = 4
alpha = 8.0
dropout = 0.0
[data]
train = "{data}"
batch_size = {batch_size}
[train]
mode = "lora"
max_steps = {K}
lr = 1e-2
grad_accum = 2
warmup_steps = 1
device = "cpu"
"""


def test_two_process_ddp_matches_single_process_on_the_same_global_batch(tmp_path):
    model_dir = tiny_checkpoint(tmp_path / "model")
    data = tiny_rows(48, min_len=4, max_len=24).to_jsonl(tmp_path / "train.jsonl")
    (tmp_path / "single.toml").write_text(config_text(model_dir, data, tmp_path / "single", batch_size=4))
    (tmp_path / "ddp.toml").write_text(config_text(model_dir, data, tmp_path / "ddp", batch_size=2))
    env = dict(os.environ, PYTHONPATH=PYTHON_PATH, OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, "-m", "nibblora.train", str(tmp_path / "single.toml"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "nibblora.train",
            str(tmp_path / "ddp.toml"),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ddp.returncode == 0, ddp.stderr
    with open_run(tmp_path / "single") as a, open_run(tmp_path / "ddp") as b:
        la, lb = a.metric("loss"), b.metric("loss")
    assert [s for s, _ in lb] == list(range(1, K + 1))
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-5)
    wa = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4)
