"""The merge tool's adapter input goes through nibblora's one adapter reader: bad adapters are refused naming the
ADAPTER file and tensor, before anything is written."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers_merge import peft_model, save_adapter_dir, save_base
from safetensors.torch import load_file, save_file

from nibblora.errors import AdapterError
from nibblora.merge import MergeError, merge_checkpoint
from nibblora.merge.cli import main

KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-adapter")
    base = save_base(root / "base")
    adapter = save_adapter_dir(peft_model(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), root / "adapter")
    return root, base, adapter


def _copy(adapter, dst, config_changes=None, edit=None):
    dst.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_adapter_names_the_adapter_file_and_tensor_not_the_base_nor_4bit(setup, tmp_path, value):
    _root, base, adapter = setup
    bad = _copy(adapter, tmp_path / "bad", edit=lambda t: t[KEY].view(-1)[7].fill_(value))
    with pytest.raises(AdapterError) as info:
        merge_checkpoint(base, [bad], tmp_path / "out", progress=False)
    text = str(info.value)
    assert text.startswith(f"reading adapter weights: {bad / 'adapter_model.safetensors'}: tensor '{KEY}' holds 1")
    assert str(base) not in text and "4-bit" not in text
    assert isinstance(info.value, MergeError) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target_modules": ["o_proj"]}, "which target_modules ['o_proj'] in adapter_config.json does not select"),
        ({"target_modules": []}, "key 'target_modules' is an empty list: it selects no module"),
        ({"target_modules": "nothing"}, "which target_modules 'nothing' in adapter_config.json does not select"),
        ({"r": 0}, "key 'r' must be a positive integer, got 0"),
        ({"r": None}, "key 'r' must be a positive integer, got None"),
        ({"r": 4.5}, "key 'r' must be a positive integer, got 4.5"),
        ({"rank_pattern": [1]}, "key 'rank_pattern' must be an object of module name -> value, got [1]"),
        ({"lora_alpha": "eight"}, "key 'lora_alpha' must be a finite number, got 'eight'"),
        ({"target_modules": 5}, "key 'target_modules' must be a string or a list of strings, got 5"),
        ({"use_rslora": "false"}, "key 'use_rslora' must be true or false, got 'false'"),
    ],
)
def test_bad_adapter_configs_exit_2_with_one_line_and_no_output(setup, tmp_path, capsys, changes, message):
    _root, base, adapter = setup
    bad = _copy(adapter, tmp_path / "bad", config_changes=changes)
    code = main(["--base", str(base), "--adapter", str(bad), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("nibblora.merge: error: reading adapter")
    assert message in err and str(bad) in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint32, torch.int16])
def test_integer_adapter_tensors_are_refused_naming_the_tensor(setup, tmp_path, dtype):
    _root, base, adapter = setup
    bad = _copy(adapter, tmp_path / "bad", edit=lambda t: t.update({KEY: (t[KEY] * 100).to(dtype)}))
    with pytest.raises(MergeError, match=rf"tensor '{re.escape(KEY)}' is [IU]\d+; adapter weights are floating"):
        merge_checkpoint(base, [bad], tmp_path / "out", progress=False)
