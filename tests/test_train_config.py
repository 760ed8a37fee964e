"""The TOML config: defaults, --set overrides, errors that name the key, and docs that cover every field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nibblora.train import ConfigError, TrainConfig, config_from_dict, load_config
from nibblora.train.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_defaults_are_the_qlora_recipe():
    config = config_from_dict({"model": {"path": "m"}})
    assert (config.train.mode, config.lora.r, config.lora.alpha, config.lora.target_modules) == (
        "qlora", 64, 16.0, "all-linear")
    assert config.model.quant_type == "nf4" and config.model.double_quant


def test_overrides_parse_values_as_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npath = "m"\n[train]\nlr = 1e-3\n')
    config = load_config(path, ["train.lr=5e-5", "lora.target_modules=[\"q_proj\", \"v_proj\"]", "lora.r=8",
                                "train.device=cpu", "data.eval.general=g.jsonl"])
    assert config.train.lr == 5e-5 and config.lora.r == 8 and config.train.device == "cpu"
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.eval == {"general": "g.jsonl"}


@pytest.mark.parametrize("data, message", [
    ({"model": {"path": "m"}, "train": {"lrr": 1}}, "train.lrr: unknown key"),
    ({"model": {"path": "m"}, "train": {"max_steps": "ten"}}, "train.max_steps: expected an integer"),
    ({"model": {"path": "m"}, "train": {"mode": "dora"}}, "train.mode must be one of"),
    ({}, "model.path is required"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text('[model]\npath = "m"\n')
    assert main([str(tmp_path / "c.toml"), "--set", "nonsense"]) == 2


def test_docs_describe_every_config_field():
    text = DOCS.read_text()
    for section in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), section.name)
        if dataclasses.is_dataclass(default):
            assert f"[{section.name}]" in text
            for f in dataclasses.fields(default):
                assert f"`{f.name}`" in text, f"docs/training.md does not describe {section.name}.{f.name}"
        else:
            assert f"`{section.name}`" in text
