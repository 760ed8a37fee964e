"""quantize_4bit / dequantize_4bit: CPU tensors go to the Rust core, CUDA tensors use plain PyTorch ops."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from nibblora import _native
from nibblora.errors import InputError
from nibblora.quant import torch_ops
from nibblora.quant.names import BLOCKSIZES
from nibblora.quant.state import (
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    SUPPORTED_DTYPES,
    QuantizedTensor,
    QuantState,
    dtype_name,
)


@cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    return torch.tensor(_native.code_table(quant_type), dtype=torch.float32)


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [16]: the value of each stored 4-bit code of `quant_type` ("nf4", "fp4" or "int4"; anything else
    raises InputError, from the Rust core's conversion of the name)."""
    return _code_cpu(quant_type).to(device)


@cache
def _dynamic_map_cpu() -> torch.Tensor:
    return torch.from_numpy(_native.dynamic_map())


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [256]: bitsandbytes' signed 8-bit dynamic map, used to double-quantize block scales."""
    return _dynamic_map_cpu().to(device)


def _numpy_view(flat: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous 1-D CPU tensor; 16-bit floats travel as their uint16 bits."""
    if flat.dtype == torch.float32:
        return flat.numpy()
    return flat.view(torch.int16).numpy().view(np.uint16)


def quantize_4bit(
    tensor: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    name: str | None = None,
) -> QuantizedTensor:
    """Quantize `tensor` (float32, bfloat16 or float16; any shape) to blockwise 4-bit.

    The bytes equal bitsandbytes' `quantize_4bit(tensor, blocksize, compress_statistics=double_quant,
    quant_type)`. CPU tensors are read by the Rust core without a copy when contiguous (a non-contiguous
    tensor is copied once); CUDA tensors are quantized with PyTorch ops on the device. `name` only labels
    error messages.
    """
    label = f"tensor {name!r}" if name else "tensor"
    code = code_table(quant_type)  # checks the name (InputError) on every device
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize_4bit expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{label} has dtype {dtype_name(tensor.dtype)}; 4-bit quantization reads float32, bfloat16 or float16"
        )
    if tensor.numel() == 0:
        raise InputError(f"{label} is empty (shape {tuple(tensor.shape)}); there is nothing to quantize")
    if blocksize not in BLOCKSIZES:
        raise InputError(f"blocksize {blocksize} is not supported: use a power of two from 32 to 4096 (default 64)")
    flat = tensor.detach().reshape(-1)
    if flat.device.type == "cpu":
        flat = flat.contiguous()
        try:
            packed_np, absmax_np = _native.quantize_4bit(
                _numpy_view(flat), dtype_name(flat.dtype), quant_type, blocksize
            )
        except InputError as err:  # the core's message, with the tensor's name in front
            raise type(err)(f"{label}: {err}") from None
        packed, absmax = torch.from_numpy(packed_np), torch.from_numpy(absmax_np)
    else:
        if not torch.isfinite(flat).all():
            index = int((~torch.isfinite(flat)).nonzero()[0])
            raise InputError(f"{label}: holds a non-finite value (NaN or infinity) at flat index {index}")
        packed, absmax = torch_ops.quantize_4bit_flat(flat, code.to(flat.device), blocksize)
    device = flat.device
    state = QuantState(
        quant_type=quant_type,
        blocksize=blocksize,
        dtype=tensor.dtype,
        shape=tensor.shape,
        absmax=absmax,
        code=code.to(device),
    )
    if double_quant:
        state = _double_quantize(state)
    return QuantizedTensor(packed.view(-1, 1), state)


def _double_quantize(state: QuantState) -> QuantState:
    absmax = state.absmax
    # torch's float32 mean, exactly as bitsandbytes computes the offset.
    offset = absmax.mean()
    dmap = dynamic_map(absmax.device)
    if absmax.device.type == "cpu":
        codes_np, nested_np, _ = _native.double_quantize(absmax.numpy(), float(offset))
        codes, nested = torch.from_numpy(codes_np), torch.from_numpy(nested_np)
    else:
        codes, nested = torch_ops.double_quantize(absmax, offset, dmap, NESTED_BLOCKSIZE)
    state.absmax = codes
    state.offset = offset
    state.nested_absmax = nested
    state.nested_code = dmap
    return state


def set_output_pool_limit(limit_bytes: int) -> None:
    """How much freed CPU dequantization output nibblora keeps for reuse (default 1 GiB; 0 turns it off).

    Dequantizing a large weight into fresh memory costs more in page faults than the work itself, and a QLoRA
    layer dequantizes the same weight on every call. Freed results (once every tensor viewing them is gone)
    go back to a small pool of at most 8 buffers, like PyTorch's CUDA caching allocator."""
    if limit_bytes < 0:
        raise InputError(f"limit_bytes must be >= 0, got {limit_bytes}")
    _native.set_output_pool_limit(int(limit_bytes))


def output_pool_stats() -> dict[str, int]:
    """{"buffers": cached buffers, "bytes": bytes cached, "limit_bytes": the limit} of the dequantization pool."""
    buffers, cached, limit = _native.output_pool_stats()
    return {"buffers": buffers, "bytes": cached, "limit_bytes": limit}


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """float32 [blocks] scales of a double-quantized state."""
    assert state.nested_absmax is not None and state.offset is not None and state.nested_code is not None
    if state.absmax.device.type == "cpu" and torch.equal(state.nested_code, _dynamic_map_cpu()):
        out = _native.dequantize_absmax(
            state.absmax.contiguous().numpy(), state.nested_absmax.contiguous().numpy(), float(state.offset)
        )
        return torch.from_numpy(out)
    return torch_ops.dequantize_absmax(
        state.absmax, state.nested_absmax, state.offset, state.nested_code, state.nested_blocksize
    )


def dequantize_4bit(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo `quantize_4bit`: a tensor of the original shape in `dtype` (default: the original dtype).

    Each value is `code[q] * absmax` in float32, then rounded to `dtype`, as bitsandbytes does. CPU: Rust, into
    a pooled buffer (reused once torch drops the result) handed to torch without a copy. CUDA: a table lookup
    and a multiply in PyTorch ops.
    """
    state = q.state
    dtype = dtype or state.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"cannot dequantize to {dtype_name(dtype)}: use float32, bfloat16 or float16")
    n = state.numel
    absmax = state.absmax_float32()
    # Only CPU tensors go to Rust (and only with the standard table); checking the table of a CUDA state here
    # would cost a device sync on every call.
    on_cpu = q.packed.device.type == "cpu"
    if on_cpu and state.quant_type in QUANT_TYPES and torch.equal(state.code, _code_cpu(state.quant_type)):
        packed_np = q.packed.reshape(-1).contiguous().numpy()
        absmax_np = absmax.contiguous().numpy()
        result = _native.dequantize_4bit(packed_np, absmax_np, state.quant_type, state.blocksize, n, dtype_name(dtype))
        flat = torch.from_numpy(result)
        flat = flat if dtype == torch.float32 else flat.view(dtype)
        return flat.view(state.shape)
    code = _device_code(state, q.packed.device)
    result = torch_ops.dequantize_4bit_flat(q.packed, absmax, code, state.blocksize, n, dtype)
    return result.view(state.shape)


def dequantize_4bit_part(
    q: QuantizedTensor,
    rows: tuple[int, int],
    columns: tuple[int, int] | None,
    dtype: torch.dtype,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """A block [rows[0]:rows[1], columns[0]:columns[1]] of a 2-D 4-bit weight in `dtype` (columns None: all): the
    same values as `dequantize_4bit(q, dtype)[r0:r1, c0:c1]` without dequantizing the rest (the Rust kernel over
    the block's own codes and scales).

    None where that cannot be done: a tensor off the CPU, a non-standard code table, an unsupported dtype, or bounds
    off the quantization blocks. All columns: row r0 must start a block, and r1 end one or be the last row. A
    column range: every row must start a block (columns a multiple of the blocksize) and c0, c1 be multiples of it.
    absmax: `q.state.absmax_float32()` computed once by the caller. out: a contiguous CPU tensor of `dtype` with at
    least that many elements to write into (its start is returned, shaped); without it the result is new.
    """
    state = q.state
    if len(state.shape) != 2 or dtype not in SUPPORTED_DTYPES:
        return None
    height, width = state.shape
    (r0, r1), (c0, c1) = rows, columns or (0, width)
    if not (0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width):
        return None
    if q.packed.device.type != "cpu" or state.quant_type not in QUANT_TYPES:
        return None
    if not torch.equal(state.code, _code_cpu(state.quant_type)):
        return None
    bs = state.blocksize
    absmax = (state.absmax_float32() if absmax is None else absmax).reshape(-1)
    codes = q.packed.reshape(-1)
    if (c0, c1) == (0, width):
        first, end = r0 * width, r1 * width
        if first % bs or (end % bs and r1 != height):
            return None
        packed_np = codes[first // 2 : (end + 1) // 2].contiguous().numpy()
        scales_np = absmax[first // bs : -(-end // bs)].contiguous().numpy()
    else:
        if width % bs or c0 % bs or c1 % bs:
            return None
        # Each row's part is whole blocks: gather the rows' codes and scales (an eighth of the output's bytes).
        packed_np = codes.view(height, width // 2)[r0:r1, c0 // 2 : c1 // 2].contiguous().numpy().reshape(-1)
        scales_np = absmax.view(height, width // bs)[r0:r1, c0 // bs : c1 // bs].contiguous().numpy().reshape(-1)
    count = (r1 - r0) * (c1 - c0)
    if out is None:
        out = torch.empty(count, dtype=dtype)
    elif out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu" or out.numel() < count:
        raise InputError(f"out must be a contiguous CPU {dtype_name(dtype)} tensor of at least {count} elements")
    flat = out.reshape(-1)[:count]
    target = flat.numpy() if dtype == torch.float32 else flat.view(torch.uint16).numpy()
    _native.dequantize_4bit_to(packed_np, scales_np, state.quant_type, bs, target, dtype_name(dtype))
    return flat.view(r1 - r0, c1 - c0)


def _device_code(state: QuantState, device: torch.device) -> torch.Tensor:
    """The code table as bitsandbytes' device kernel applies it. Its CUDA dequantizer multiplies every FP4
    value by the sign of bit 3, so code 8 ("-0": a tiny negative value) gives -0.0 where the stored table (and
    bitsandbytes' CPU path, like our Rust one) gives +0.0; codes 8..15 are the negative half."""
    code = state.code.to(device)
    if state.quant_type == "fp4" and device.type == "cuda":
        code = code.clone()
        code[8:] = -code[8:].abs()
    return code
