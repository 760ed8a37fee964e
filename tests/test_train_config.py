"""The TOML config: defaults, --set overrides, errors that name the key, and docs that cover every field."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import random
from pathlib import Path

import pytest

from nibblora.train import ConfigError, TrainConfig, config_from_dict, load_config
from nibblora.train.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_defaults_are_the_qlora_recipe():
    config = config_from_dict({"model": {"path": "m"}})
    assert (config.train.mode, config.lora.r, config.lora.alpha, config.lora.target_modules) == (
        "qlora",
        64,
        16.0,
        "all-linear",
    )
    assert config.model.quant_type == "nf4" and config.model.double_quant


def test_overrides_parse_values_as_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npath = "m"\n[train]\nlr = 1e-3\n')
    config = load_config(
        path,
        [
            "train.lr=5e-5",
            'lora.target_modules=["q_proj", "v_proj"]',
            "lora.r=8",
            "train.device=cpu",
            "data.eval.general=g.jsonl",
        ],
    )
    assert config.train.lr == 5e-5 and config.lora.r == 8 and config.train.device == "cpu"
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.eval == {"general": "g.jsonl"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"path": "m"}, "train": {"lrr": 1}}, "train.lrr: unknown key"),
        ({"model": {"path": "m"}, "train": {"max_steps": "ten"}}, "train.max_steps: expected an integer"),
        ({"model": {"path": "m"}, "train": {"mode": "adalora"}}, "train.mode must be one of"),
        ({}, "model.path is required"),
    ],
)
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


# ---- hostile input: a few hundred generated configs, each a one-line ConfigError naming the key, or valid ----

BASE = {"output_dir": "out", "model": {"path": "m"}, "data": {"train": "rows.jsonl"}}
HOSTILE_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**31,
    2**63,
    -(2**63),
    10**40,
    0.0,
    -0.0,
    0.5,
    -1.5,
    1e-320,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "\x00",
    "x" * 5000,
    "all-linear",
    "auto",
    "cuda:999999",
    "(",
    "cosine",
    "skip",
    "\ud800",
    [],
    [1],
    [0.5, 0.5],
    ["a"],
    [[[]]],
    [0.9, 0.999, 0.1],
    {},
    {"a": 1},
    {"a": "b"},
    {"": ""},
    datetime.date(1979, 5, 27),
]


def _deep(n: int) -> list:
    value: list = []
    for _ in range(n):
        value = [value]
    return value


def _fields() -> list[tuple[str, str | None]]:
    out = []
    for section in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), section.name)
        if dataclasses.is_dataclass(default):
            out += [(section.name, f.name) for f in dataclasses.fields(default)]
        else:
            out.append((section.name, None))
    return out


def _mutate(rng: random.Random, data: dict) -> str:
    """Change one thing in `data`; returns the key an error about it must name."""
    kind = rng.random()
    section, key = rng.choice(_fields())
    value = rng.choice(HOSTILE_VALUES + [_deep(rng.choice([50, 5000]))])
    if kind < 0.08:
        data[rng.choice(["model", "train", "lora", "nonsense"])] = value
        return ""
    if kind < 0.16:
        target = section if key else "train"
        if not isinstance(data.get(target), dict):
            data[target] = {}
        data[target][rng.choice(["lrr", "Mode", "x"])] = value
        return ""
    if key is None:
        data[section] = value
        return section
    if not isinstance(data.get(section), dict):
        data[section] = {}
    data[section][key] = value
    return f"{section}.{key}"


def _assert_sane(config: TrainConfig) -> None:
    """What every accepted config satisfies, checked independently of the schema's code."""
    hints = {}
    for section in dataclasses.fields(TrainConfig):
        value = getattr(config, section.name)
        items = dataclasses.asdict(value).items() if dataclasses.is_dataclass(value) else [(section.name, value)]
        for name, v in items:
            hints[f"{section.name}.{name}"] = v
    for key, v in hints.items():
        assert not isinstance(v, float) or math.isfinite(v), key
        assert not isinstance(v, int) or isinstance(v, bool) or 0 <= v < 2**32, key
        assert not isinstance(v, str) or "\x00" not in v, key
    assert isinstance(hints["train.lr"], float) and hints["train.lr"] > 0
    assert 0 <= hints["lora.dropout"] < 1 and hints["lora.r"] >= 1 and hints["lora.alpha"] > 0
    assert len(config.train.betas) == 2 and all(isinstance(b, float) and 0 <= b < 1 for b in config.train.betas)
    assert config.train.mode in ("full", "lora", "qlora") and config.train.nan_policy in ("stop", "skip")
    assert config.data.batch_size >= 1 and config.train.grad_accum >= 1 and config.train.max_steps >= 1
    assert config.train.log_every >= 1 and config.checkpoint.keep_last >= 0 and config.output_dir
    assert config.lora.target_modules and (
        isinstance(config.lora.target_modules, str) or all(isinstance(t, str) for t in config.lora.target_modules)
    )
    assert all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in config.data.eval.items())


@pytest.mark.parametrize("seed", range(300))
def test_hostile_configs_are_one_line_errors_naming_the_key_or_sane(seed):
    rng = random.Random(seed)
    data = copy.deepcopy(BASE)
    keys = [_mutate(rng, data) for _ in range(1 if seed % 4 else rng.randint(2, 3))]
    try:
        config = config_from_dict(data)
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message and len(message) < 600, message
        if len(keys) == 1 and keys[0]:
            assert keys[0] in message, (keys, message)
        return
    _assert_sane(config)


@pytest.mark.parametrize("seed", range(40))
def test_hostile_overrides_on_the_command_line_exit_2_with_one_line(tmp_path, capsys, seed):
    rng = random.Random(1000 + seed)
    section, key = rng.choice([f for f in _fields() if f[1] is not None])
    literal = rng.choice(
        [
            "nan",
            "-inf",
            "99999999999999999999999",
            '"\\u0000"',
            "[[[[1]]]]",
            "{a = 1}",
            "1979-05-27",
            "-3",
            '""',
            "[]",
            "true",
            '"cuda:x"',
            "[" * 3000 + "]" * 3000,
            "0",
        ]
    )
    (tmp_path / "c.toml").write_text(
        f'output_dir = "{tmp_path / "out"}"\n[model]\npath = "m"\n[data]\ntrain = "rows.jsonl"\n'
    )
    override = f"{section}.{key}={literal}"
    try:
        load_config(tmp_path / "c.toml", [override])
    except ConfigError as err:
        assert main([str(tmp_path / "c.toml"), "--set", override]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"nibblora.train: error: {err}"]
        return
    pytest.skip(f"{override} is a valid config")  # the suite above checks accepted values are sane


def test_a_config_nested_100000_deep_is_one_config_error(tmp_path):
    (tmp_path / "c.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid TOML"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="data.eval: expected a table"):
        config_from_dict({"model": {"path": "m"}, "data": {"eval": _deep(100_000)}})


def test_apply_threads_sets_torch_threads_and_auto_follows_omp_num_threads(monkeypatch):
    import torch

    from nibblora.threads import apply_threads, default_threads

    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert default_threads() == 3 and apply_threads(0) == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
        assert default_threads() == 8  # an idle 16-core machine, two local ranks
        monkeypatch.setattr(os, "getloadavg", lambda: (12.4, 0.0, 0.0))
        assert default_threads() == 2  # 4 CPUs idle
        monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
        assert default_threads() == 1
        with pytest.raises(ValueError, match="threads must be"):
            apply_threads(-1)
    finally:
        torch.set_num_threads(before)
