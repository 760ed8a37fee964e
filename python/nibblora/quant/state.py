"""The quantized-weight containers: packed 4-bit codes plus the state needed to undo the quantization."""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

import torch

from nibblora.dtypes import COMPUTE_DTYPE_NAMES
from nibblora.quant.names import NESTED_BLOCKSIZE, QUANT_TYPES  # noqa: F401 (re-exported)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16' or 'float16' (the spelling bitsandbytes writes in its JSON state)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if name in COMPUTE_DTYPE_NAMES else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}: expected float32, bfloat16 or float16")
    return dtype


@dataclass
class QuantState:
    """How a 4-bit tensor was quantized.

    absmax: float32 [blocks] scales, or uint8 [blocks] dynamic-map codes when double-quantized (then `offset`,
    `nested_absmax` float32 [ceil(blocks / 256)] and `nested_code` float32 [256] are set).
    code: float32 [16], the value of each 4-bit code.
    """

    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: torch.Size
    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> QuantState:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            absmax=move(self.absmax),
            code=move(self.code),
            offset=move(self.offset),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    def absmax_float32(self) -> torch.Tensor:
        """The per-block float32 scales, decoding the double quantization if there is one."""
        if not self.double_quant:
            return self.absmax
        from nibblora.quant.api import dequantize_absmax

        return dequantize_absmax(self)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantization constants (not of the packed codes)."""
        tensors = [self.absmax, self.code, self.offset, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def constant_bytes(self) -> int:
        """Bytes that scale with the tensor (absmax and nested absmax), not the fixed tables."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.nested_absmax is not None:
            total += self.nested_absmax.numel() * 4 + 4
        return total


@dataclass
class QuantizedTensor:
    """A 4-bit tensor: `packed` uint8 [(n + 1) // 2, 1] (bitsandbytes' layout) and its `state`."""

    packed: torch.Tensor
    state: QuantState

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tensor had before quantization (and dequantizes to by default)."""
        return self.state.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def quant_type(self) -> str:
        return self.state.quant_type

    def numel(self) -> int:
        return self.state.numel

    @property
    def nbytes(self) -> int:
        """Storage actually needed per tensor: packed codes plus scales (shared code tables excluded)."""
        return self.packed.numel() + self.state.constant_bytes()

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel()

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.packed.to(device), self.state.to(device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from nibblora.quant.api import dequantize_4bit

        return dequantize_4bit(self, dtype)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.state.double_quant else ""
        return (
            f"QuantizedTensor({self.quant_type}, shape={tuple(self.shape)}, dtype={dtype_name(self.dtype)}, "
            f"blocksize={self.state.blocksize}{dq}, device={self.device})"
        )
