"""Hostile inputs to quantize and to merge's base checkpoint (corrupt or hostile safetensors headers, config.json,
shard indexes, 4-bit quant states), generated from a seed: every one is either refused with a one-line error of
nibblora's own exception types, leaving neither an output nor a temporary folder, or accepted with an output the
one checkpoint reader reads back. A sample runs through the command lines: exit 2, one line on stderr."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_checkpoint import (
    CONFIG_TEXTS,
    FILE_EDITS,
    INDEX_TEXTS,
    leftovers,
    small_tensors,
    write_adapter,
    write_checkpoint,
)
from safetensors.torch import load_file, save_file

from nibblora.checkpoint import open_checkpoint
from nibblora.errors import InputError, NibbloraError
from nibblora.merge import merge_checkpoint
from nibblora.quantize import quantize_checkpoint

SEED = 20261130
FILE_CASES_PER_EDIT = 8  # 22 edits x 8 seeds x 2 tools


def _quantize(model: Path, out: Path) -> None:
    quantize_checkpoint(model, out, progress=False)


def _merge(model: Path, out: Path) -> None:
    merge_checkpoint(model, [_ADAPTER[0]], out, progress=False)


_ADAPTER: list[Path] = []
TOOLS = {"quantize": _quantize, "merge": _merge}


@pytest.fixture(scope="module", autouse=True)
def adapter(tmp_path_factory):
    _ADAPTER[:] = [write_adapter(tmp_path_factory.mktemp("adapter") / "a")]


def _outcome(tool: str, model: Path, out: Path) -> str:
    """'refused' (one-line InputError, nothing left behind) or 'accepted' (output readable); anything else fails."""
    try:
        TOOLS[tool](model, out)
    except NibbloraError as err:
        message = str(err)
        assert isinstance(err, InputError), f"{type(err).__name__}: {message}"
        assert message and "\n" not in message and len(message) < 2000, message
        assert leftovers(out) == [], leftovers(out)
        return "refused"
    with open_checkpoint(out) as ckpt:  # what a tool accepts, it writes readably
        for name in ckpt.keys():
            ckpt.get_tensor(name)
    assert leftovers(out) == [out.name]
    return "accepted"


def _file_cases() -> list[tuple[str, str, int]]:
    return [(tool, edit, i) for tool in TOOLS for edit in FILE_EDITS for i in range(FILE_CASES_PER_EDIT)]


# Edits that no reader may accept, whatever the seed.
ALWAYS_REFUSED = set(FILE_EDITS) - {"flip_header_bytes", "header_len"}


@pytest.mark.parametrize(("tool", "edit", "i"), _file_cases(), ids=lambda v: str(v))
def test_hostile_safetensors_file_is_refused_in_one_line_leaving_nothing(tool, edit, i, tmp_path):
    rng = random.Random(f"{SEED}-{tool}-{edit}-{i}")
    model = write_checkpoint(tmp_path / "m", small_tensors(seed=i), shards=1 + i % 2)
    shard = rng.choice(sorted(model.glob("*.safetensors")))
    shard.write_bytes(FILE_EDITS[edit](shard.read_bytes(), rng))
    outcome = _outcome(tool, model, tmp_path / "out")
    if edit in ALWAYS_REFUSED:
        assert outcome == "refused"


@pytest.mark.parametrize(("tool", "case"), [(t, c) for t in TOOLS for c in CONFIG_TEXTS])
def test_hostile_config_json_is_refused_in_one_line(tool, case, tmp_path):
    model = write_checkpoint(tmp_path / "m")
    text = CONFIG_TEXTS[case](random.Random(f"{SEED}-{case}"))
    (model / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    # Odd but well-formed configs that a tool has no reason to refuse (merge takes any architecture).
    acceptable = {
        ("quantize", "lone_surrogate_values"),
        ("merge", "lone_surrogate_values"),
        ("merge", "architectures_huge"),
    }
    outcome = _outcome(tool, model, tmp_path / "out")
    assert outcome == "refused" or (tool, case) in acceptable


@pytest.mark.parametrize(("tool", "case"), [(t, c) for t in TOOLS for c in INDEX_TEXTS])
def test_hostile_shard_index_is_refused_in_one_line(tool, case, tmp_path):
    model = write_checkpoint(tmp_path / "m", small_tensors(layers=2), shards=2)
    index = model / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(INDEX_TEXTS[case](weight_map, random.Random(f"{SEED}-{case}")))
    assert _outcome(tool, model, tmp_path / "out") == "refused"


def _quant_state_edits() -> dict[str, bytes]:
    good = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 8]}
    edits = {
        "garbage": b"\xff\xfe\x00not json",
        "list": b"[1, 2, 3]",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "shape_strings": json.dumps({**good, "shape": ["8", "8"]}).encode(),
        "shape_floats": json.dumps({**good, "shape": [8.0, 8.0]}).encode(),
        "shape_3d": json.dumps({**good, "shape": [2, 4, 8]}).encode(),
        "shape_wrong_size": json.dumps({**good, "shape": [16, 16]}).encode(),
        "blocksize_string": json.dumps({**good, "blocksize": "64"}).encode(),
        "blocksize_odd": json.dumps({**good, "blocksize": 48}).encode(),
        "quant_type_int4": json.dumps({**good, "quant_type": "int4"}).encode(),
        "dtype_unknown": json.dumps({**good, "dtype": "float64"}).encode(),
        "no_fields": b"{}",
    }
    return edits


@pytest.mark.parametrize("case", list(_quant_state_edits()))
def test_hostile_4bit_quant_state_in_a_merge_base_is_refused(case, tmp_path):
    model = write_checkpoint(tmp_path / "m")
    quantize_checkpoint(model, tmp_path / "q4", compute_dtype="float32", double_quant=False, progress=False)
    shard = tmp_path / "q4" / "model.safetensors"
    tensors = load_file(shard)
    key = next(k for k in tensors if k.startswith("model.layers.0.self_attn.q_proj.weight.quant_state."))
    tensors[key] = torch.frombuffer(bytearray(_quant_state_edits()[case]), dtype=torch.uint8)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert _outcome("merge", tmp_path / "q4", tmp_path / "out") == "refused"


def test_integer_base_weight_is_refused_by_merge_naming_the_tensor(tmp_path):
    tensors = small_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.full((16, 8), 1_234_567_890, dtype=torch.int32)
    model = write_checkpoint(tmp_path / "m", tensors)
    for quantize in (None, "nf4"):
        with pytest.raises(InputError, match=r"'model.layers.0.mlp.up_proj.weight' has dtype I32; a weight must"):
            merge_checkpoint(model, [_ADAPTER[0]], tmp_path / "out", quantize=quantize, progress=False)
        assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("prog", "edit"),
    [("nibblora.quantize", "lone_surrogate_name"), ("nibblora.merge", "float_shape")],
)
def test_cli_sample_exits_2_with_one_line_and_leaves_nothing(prog, edit, tmp_path):
    model = write_checkpoint(tmp_path / "m")
    shard = model / "model.safetensors"
    shard.write_bytes(FILE_EDITS[edit](shard.read_bytes(), random.Random(SEED)))
    out = tmp_path / "out"
    args = (
        ["--model", str(model)] if prog.endswith("quantize") else ["--base", str(model), "--adapter", str(_ADAPTER[0])]
    )
    result = subprocess.run(
        [sys.executable, "-m", prog, *args, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{prog}: error: reading {shard}: ")
    assert result.stdout == ""
    assert leftovers(out) == []
