"""The Rust core's errors arrive as nibblora.errors classes (one mapping, rust/python/src/errors.rs), enum
arguments are converted once in the binding, and the native module carries Cargo's version."""

from __future__ import annotations

import datetime
import json
import struct
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from helpers_data import byte_level_tokenizer

from nibblora import _native
from nibblora.errors import (
    CheckpointError,
    CheckpointFileNotFoundError,
    DataError,
    DataFileNotFoundError,
    InputError,
    OutputError,
)

ROOT = Path(__file__).resolve().parents[1]


def _safetensors(path: Path, header: str, data: bytes = b"") -> Path:
    blob = header.encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_checkpoint_files_raise_checkpoint_errors_that_builtin_handlers_still_catch(tmp_path):
    with pytest.raises(CheckpointFileNotFoundError, match="reading safetensors: .*missing.safetensors: no such file"):
        _native.SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        _native.SafetensorsFile(tmp_path / "missing.safetensors")
    bad = _safetensors(
        tmp_path / "bad.safetensors", '{"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,4]}}', b"\0" * 4
    )
    with pytest.raises(CheckpointError, match=r'bad\.safetensors: tensor "a": BF16 \[4\] needs 8 bytes'):
        _native.SafetensorsFile(bad)
    with pytest.raises(ValueError):
        _native.SafetensorsFile(bad)
    with pytest.raises(CheckpointError, match="is a folder"):
        _native.SafetensorsFile(tmp_path)


def test_a_header_nested_100000_deep_is_a_checkpoint_error(tmp_path):
    deep = _safetensors(tmp_path / "deep.safetensors", '{"t":' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="recursion limit exceeded"):
        _native.SafetensorsFile(deep)
    sub_byte = _safetensors(
        tmp_path / "f4.safetensors", '{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', b"\0\0"
    )
    with pytest.raises(CheckpointError, match='tensor "a": dtype F4 packs elements below a byte'):
        _native.SafetensorsFile(sub_byte)


def test_enum_arguments_are_converted_once_with_input_errors():
    with pytest.raises(InputError, match='unknown quant_type "nf5"'):
        _native.code_table("nf5")
    values = np.zeros(64, dtype=np.float32)
    with pytest.raises(InputError, match='unsupported dtype "float64"'):
        _native.quantize_4bit(values, "float64", "nf4", 64)
    with pytest.raises(InputError, match='unknown safetensors dtype "F33"'):
        _native.merge_array(np.zeros(4, dtype=np.uint8), "F33", [1, 1], "F32", [])
    assert not hasattr(_native, "dequantize_4bit_into")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("bytebpe"))


def test_data_pipeline_errors_are_data_errors_and_writes_are_output_errors(tok_dir, tmp_path):
    tokenizer = str(tok_dir / "tokenizer.json")
    template = _native.named_template_source("chatml")
    with pytest.raises(DataError, match='train-on policy "everything" is not known'):
        _native.DataPipeline(tokenizer, template, [], "everything")
    with pytest.raises(DataFileNotFoundError, match="no such file"):
        _native.DataPipeline(str(tmp_path / "none.json"), template, [])
    pipe = _native.DataPipeline(tokenizer, template, [])
    rows = ("rows", "input", [json.dumps({"text": "hello"})])
    with pytest.raises(DataError, match='truncation policy "middle" is not known'):
        pipe.prepare([rows], str(tmp_path), truncation="middle")
    with pytest.raises(DataError, match='source kind "parquet" is not known'):
        pipe.prepare([("parquet", "x.parquet")], str(tmp_path))
    with pytest.raises(OutputError, match="writing .*no/such/folder"):
        pipe.prepare([rows], str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(OSError):
        pipe.prepare([rows], str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(DataError, match="reading the row"):
        pipe.encode("{not json")

    def interrupt(stats):
        raise KeyboardInterrupt

    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        pipe.prepare([rows], str(tmp_path / "out"), progress=interrupt)


def test_the_version_is_cargos():
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert _native.__version__ == cargo["workspace"]["package"]["version"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]


def test_strftime_now_is_local_time_as_transformers(tok_dir, monkeypatch):
    if not Path("/usr/share/zoneinfo/Asia/Kolkata").exists():
        pytest.skip("no tz database to set a non-UTC local time")
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30: local time differs from UTC in hour and minute
    time.tzset()
    pipe = _native.DataPipeline(str(tok_dir / "tokenizer.json"), "{{ strftime_now('%Y-%m-%d %H:%M %Z') }}", [])
    before = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    text = pipe.render(json.dumps([{"role": "user", "content": "x"}]))[0]
    after = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    assert text.rsplit(" ", 1)[0] in (before, after), text
    monkeypatch.delenv("TZ")
    time.tzset()
