"""One autograd Function for a linear layer with a frozen base (dense or 4-bit) and an optional LoRA path.

    y = x W^T + b + scaling * (dropout(x) A^T) B^T        x [..., in], W [out, in], A [r, in], B [out, r]

Memory is the point. Saved for backward, and nothing else:
  * x, the layer input. It is needed for grad_A, and it is usually the very tensor other layers save too
    (q, k and v read the same x), so saving x costs nothing extra. With dropout we do NOT save the dropped copy
    nor its mask: we save the seed of the mask and regenerate it in backward (one cheap Bernoulli draw).
  * x A^T, [tokens, r]: needed for grad_B; r is small, so keeping it is cheaper than recomputing a matmul.
  * A and B: the parameters themselves, no copy.
  * the base weight as stored: the dense parameter, or the PACKED 4-bit codes (its small quant-state tensors ride
    on ctx). Never a dequantized W: backward dequantizes again, uses it for grad_input and frees it.
The output is never saved (nothing in backward needs it). The frozen base gets no gradient; a trainable bias gets
grad = sum of grad_output over tokens.
"""

from __future__ import annotations

import threading
from functools import cache

import torch

from nibblora.quant import QuantizedTensor, QuantState, dequantize_4bit, torch_ops
from nibblora.quant.names import BNB_QUANT_TYPES
from nibblora.quant.state import SUPPORTED_DTYPES


def dequantize_base(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The dense [out, in] weight of a 4-bit base in `dtype`; float64 goes through float32 (gradcheck).

    CPU: nibblora's Rust kernel. GPU: bitsandbytes' fused kernel when bitsandbytes is installed (same bytes in,
    same bits out, one kernel instead of four), else `dequantize_pairs` in plain PyTorch ops."""
    if dtype not in SUPPORTED_DTYPES:
        return dequantize_base(packed, state, torch.float32).to(dtype)
    if packed.device.type != "cpu":
        if state.quant_type in BNB_QUANT_TYPES and _bnb_dequantize_op() is not None:
            return dequantize_with_bitsandbytes(packed, state, dtype)
        return dequantize_pairs(packed, state, dtype)
    return dequantize_4bit(QuantizedTensor(packed, state), dtype)


@cache
def _bnb_dequantize_op():
    """torch.ops.bitsandbytes.dequantize_4bit if bitsandbytes (an optional dependency) imports, else None."""
    try:
        import bitsandbytes  # noqa: F401  (registers the torch.ops.bitsandbytes namespace)

        return torch.ops.bitsandbytes.dequantize_4bit.default
    except Exception:  # not installed, or built without a backend for this machine
        return None


def dequantize_with_bitsandbytes(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' kernel over nibblora's state (the formats are byte-identical). nf4/fp4 only: like
    bitsandbytes, it uses the standard code table of `state.quant_type`, so no device-to-host check is made."""
    op = _bnb_dequantize_op()
    if op is None:
        raise RuntimeError("bitsandbytes is not importable; install it or use dequantize_pairs")
    absmax = state.absmax_float32()
    return op(packed, absmax, state.blocksize, state.quant_type, list(state.shape), dtype)


def dequantize_pairs(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Device-side dequantization with no host sync: nibblora.quant's PyTorch path (each packed byte indexes a
    [256, 2] table of its two codes, one multiply by the block's float32 absmax, one rounding to `dtype`; the
    same bits as bitsandbytes). Used on GPUs without bitsandbytes."""
    code = state.code.to(packed.device, torch.float32)
    flat = torch_ops.dequantize_4bit_flat(packed, state.absmax_float32(), code, state.blocksize, state.numel, dtype)
    return flat.view(state.shape)


_generators = threading.local()  # per thread: forward and the autograd engine's device threads never share one


def _seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A reusable generator for `device`, re-seeded (creating one per call cost more than the draw on small layers)."""
    cache = _generators.__dict__.setdefault("by_device", {})
    generator = cache.get(device)
    if generator is None:
        generator = cache[device] = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def dropout_keep(like: torch.Tensor, p: float, seed: int, method: str | None = None) -> tuple[torch.Tensor, float]:
    """(keep, scale): a 0/1 mask shaped like `like`, fully determined by `seed` (so backward can redraw it), and
    the factor that keeps the expectation. Dropped-out x is `x * keep * scale`.

    method "uniform16" (CPU default): each 64-bit draw gives four 16-bit uniforms and keep is a bool tensor; p is
    rounded to a multiple of 1/65536 and the scale uses the rounded p, so the mask stays unbiased. On CPU
    `bernoulli_` draws one number per element and was a quarter of a QLoRA step. method "bernoulli" (GPU
    default, where bernoulli_ is one fast kernel and the extra kernels of "uniform16" cost more than they save):
    keep is a 0/1 tensor in like's dtype and scale is 1 / (1 - p).
    """
    method = method or ("uniform16" if like.device.type == "cpu" else "bernoulli")
    generator = _seeded_generator(like.device, seed)
    if method == "bernoulli":
        return torch.empty_like(like).bernoulli_(1.0 - p, generator=generator), 1.0 / (1.0 - p)
    if method != "uniform16":
        raise ValueError(f"dropout method must be 'uniform16' or 'bernoulli', got {method!r}")
    n = like.numel()
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 3) // 4,), generator=generator, dtype=torch.int64, device=like.device
    )
    uniform16 = words.view(torch.int16)[:n].view(like.shape)  # uniform over [-32768, 32767]
    dropped = round(p * 65536)
    return uniform16 >= dropped - 32768, 65536 / (65536 - dropped)


