"""4-bit quantization in plain PyTorch ops: the path for CUDA tensors (and a cross-check of the Rust path).

It follows bitsandbytes' reference semantics exactly: reciprocal scaling for full blocks, division for the tail
block, strict-midpoint rounding (ties to the lower code), first element in the high nibble.
"""

from __future__ import annotations

import torch

_ABSMAX_FLOOR = 1e-38


def sorted_code(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted codes, sorted position -> stored code)."""
    order = torch.argsort(code.cpu(), stable=True).to(code.device)
    values = code[order]
    return (values[:-1] + values[1:]) / 2, order


def quantize_4bit_flat(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat: 1-D float tensor of n elements -> (packed uint8 [(n+1)//2], absmax float32 [blocks])."""
    x = flat.float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_ABSMAX_FLOOR)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().amax().clamp(min=_ABSMAX_FLOOR)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (x[full:] / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    midpoints, order = sorted_code(code)
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_4bit_flat(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """packed uint8 [(n+1)//2], absmax float32 [blocks] -> 1-D tensor of n elements in `dtype`."""
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
    values = code[codes.long()]
    padded = -n % blocksize
    if padded:
        values = torch.nn.functional.pad(values, (0, padded))
    out = (values.view(-1, blocksize) * absmax.view(-1, 1)).reshape(-1)
    return out[:n].to(dtype)


def double_quantize(absmax: torch.Tensor, offset: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int = 256):
    """(absmax - offset) -> (uint8 codes, float32 nested absmax). Division by the block max, the code to the
    left found by search, the right neighbour taken only when strictly closer (bitsandbytes' CPU kernel)."""
    centered = absmax - offset
    n = centered.numel()
    padded = -n % blocksize
    blocks = torch.nn.functional.pad(centered, (0, padded)).view(-1, blocksize)
    nested = blocks.abs().amax(dim=1)
    normed = (blocks / nested.unsqueeze(1)).reshape(-1)[:n]
    left = (torch.searchsorted(dynamic_map, normed, right=True) - 1).clamp(0, 255)
    right = (left + 1).clamp(max=255)
    take_right = (normed - dynamic_map[right]).abs() < (normed - dynamic_map[left]).abs()
    codes = torch.where(take_right, right, left)
    codes = torch.where(torch.isnan(normed), torch.zeros_like(codes), codes)
    return codes.to(torch.uint8), nested


def dequantize_absmax(
    codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int
) -> torch.Tensor:
    n = codes.numel()
    values = dynamic_map[codes.long()]
    padded = -n % blocksize
    if padded:
        values = torch.nn.functional.pad(values, (0, padded))
    out = (values.view(-1, blocksize) * nested_absmax.view(-1, 1)).reshape(-1)[:n]
    return out + offset
