"""Reading the input checkpoint: config.json, the shard index, each shard's header, then one tensor at a time.

Tensors are read with plain `readinto` into a fresh buffer rather than through an mmap: a mapped shard's
touched pages count toward the process's resident memory until the file is closed, so reading a 5 GB shard
through `safetensors.safe_open` would hold 5 GB resident; reading each tensor into its own buffer holds one.
Headers are validated (dtype names, shapes, offsets that tile the data exactly, the file's size) before any
tensor byte is read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from nibblora.export import INDEX_NAME, SINGLE_NAME, ExportError, read_config_json
from nibblora.safetensors_writer import SAFETENSORS_DTYPES
_MAX_HEADER_BYTES = 100 << 20


class QuantizeError(ExportError):
    """A problem with the user's input (files, config, options): reported as one line, exit code 2."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the input: where its bytes are, and what they are."""

    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in `path`
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, str], list[SourceTensor]]:
    """(metadata, tensors in file order) of one safetensors file; every claim the header makes is checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantizeError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise QuantizeError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, "
                    f"file has {size})"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise QuantizeError(f"{path}: shard file is missing") from None
    except IsADirectoryError:
        raise QuantizeError(f"{path}: is a directory, expected a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizeError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise QuantizeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise QuantizeError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: list[SourceTensor] = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            ok = (
                dtype in SAFETENSORS_DTYPES
                and all(d >= 0 for d in shape)
                and 0 <= begin <= end
                and end - begin == prod(shape) * SAFETENSORS_DTYPES[dtype][1]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise QuantizeError(f"{path}: corrupt safetensors header entry for {name!r}: {info!r}"[:300])
        tensors.append(SourceTensor(name, dtype, shape, path, data_start + begin, end - begin))
    # The data buffer must be tiled exactly: no gaps, no overlaps, nothing past the end of the file.
    cursor = 0
    for t in sorted(tensors, key=lambda t: (t.offset, t.offset + t.nbytes)):
        begin = t.offset - data_start
        if begin != cursor:
            raise QuantizeError(f"{path}: corrupt safetensors header (tensor {t.name!r} overlaps or leaves a gap)")
        cursor = begin + t.nbytes
    if cursor != data_len:
        if cursor > data_len:
            raise QuantizeError(
                f"{path}: truncated safetensors file (header needs {cursor} data bytes, file holds {data_len})"
            )
        raise QuantizeError(f"{path}: corrupt safetensors file ({data_len - cursor} bytes past the last tensor)")
    return {str(k): str(v) for k, v in metadata.items()}, sorted(tensors, key=lambda t: t.offset)


def read_tensor(tensor: SourceTensor) -> torch.Tensor:
    """Load one tensor into its own (anonymous) memory."""
    dtype = SAFETENSORS_DTYPES[tensor.dtype][0]
    out = torch.empty(tensor.shape, dtype=dtype)
    if tensor.nbytes:
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(tensor.path, "rb") as f:
            f.seek(tensor.offset)
            got = f.readinto(buffer)
        if got != tensor.nbytes:
            raise QuantizeError(f"{tensor.path}: truncated while reading {tensor.name!r}")
    return out


def load_config(model_dir: Path) -> dict[str, object]:
    """config.json of a causal LM that is not already quantized."""
    path = model_dir / "config.json"
    config = read_config_json(model_dir)
    if not config.get("model_type"):
        raise QuantizeError(f"{path}: no model_type; only causal language models (…ForCausalLM) are supported")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise QuantizeError(
            f"{path}: architectures {architectures!r} name no causal LM (…ForCausalLM); "
            "only causal language models are supported"
        )
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise QuantizeError(f"{path}: checkpoint is already quantized (quantization_config, quant_method {method!r})")
    return config


def list_shards(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files to read, and the index's weight_map (None for a single model.safetensors)."""
    index_path = model_dir / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise QuantizeError(f"{index_path}: not a valid shard index ({type(err).__name__}: {err})") from None
        shards: list[Path] = []
        for name in dict.fromkeys(weight_map.values()):
            if os.sep in name or name.startswith("..") or "/" in name:
                raise QuantizeError(f"{index_path}: shard name {name!r} points outside the model folder")
            shard = model_dir / name
            if not shard.is_file():
                raise QuantizeError(f"{shard}: shard listed in {INDEX_NAME} is missing")
            shards.append(shard)
        return shards, weight_map
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single], None
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        raise QuantizeError(f"{model_dir}: {len(others)} safetensors files ({others[0]}, …) but no {INDEX_NAME}")
    raise QuantizeError(f"{model_dir}: no {SINGLE_NAME} and no {INDEX_NAME} (only safetensors checkpoints are read)")


def read_checkpoint(model_dir: Path) -> tuple[dict[str, object], list[SourceTensor]]:
    """(config, every tensor in shard order then file order). Checks the index against the shards' headers."""
    if not model_dir.is_dir():
        raise QuantizeError(f"{model_dir}: model folder does not exist")
    config = load_config(model_dir)
    shards, weight_map = list_shards(model_dir)
    tensors: list[SourceTensor] = []
    seen: dict[str, Path] = {}
    for shard in shards:
        _, found = read_header(shard)
        for t in found:
            if t.name in seen:
                raise QuantizeError(f"{shard}: tensor {t.name!r} also appears in {seen[t.name].name}")
            seen[t.name] = shard
        tensors.extend(found)
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in seen:
                raise QuantizeError(f"{model_dir / file}: missing tensor {name!r} listed in {INDEX_NAME}")
            if seen[name].name != file:
                raise QuantizeError(f"{INDEX_NAME}: {name!r} is listed in {file} but found in {seen[name].name}")
    if not tensors:
        raise QuantizeError(f"{model_dir}: checkpoint holds no tensors")
    return config, tensors
