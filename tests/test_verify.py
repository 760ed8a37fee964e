"""python -m nibblora.verify: a faithful merge passes, a wrong one fails with exit code 1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_merge import peft_model, save_adapter_dir, save_base
from nibblora.merge import merge_checkpoint
from nibblora.verify import main, verify_merge


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = save_base(root / "base")
    adapter = save_adapter_dir(peft_model(r=4, lora_alpha=8), root / "adapter")
    merge_checkpoint(base, [adapter], root / "merged", progress=False)
    return root, base, adapter, root / "merged"


def test_faithful_merge_passes_with_float32_sized_differences(merged, capsys):
    root, base, adapter, out = merged
    report = verify_merge(base, adapter, out)
    assert report.passed and report.positions == 4 * 32
    assert report.max_abs_logit_diff < 1e-4 and report.max_kl < 1e-9
    assert main(["--base", str(base), "--adapter", str(adapter), "--merged", str(out)]) == 0
    assert capsys.readouterr().out.startswith("PASS: max |logit diff|")


def test_merge_without_the_adapter_fails_with_exit_code_1(merged, tmp_path, capsys):
    root, base, adapter, out = merged
    assert main(["--base", str(base), "--adapter", str(adapter), "--merged", str(base)]) == 1
    assert capsys.readouterr().out.startswith("FAIL")


def test_tampered_layer_is_caught(merged, tmp_path):
    root, base, adapter, out = merged
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "config.json").write_text((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] += 0.05 * torch.randn_like(tensors["model.layers.1.mlp.down_proj.weight"])
    save_file(tensors, tampered / "model.safetensors")
    assert not verify_merge(base, adapter, tampered).passed


def test_a_missing_base_folder_is_an_input_error_with_exit_code_2(tmp_path, capsys):
    from nibblora.verify import main

    assert main(["--base", str(tmp_path / "nope"), "--adapter", str(tmp_path), "--merged", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
