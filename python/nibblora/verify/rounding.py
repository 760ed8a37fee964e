"""The rounding floor of a merged checkpoint: how far its logits move when every float weight moves by the
rounding its stored dtype allows, so that verify's tolerance follows the dtype (bf16 rounds ~65,000x coarser
than float32) and the model (depth, width and vocabulary decide how rounding adds up in the logits).

A correct merge rounds W_base + update to the stored dtype once: each weight is off by at most half a unit in
the last place (ulp), roughly uniformly. `perturb_by_rounding` moves every float weight of the loaded merged
model by a seeded uniform draw in [-ulp/2, ulp/2], which is a second, independent rounding of the same size;
the logit difference it causes is the yardstick a faithful merge is judged against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nibblora._native import SafetensorsFile
from nibblora.checkpoint import weight_files

# Explicit mantissa bits of each float dtype (torch.finfo(d).nmant), by safetensors name and by torch dtype.
MANTISSA_BITS = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}
_TORCH_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def stored_dtypes(directory: str | Path) -> dict[str, str]:
    """{tensor name: safetensors dtype} of a checkpoint folder, read from its headers only."""
    files, _ = weight_files(directory)
    return {name: dtype for path in files for name, dtype, _, _, _ in SafetensorsFile(path).tensors()}


def dtype_name(dtype: torch.dtype) -> str:
    return _TORCH_NAMES[dtype]


def perturb_by_rounding(model: nn.Module, stored: dict[str, str], seed: int = 0) -> dict[str, int]:
    """Add to every float parameter of `model` (in place) uniform noise of +-1/2 ulp of the coarser of its
    stored dtype (`stored[name]`, the parameter's own tensor in the checkpoint) and its dtype in memory.
    Parameters with no float tensor of that name (4-bit layers' codes are buffers) are left alone.
    Returns {stored dtype: number of perturbed parameters}."""
    generator = torch.Generator().manual_seed(seed)
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            st = stored.get(name)
            if st not in MANTISSA_BITS or param.dtype not in _TORCH_NAMES:
                continue
            bits = min(MANTISSA_BITS[st], MANTISSA_BITS[_TORCH_NAMES[param.dtype]])
            value = param.detach().to(torch.float64)
            # |x| in [2^(e-1), 2^e): one ulp with `bits` mantissa bits is 2^(e-1-bits). Zeros stay zero.
            _, exponent = torch.frexp(value)
            ulp = torch.ldexp(torch.ones_like(value), exponent - 1 - bits) * (value != 0)
            noise = (torch.rand(value.shape, generator=generator, dtype=torch.float64) - 0.5) * ulp
            param.copy_((value + noise).to(param.dtype))
            counts[st] = counts.get(st, 0) + 1
    return counts
