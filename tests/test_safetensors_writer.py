"""nibblora.checkpoint.writer: a planned layout, tensors written one at a time, files safetensors reads back."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nibblora.checkpoint.writer import DeferredSpec, SafetensorsWriter, TensorSpec
from nibblora.dtypes import safetensors_dtype


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "a": torch.arange(5, dtype=torch.uint8),
        "c": torch.tensor([1.0, -2.5, 3.25], dtype=torch.float32),
        "z": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "h": torch.tensor([[1, 2], [3, 4]], dtype=torch.float16),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, safetensors_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()]


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def test_file_is_byte_identical_to_safetensors_save_file_whatever_the_write_order(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    with SafetensorsWriter(tmp_path / "ours.safetensors", _specs(tensors), metadata={"format": "pt"}) as out:
        for name in ["c", "h", "a", "z", "empty", "b"]:
            out.write(name, tensors[name])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_tensors_read_back_equal_with_safe_open(tmp_path):
    tensors = _tensors()
    with SafetensorsWriter(tmp_path / "x.safetensors", _specs(tensors)) as out:
        for name, value in tensors.items():
            out.write(name, value)
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype
        assert torch.equal(loaded[name], value)


def test_non_contiguous_tensor_is_written_in_row_major_order(tmp_path):
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("t", "F32", (4, 3))]) as out:
        out.write("t", value)
    assert torch.equal(load_file(tmp_path / "x.safetensors")["t"], value.contiguous())


def test_deferred_tensor_goes_last_and_header_is_padded_to_the_reserved_size(tmp_path):
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(
        path, [TensorSpec("w", "F32", (2,))], deferred=[DeferredSpec("meta", "U8", max_numel=1000)]
    ) as out:
        out.write("meta", torch.tensor(list(b'{"k": 1}'), dtype=torch.uint8))
        out.write("w", torch.tensor([1.0, 2.0]))
    n, header = _header(path)
    assert n % 8 == 0
    assert header["w"]["data_offsets"] == [0, 8]
    assert header["meta"] == {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]}
    assert path.stat().st_size == 8 + n + 16
    with safe_open(path, "pt") as f:
        assert bytes(f.get_tensor("meta").numpy()) == b'{"k": 1}'
        assert f.get_tensor("w").tolist() == [1.0, 2.0]


def test_copy_from_copies_bytes_from_another_file_without_loading(tmp_path):
    source = tmp_path / "src.bin"
    payload = torch.arange(1000, dtype=torch.float32)
    source.write_bytes(b"xyz" + payload.numpy().tobytes())
    with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("p", "F32", (1000,))]) as out:
        with open(source, "rb") as f:
            out.copy_from("p", f, offset=3)
    assert torch.equal(load_file(tmp_path / "x.safetensors")["p"], payload)


def test_copy_from_falls_back_to_chunked_reads_for_files_without_a_descriptor(tmp_path):
    import io

    payload = torch.arange(100, dtype=torch.int32)
    with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("p", "I32", (100,))]) as out:
        out.copy_from("p", io.BytesIO(b"\0" * 4 + payload.numpy().tobytes()), offset=4, chunk_bytes=64)
    assert torch.equal(load_file(tmp_path / "x.safetensors")["p"], payload)


def test_close_with_unwritten_tensors_raises_and_removes_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    out = SafetensorsWriter(path, [TensorSpec("a", "F32", (1,)), TensorSpec("b", "F32", (1,))])
    out.write("a", torch.ones(1))
    with pytest.raises(ValueError, match=r"closed before 1 planned tensors were written: b"):
        out.close()
    assert not path.exists()


def test_exception_inside_with_block_removes_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, [TensorSpec("a", "F32", (1,))]) as out:
            out.write("a", torch.ones(1))
            raise RuntimeError("boom")
    assert not path.exists()


def test_write_rejects_a_tensor_unlike_its_plan(tmp_path):
    with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2, 2))]) as out:
        with pytest.raises(ValueError, match=r"a: planned F32 \[2, 2\], got BF16 \[2, 2\]"):
            out.write("a", torch.zeros(2, 2, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match=r"a: planned F32 \[2, 2\], got F32 \[4\]"):
            out.write("a", torch.zeros(4))
        out.write("a", torch.zeros(2, 2))


def test_write_rejects_unplanned_and_repeated_names(tmp_path):
    with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (1,))]) as out:
        with pytest.raises(KeyError, match="not planned"):
            out.write("nope", torch.zeros(1))
        out.write("a", torch.zeros(1))
        with pytest.raises(ValueError, match="a: written twice"):
            out.write("a", torch.zeros(1))


def test_deferred_tensor_longer_than_reserved_is_rejected(tmp_path):
    with SafetensorsWriter(tmp_path / "x.safetensors", [], deferred=[DeferredSpec("m", "U8", 4)]) as out:
        with pytest.raises(ValueError, match="at most 4 elements"):
            out.write("m", torch.zeros(5, dtype=torch.uint8))
        out.write("m", torch.zeros(4, dtype=torch.uint8))


def test_duplicate_names_are_rejected_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"tensor names repeat: \['a'\]"):
        SafetensorsWriter(
            tmp_path / "x.safetensors", [TensorSpec("a", "F32", (1,))], deferred=[DeferredSpec("a", "U8", 1)]
        )
    assert not (tmp_path / "x.safetensors").exists()
