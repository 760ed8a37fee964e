"""Checkpoints: no pickle is ever loaded, every file is checksummed, resume falls back past damaged checkpoints."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from helpers_train import tiny_checkpoint, tiny_config, tiny_rows

from nibblora.errors import CheckpointError
from nibblora.runs import open_run
from nibblora.train import train
from nibblora.train.checkpointing import (
    LegacyCheckpointError,
    checkpoint_dirs,
    verify_checkpoint,
    write_manifest,
)
from nibblora.train.cli import main
from nibblora.train.state_files import load_state, save_state

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "nibblora"


class RunsCode:
    """Unpickling this runs a shell command: what a planted trainer_state.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def config(model_dir: Path, out: Path, max_steps: int, lora: dict | None = None, mode: str = "lora"):
    # A constant schedule: a 4-step run resumed to 6 steps uses the learning rates of a 6-step run.
    return tiny_config(
        model_dir,
        out,
        train={"max_steps": max_steps, "schedule": "constant", "mode": mode},
        checkpoint={"every": 2, "keep_last": 2},
        lora={"dropout": 0.1, **(lora or {})},
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Losses of an uninterrupted 6-step run."""
    return train(config(model_dir, tmp_path_factory.mktemp("ref") / "run", 6), tiny_rows(16), quiet=True).losses


def four_steps(model_dir: Path, out: Path) -> Path:
    train(config(model_dir, out, 4), tiny_rows(16), quiet=True)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002", "step-00000004"]
    return out / "checkpoints" / "step-00000004"


def test_trainer_state_round_trips_without_pickle(tmp_path):
    state = {
        "step": 7,
        "groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "flag": None}],
        "state": {0: {"exp_avg": torch.randn(3, 2), "step": torch.tensor(4.0)}, 1: {}},
        "odd": {"$tensor": "not a tag"},
        "scale": float("inf"),
        "nan": float("nan"),
        "rng": torch.get_rng_state(),
        "bf16": torch.randn(4).to(torch.bfloat16),
    }
    save_state(state, tmp_path / "s")
    loaded = load_state(tmp_path / "s")
    assert set(os.listdir(tmp_path)) == {"s.json", "s.safetensors"}
    assert loaded["groups"][0]["betas"] == (0.9, 0.999) and loaded["odd"] == {"$tensor": "not a tag"}
    assert list(loaded["state"]) == [0, 1] and loaded["scale"] == math.inf and math.isnan(loaded["nan"])
    torch.testing.assert_close(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"], rtol=0, atol=0)
    assert torch.equal(loaded["rng"], state["rng"]) and loaded["bf16"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="cannot hold"):
        save_state({"x": object()}, tmp_path / "bad")


def test_no_module_of_the_package_unpickles():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"torch\.load\(|import pickle|pickle\.load|weights_only=False", text), path


def test_a_planted_pickle_is_refused_and_never_executed(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    newest = four_steps(model_dir, out)
    live, marker = tmp_path / "live", tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(live)))
    assert live.exists()  # the payload is real: unpickling it runs the command
    # An old-format checkpoint (a pickle, no manifest) newer than the intact ones: refused, one line, exit 2.
    legacy = out / "checkpoints" / "step-00000006"
    legacy.mkdir()
    (legacy / "trainer_state.pt").write_bytes(pickle.dumps({"step": 6, "x": RunsCode(marker)}))
    (legacy / "rng-rank0.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(LegacyCheckpointError, match="trainer_state.pt is a pickle"):
        train(config(model_dir, out, 8), tiny_rows(16), quiet=True)
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'output_dir = "{out}"\n[model]\npath = "{model_dir}"\ndtype = "float32"\n'
        f'[data]\ntrain = "{tiny_rows(16).to_jsonl(tmp_path / "rows.jsonl")}"\n'
        '[train]\nmode = "lora"\nmax_steps = 8\ndevice = "cpu"\n[lora]\nr = 4\n'
    )
    capsys.readouterr()
    assert main([str(toml), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could run code" in err and "step-00000006" in err
    # A pickle planted inside an intact checkpoint is not part of it: resume uses the checkpoint, never the pickle.
    legacy.rename(tmp_path / "legacy")
    (newest / "trainer_state.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    result = train(config(model_dir, out, 6), tiny_rows(16), quiet=True)
    assert result.step == 6 and sorted(result.losses) == [5, 6]
    assert not marker.exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 9] ^= 0x01  # inside the tensor data, where no parser would notice
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated trainer state": (lambda d: truncate(d / "trainer_state.safetensors"), "truncated"),
    "flipped byte in the adapter": (lambda d: flip_byte(d / "adapter" / "adapter_model.safetensors"), "sha256"),
    "missing random state": (lambda d: (d / "rng-rank0.json").unlink(), "rng-rank0.json is missing"),
    "missing manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    "garbage manifest": (lambda d: (d / "manifest.json").write_text('{"files": ['), "unreadable"),
    "emptied adapter config": (lambda d: (d / "adapter" / "adapter_config.json").write_bytes(b""), "truncated"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_and_matches_the_uninterrupted_run(
    model_dir, reference, tmp_path, capsys, damage
):
    out = tmp_path / "run"
    newest = four_steps(model_dir, out)
    verify_checkpoint(newest, "lora")
    harm, reason = DAMAGE[damage]
    harm(newest)
    capsys.readouterr()
    result = train(config(model_dir, out, 6), tiny_rows(16), quiet=True)
    err = capsys.readouterr().err
    assert "step-00000004" in err and "damaged" in err and reason in err and "Traceback" not in err
    assert sorted(result.losses) == [3, 4, 5, 6]
    assert result.losses == {s: reference[s] for s in (3, 4, 5, 6)}  # bit for bit, from the intact step 2
    with open_run(out) as store:
        events = store.events()
    skipped = [e for e in events if e["kind"] == "checkpoint_damaged"]
    assert len(skipped) == 1 and reason in skipped[0]["data"]["reason"]
    assert [e["step"] for e in events if e["kind"] == "resumed"] == [2]
    verify_checkpoint(newest, "lora")  # step 4 was written again, intact


def test_with_every_checkpoint_damaged_the_run_starts_over_and_says_so(model_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    four_steps(model_dir, out)
    for directory in checkpoint_dirs(out):
        truncate(directory / "trainer_state.json")
    capsys.readouterr()
    result = train(config(model_dir, out, 6), tiny_rows(16), quiet=True)
    assert "no intact checkpoint left; training from step 0" in capsys.readouterr().err
    assert result.losses == reference


def test_a_resigned_hostile_trainer_state_is_one_checkpoint_error(model_dir, tmp_path):
    out = tmp_path / "run"
    newest = four_steps(model_dir, out)
    # Whoever can write the folder can also rewrite the manifest: the content itself must be read safely.
    (newest / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    write_manifest(newest, 4)
    with pytest.raises(CheckpointError, match="trainer_state.json is not valid JSON|nested"):
        train(config(model_dir, out, 6), tiny_rows(16), quiet=True)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    state["optimizer"]["state"] = {"$items": [[0, {"exp_avg": {"$tensor": "0"}}]]}
    (newest / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(newest, 4)
    with pytest.raises(CheckpointError, match="trainer state|optimizer"):
        train(config(model_dir, out, 6), tiny_rows(16), quiet=True)


def test_resuming_with_another_lora_rank_names_the_key(model_dir, tmp_path):
    out = tmp_path / "run"
    four_steps(model_dir, out)
    with pytest.raises(CheckpointError, match="lora.r"):
        train(config(model_dir, out, 6, lora={"r": 8}), tiny_rows(16), quiet=True)


def test_a_rerun_removes_what_a_killed_run_left_half_written(model_dir, tmp_path):
    out = tmp_path / "run"
    four_steps(model_dir, out)
    stale = [out / ".adapter.tmp-abc123", out / ".tmp-adapter", out / "checkpoints" / ".tmp-step-00000006"]
    for path in stale:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"half")
    result = train(config(model_dir, out, 6), tiny_rows(16), quiet=True)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert result.weights_dir == out / "adapter" and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["full", "qlora"])
def test_resume_is_exact_in_the_other_modes(model_dir, tmp_path, mode):
    rows = tiny_rows(16)
    reference = train(config(model_dir, tmp_path / "ref", 6, mode=mode), rows, quiet=True).losses
    train(config(model_dir, tmp_path / "run", 4, mode=mode), rows, quiet=True)
    newest = tmp_path / "run" / "checkpoints" / "step-00000004"
    verify_checkpoint(newest, mode)
    assert (newest / ("model.safetensors" if mode == "full" else "adapter/adapter_model.safetensors")).is_file()
    resumed = train(config(model_dir, tmp_path / "run", 6, mode=mode), rows, quiet=True).losses
    assert resumed == {5: reference[5], 6: reference[6]}
