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


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """float32 [256, 2]: the values of a byte's high and low nibble, so one gather decodes two elements."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def dequantize_4bit_flat(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """packed uint8 [(n+1)//2], absmax float32 [blocks] -> 1-D tensor of n elements in `dtype`.

    One embedding gather with int32 indices decodes both nibbles of every byte (no int64 index tensor), then
    one multiply by the block scale in float32 and one cast, as bitsandbytes rounds."""
    values = torch.nn.functional.embedding(packed.reshape(-1).int(), pair_table(code)).view(-1)
    padded = -values.numel() % blocksize
    if padded:
        values = torch.nn.functional.pad(values, (0, padded))
    scaled = values.view(-1, blocksize).mul_(absmax.view(-1, 1)[: values.numel() // blocksize])
    return scaled.view(-1)[:n].to(dtype)


_BINS = 65536


def _bin_lut(dynamic_map: torch.Tensor) -> torch.Tensor:
    """For each of 65,536 bins over [-1, 1], the code nearest the bin centre (ties to the lower code)."""
    midpoints = 0.5 * (dynamic_map[:-1] + dynamic_map[1:])
    index = torch.arange(_BINS, device=dynamic_map.device, dtype=torch.float32)
    centres = -1.0 + (2.0 * index) / (_BINS - 1)
    return torch.bucketize(centres, midpoints)


def double_quantize(absmax: torch.Tensor, offset: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int = 256):
    """(absmax - offset) -> (uint8 codes, float32 nested absmax), the same binned lookup as the Rust core and
    bitsandbytes' CPU kernel: multiply by the reciprocal of the block max, take one of 65,536 bins, look up."""
    centered = absmax - offset
    n = centered.numel()
    padded = -n % blocksize
    blocks = torch.nn.functional.pad(centered, (0, padded)).view(-1, blocksize)
    nested = blocks.abs().amax(dim=1)
    reciprocal = 1.0 / torch.where(nested == 0, torch.ones_like(nested), nested)
    normed = (blocks * reciprocal.unsqueeze(1)).clamp(-1, 1)
    bins = (((normed + 1.0) * 0.5) * (_BINS - 1) + 0.5).to(torch.int64)
    codes = _bin_lut(dynamic_map)[bins]
    codes = torch.where((nested == 0).unsqueeze(1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n].to(torch.uint8), nested


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
