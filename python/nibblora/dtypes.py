"""Dtype names, defined once: safetensors' spellings ("BF16"), their widths, and the torch names ("bfloat16").

    safetensors_dtype(torch.bfloat16) == "BF16"      torch_dtype("BF16") is torch.bfloat16
    ITEMSIZE["F32"] == 4                             TORCH_NAME_TO_SAFETENSORS["float16"] == "F16"

The tables are plain strings so that importing this module does not import torch; the two converters that need
torch import it when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Every dtype the safetensors format names, with its width in bytes (the Rust reader accepts the same set).
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# safetensors name -> torch attribute name.
_TORCH_ATTR: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# The float dtypes a model's weights are computed in: what merge writes, what 4-bit quantization reads, what
# bnb_4bit_compute_dtype and config.json's torch_dtype say.
TORCH_NAME_TO_SAFETENSORS: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
SAFETENSORS_TO_TORCH_NAME: dict[str, str] = {v: k for k, v in TORCH_NAME_TO_SAFETENSORS.items()}
FLOAT_DTYPES: tuple[str, ...] = tuple(TORCH_NAME_TO_SAFETENSORS.values())  # ("F32", "BF16", "F16")
COMPUTE_DTYPE_NAMES: tuple[str, ...] = tuple(TORCH_NAME_TO_SAFETENSORS)  # ("float32", "bfloat16", "float16")
# Bytes per element of each compute dtype, by its torch name.
COMPUTE_DTYPE_BYTES: dict[str, int] = {name: ITEMSIZE[st] for name, st in TORCH_NAME_TO_SAFETENSORS.items()}
# Floating point in any width: a weight stored as one of these is a real number, never a code or an index.
ANY_FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name; ValueError for a name safetensors does not define."""
    try:
        return ITEMSIZE[name]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {name!r}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16" -> torch.bfloat16)."""
    import torch

    attr = _TORCH_ATTR.get(name)
    if attr is None or not hasattr(torch, attr):
        raise ValueError(f"safetensors dtype {name!r} has no torch equivalent in this torch version")
    return getattr(torch, attr)  # type: ignore[no-any-return]


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a compute dtype's torch name ("bfloat16" -> torch.bfloat16); ValueError for another."""
    if name not in TORCH_NAME_TO_SAFETENSORS:
        raise ValueError(f"unknown dtype name {name!r}: expected {', '.join(COMPUTE_DTYPE_NAMES)}")
    return torch_dtype(TORCH_NAME_TO_SAFETENSORS[name])


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype ("BF16" for torch.bfloat16)."""
    import torch

    for name, attr in _TORCH_ATTR.items():
        if getattr(torch, attr, None) == dtype:
            return name
    raise ValueError(f"safetensors cannot store {dtype}")