def _dense_weight(weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype) -> torch.Tensor:
    if state is not None:
        return dequantize_base(weight, state, dtype)
    return weight.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """apply(x, weight, quant_state, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed) -> y [..., out].

    x: [..., in] in the compute dtype. weight: the frozen dense weight [out, in], or the packed uint8 codes when
    quant_state is given. bias: [out] or None (gets a gradient only if it requires one). lora_A [r, in] and lora_B
    [out, r] in any float dtype (cast to x's dtype for the matmuls; grads come back in their own dtype), or both
    None for a plain frozen linear. dropout_p applies to the LoRA path only; dropout_seed fixes its mask.
    """

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        w = _dense_weight(weight, quant_state, dtype)
        y = x2 @ w.t()
        del w  # the dequantized (or cast) weight lives only for this matmul
        if bias is not None:
            y += bias.to(dtype)
        xa = None
        if lora_A is not None:
            if dropout_p > 0:
                keep, scale = dropout_keep(x2, dropout_p, dropout_seed)
                xd = (x2 * keep).mul_(scale)
            else:
                xd = x2
            xa = xd @ lora_A.to(dtype).t()  # [tokens, r]
            del xd
            y.addmm_(xa, lora_B.to(dtype).t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.quant_state = quant_state  # small tensors (absmax, code tables) that belong to the module
        ctx.scaling, ctx.dropout_p, ctx.dropout_seed = scaling, dropout_p, dropout_seed
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        need_x, _, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        dtype = x.dtype
        g = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = None

        if need_x:
            w = _dense_weight(weight, ctx.quant_state, dtype)
            grad_x = g @ w  # [tokens, in]
            del w
        if lora_A is not None:
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            gb = (g @ b).mul_(ctx.scaling)  # [tokens, r] = scaling * dL/d(xa)
            keep, scale = dropout_keep(x2, ctx.dropout_p, ctx.dropout_seed) if ctx.dropout_p > 0 else (None, 1.0)
            if need_x:
                if keep is None:
                    grad_x.addmm_(gb, a)
                else:
                    grad_x += (gb @ a).mul_(keep).mul_(scale)
            if need_A:
                xd = (x2 * keep).mul_(scale) if keep is not None else x2
                grad_A = (gb.t() @ xd).to(lora_A.dtype)
            if need_B:
                grad_B = (g.t() @ xa).mul_(ctx.scaling).to(lora_B.dtype)
        if need_bias:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_bias, grad_A, grad_B, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: QuantState | None = None,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> torch.Tensor:
    """Functional form of `LoRALinearFunction` (see there for shapes)."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be given or both be None")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return LoRALinearFunction.apply(x, weight, quant_state, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed)
