"""nibblora.checkpoint reads config.json and safetensors files, single or sharded, and names what is wrong."""

import json

import pytest
import torch
from safetensors.torch import save_file

from nibblora.checkpoint import (
    CheckpointError,
    CheckpointFileNotFoundError,
    MissingTensorError,
    open_checkpoint,
    read_config,
)

TENSORS = {
    "model.embed_tokens.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
    "model.norm.weight": torch.ones(3, dtype=torch.bfloat16),
    "lm_head.weight": torch.full((4, 3), 2.0),
}
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def write_single(directory, tensors=TENSORS, config=CONFIG):
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors")
    return directory


def write_sharded(directory):
    (directory / "config.json").write_text(json.dumps(CONFIG))
    shards = {
        "model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.norm.weight"],
        "model-00002-of-00002.safetensors": ["lm_head.weight"],
    }
    weight_map = {}
    for file, names in shards.items():
        save_file({n: TENSORS[n] for n in names}, directory / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reads_every_tensor_with_its_dtype_and_values(tmp_path, layout):
    directory = write_single(tmp_path) if layout == "single" else write_sharded(tmp_path)
    with open_checkpoint(directory) as ckpt:
        assert ckpt.config == CONFIG
        assert sorted(ckpt.keys()) == sorted(TENSORS)
        assert len(ckpt) == 3 and "lm_head.weight" in ckpt and "nope" not in ckpt
        for name, expected in TENSORS.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)
        assert ckpt.shape_of("model.embed_tokens.weight") == [4, 3]


def test_sharded_checkpoint_lists_shards_and_maps_each_tensor_to_its_file(tmp_path):
    with open_checkpoint(write_sharded(tmp_path)) as ckpt:
        assert [f.name for f in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert ckpt.file_of("lm_head.weight").name == "model-00002-of-00002.safetensors"


def test_iter_tensors_yields_each_requested_tensor_once_grouped_by_file(tmp_path):
    with open_checkpoint(write_sharded(tmp_path)) as ckpt:
        names = [n for n, _ in ckpt.iter_tensors(["lm_head.weight", "model.norm.weight"])]
        everything = dict(ckpt.iter_tensors())
    assert names == ["model.norm.weight", "lm_head.weight"]  # shard 1 before shard 2
    assert sorted(everything) == sorted(TENSORS)


def test_missing_directory_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "absent")


def test_missing_config_json_names_the_file_and_directory(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFileNotFoundError, match=f"no config.json in {tmp_path}"):
        read_config(tmp_path)


def test_invalid_config_json_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_config(tmp_path)


def test_checkpoint_without_weights_lists_what_is_there_and_hints_at_bin_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointFileNotFoundError, match=r"no model.safetensors .*safe_serialization=True.*pytorch_model.bin"
    ):
        open_checkpoint(tmp_path)


def test_missing_tensor_error_names_the_key_and_is_a_key_error(tmp_path):
    with open_checkpoint(write_single(tmp_path)) as ckpt:
        with pytest.raises(KeyError) as info:
            ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert isinstance(info.value, MissingTensorError)
    assert str(info.value) == f"checkpoint {tmp_path} has no tensor 'model.layers.0.self_attn.q_proj.weight'"


def test_truncated_safetensors_file_is_named_when_opening(tmp_path):
    write_single(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match=rf"reading {path}: .*truncated or corrupt"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"],
    ids=["empty", "short", "huge-header-length", "garbage-header"],
)
def test_corrupt_safetensors_header_is_rejected_naming_the_file(tmp_path, payload):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        open_checkpoint(tmp_path)


def test_corrupt_shard_is_named(tmp_path):
    write_sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: not a valid safetensors file"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard_names_that_shard(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFileNotFoundError, match="shard model-00002-of-00002.safetensors does not exist"):
        open_checkpoint(tmp_path)


def test_index_placing_a_tensor_in_the_wrong_shard_is_an_error(tmp_path):
    write_sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match="places 'lm_head.weight' in model-00001-of-00002.safetensors, which lacks it"
    ):
        open_checkpoint(tmp_path)


def test_index_shard_names_may_not_leave_the_directory(tmp_path):
    write_sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not a plain file name"):
        open_checkpoint(tmp_path)


def test_index_without_weight_map_is_an_error(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="expected a 'weight_map' object"):
        open_checkpoint(tmp_path)


def _raw_safetensors(header: dict, data_len: int) -> bytes:
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + bytes(data_len)


@pytest.mark.parametrize(
    ("header", "data_len"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16),
    ],
    ids=["overlapping", "dtype-width-mismatch", "data-past-end", "trailing-bytes"],
)
def test_headers_whose_offsets_do_not_tile_the_buffer_are_rejected(tmp_path, header, data_len):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(_raw_safetensors(header, data_len))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        open_checkpoint(tmp_path)


def test_every_safetensors_dtype_and_odd_shapes_come_back_exactly(tmp_path):
    tensors = {
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(3).to(torch.float8_e4m3fn),
        "i64": torch.arange(5, dtype=torch.int64) - 2,
        "u32": torch.arange(4, dtype=torch.int32).view(torch.uint32),
        "bf16": torch.randn(2, 3, dtype=torch.bfloat16),
    }
    write_single(tmp_path, tensors)
    with open_checkpoint(tmp_path) as ckpt:
        for name, expected in tensors.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert bytes(got.reshape(-1).view(torch.uint8).numpy()) == bytes(
                expected.reshape(-1).view(torch.uint8).numpy()
            ), name
            assert (
                ckpt.entry(name).dtype
                == {
                    "empty": "F32",
                    "scalar": "F64",
                    "bool": "BOOL",
                    "f8": "F8_E4M3",
                    "i64": "I64",
                    "u32": "U32",
                    "bf16": "BF16",
                }[name]
            )


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    write_sharded(tmp_path)
    save_file(
        {"lm_head.weight": TENSORS["lm_head.weight"], "model.norm.weight": TENSORS["model.norm.weight"]},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' also appears in"):
        open_checkpoint(tmp_path)


def test_config_nested_too_deeply_is_one_line_not_a_recursion_error(tmp_path):
    write_single(tmp_path)
    (tmp_path / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_config(tmp_path)
