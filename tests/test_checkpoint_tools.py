"""What the offline tools and load_model promise about their outputs and inputs: a full disk is one line naming the
folder with nothing left behind; every file written is read back by the one reader; integer weights are refused;
a merge whose re-quantization erases the fine-tune says so and exits 1 unless that is accepted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers_checkpoint import leftovers, small_tensors, write_adapter, write_checkpoint
from safetensors.torch import load_file, save_file

from nibblora.checkpoint import SafetensorsWriter, TensorSpec
from nibblora.checkpoint.shards import verify_written_checkpoint
from nibblora.errors import CheckpointError, ExportError
from nibblora.merge import main as merge_main
from nibblora.merge import merge_checkpoint
from nibblora.quantize import main as quantize_main


def _big_input(path: Path) -> Path:
    tensors = small_tensors()
    tensors["model.embed_tokens.weight"] = torch.randn(512, 256)  # 512 KB, copied as it is
    tensors["lm_head.weight"] = torch.randn(512, 8)
    return write_checkpoint(path, tensors)


def _cli(tool: str, model: Path, out: Path, adapter: Path | None, *extra: str) -> int:
    if tool == "quantize":
        return quantize_main(["--quiet", "--model", str(model), "--out", str(out), *extra])
    return merge_main(["--quiet", "--base", str(model), "--adapter", str(adapter), "--out", str(out), *extra])


@pytest.mark.parametrize("tool", ["quantize", "merge"])
def test_write_failure_is_one_line_naming_the_full_folder_and_leaves_nothing(tool, tmp_path, capsys, monkeypatch):
    model, adapter = write_checkpoint(tmp_path / "m"), write_adapter(tmp_path / "a")
    out = tmp_path / "out"

    def disk_full(self, name, source, offset, chunk_bytes=0):
        raise OSError(28, "No space left on device", str(self.path))

    monkeypatch.setattr(SafetensorsWriter, "copy_from", disk_full)
    assert _cli(tool, model, out, adapter) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"nibblora.{tool}: error: writing {out}: the disk that holds {tmp_path} is full")
    assert leftovers(out) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'}); the simulated "
            "full-disk test covers the same path"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("tool", ["quantize", "merge"])
def test_real_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(tool, tmp_path, small_tmpfs, capsys):
    model, adapter = _big_input(tmp_path / "m"), write_adapter(tmp_path / "a")
    out = small_tmpfs / "out"
    assert _cli(tool, model, out, adapter) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"nibblora.{tool}: error: writing {out}: the disk that holds {small_tmpfs} is full")
    assert list(small_tmpfs.iterdir()) == []


def test_writer_refuses_a_name_no_reader_accepts(tmp_path):
    with pytest.raises(ValueError, match="not valid Unicode"):
        SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a\ud800", "F32", (1,))])
    with pytest.raises(ValueError, match="metadata maps strings to strings"):
        SafetensorsWriter(tmp_path / "x.safetensors", [], metadata={"format": 5})  # type: ignore[dict-item]


def test_read_back_check_refuses_a_written_folder_that_differs_from_the_plan(tmp_path):
    folder = write_checkpoint(tmp_path / "w")
    planned = {k: ("F32", tuple(v.shape)) for k, v in small_tensors().items()}
    verify_written_checkpoint(folder, planned)
    with pytest.raises(ExportError, match="1 tensors differ from the plan"):
        verify_written_checkpoint(folder, {**planned, "extra": ("F32", (1,))})
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[:-4])
    with pytest.raises(ExportError, match="checking the written output: reading .* truncated"):
        verify_written_checkpoint(folder, planned)


def test_merge_that_requantization_erases_says_so_and_exits_1_unless_accepted(tmp_path, capsys):
    model = write_checkpoint(tmp_path / "m")
    adapter = write_adapter(tmp_path / "a", scale=1e-3)  # an update far below the 4-bit rounding
    out = tmp_path / "out"
    assert _cli("merge", model, out, adapter, "--quantize", "nf4") == 1
    printed = capsys.readouterr().out
    assert "re-quantizing to nf4 erased most of the fine-tune: in 1 of 1 changed layers" in printed
    assert "Keep the merge in 16-bit" in printed and "--accept-quantization-loss" in printed
    assert (out / "model.safetensors").is_file()  # written, so it can be inspected
    assert _cli("merge", model, out, adapter, "--quantize", "nf4", "--overwrite", "--accept-quantization-loss") == 0
    assert "erased most of the fine-tune" in capsys.readouterr().out
    strong = write_adapter(tmp_path / "strong", scale=1.0)
    summary = merge_checkpoint(model, [strong], tmp_path / "ok", quantize="nf4", progress=False)
    assert not summary.fine_tune_mostly_lost and summary.exit_code == 0
    assert "erased most" not in summary.format()


def _tiny_llama(path: Path) -> Path:
    from helpers_models import hf_tiny_model, save_hf

    return save_hf(hf_tiny_model("llama"), path)


def test_load_model_refuses_integer_weights_naming_the_tensor(tmp_path):
    from nibblora.models import load_model

    model = _tiny_llama(tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = torch.full(tensors[name].shape, 1_234_567_890, dtype=torch.int32)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in model.safetensors has dtype I32; the model needs"):
        load_model(model)


def test_load_model_refuses_a_quantization_config_that_is_not_an_object(tmp_path):
    from nibblora.models import load_model

    model = _tiny_llama(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = "bitsandbytes"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: quantization_config is 'bitsandbytes'; expected an object"):
        load_model(model)
