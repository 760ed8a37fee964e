"""One autograd Function for a linear layer with a frozen base (dense or 4-bit) and an optional LoRA path.

    y = x W^T + b + scaling * (dropout(x) A^T) B^T        x [..., in], W [out, in], A [r, in], B [out, r]

Memory is the point. Saved for backward, and nothing else:
  * x, the layer input. It is needed for grad_A, and it is usually the very tensor other layers save too
    (q, k and v read the same x), so saving x costs nothing extra. With dropout we do NOT save the dropped copy
    nor its mask: we save the seed of the mask and regenerate it in backward (one cheap Bernoulli draw).
  * x A^T, [tokens, r]: needed for grad_B; r is small, so keeping it is cheaper than recomputing a matmul.
  * A and B: the parameters themselves, no copy.
  * the base weight as stored: the dense parameter, or the PACKED 4-bit codes (its small quant-state tensors ride
    on ctx). Never a dequantized W: backward dequantizes again, uses it for grad_input and frees it (on a CPU
    a slice of rows at a time, see SLICE_BYTES).
The output is never saved (nothing in backward needs it). The frozen base gets no gradient; a trainable bias gets
grad = sum of grad_output over tokens.
"""

from __future__ import annotations

import math
import threading
from functools import cache

import torch

from nibblora.quant import QuantizedTensor, QuantState, code_table, dequantize_4bit, torch_ops
from nibblora.quant.api import dequantize_4bit_part
from nibblora.quant.names import BNB_QUANT_TYPES, DEQUANT_SLICE_BYTES
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


def drop_out(x: torch.Tensor, keep: torch.Tensor, scale: float, *, inplace: bool = False) -> torch.Tensor:
    """x * keep * scale (in x's buffer when `inplace`). A bool mask goes through torch.where / masked_fill:
    multiplying by a bool tensor first converts it to x's dtype, a temporary as large as x."""
    if keep.dtype == torch.bool:
        dropped = x.masked_fill_(~keep, 0) if inplace else torch.where(keep, x, 0)
    else:
        dropped = x.mul_(keep) if inplace else x * keep
    return dropped.mul_(scale)


def _dense_weight(weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype) -> torch.Tensor:
    if state is not None:
        return dequantize_base(weight, state, dtype)
    return weight.to(dtype)


# On a CPU a 4-bit base weight is dequantized a slice at a time into one reused buffer, each slice used by its part
# of the matmul at once: the dense [out, in] weight (46 MB in float32 for a 2048 x 5632 projection) is never alive
# whole, and a slice this size stays in the cache between the dequantization and the matmul. Forward takes slices
# of rows (output features: each writes its own columns of y), the input gradient slices of columns (input
# features: each writes its own columns of grad_x), so every output element is one matmul's sum, as with the whole
# weight. GPUs dequantize the whole weight in one kernel: there the launches would cost more than the bytes save.
SLICE_BYTES = DEQUANT_SLICE_BYTES


def _cpu_slices(
    weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype, axis: int
) -> list[tuple[int, int]] | None:
    """Ranges along `axis` (0: rows, 1: columns) for a sliced dequantization of a CPU 4-bit weight, or None to
    dequantize it whole (dense, GPU, a dtype or code table the Rust kernel does not take, slices that cannot start
    on quantization blocks, or a weight that fits in one slice)."""
    if state is None or weight.device.type != "cpu" or dtype not in SUPPORTED_DTYPES or len(state.shape) != 2:
        return None
    if state.quant_type not in BNB_QUANT_TYPES or not torch.equal(state.code, code_table(state.quant_type)):
        return None
    rows, columns = state.shape
    if axis == 0:  # rows start on a block boundary (blocks are an even number of codes: whole bytes)
        length, across, unit = rows, columns, state.blocksize // math.gcd(columns, state.blocksize)
    else:  # every row starts a block and the columns are whole blocks
        if columns % state.blocksize:
            return None
        length, across, unit = columns, rows, state.blocksize
    step = max(unit, SLICE_BYTES // (across * dtype.itemsize) // unit * unit)
    if step >= length:
        return None
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def _slice_of(weight, state: QuantState, dtype, part: tuple[int, int], axis: int, absmax, buffer) -> torch.Tensor:
    q = QuantizedTensor(weight, state)
    rows, columns = (part, None) if axis == 0 else ((0, state.shape[0]), part)
    block = dequantize_4bit_part(q, rows, columns, dtype, absmax, out=buffer)
    if block is None:  # _cpu_slices only plans slices this accepts
        raise RuntimeError(f"cannot dequantize part {part} (axis {axis}) of a {list(state.shape)} 4-bit weight")
    return block


def _slice_buffer(slices: list[tuple[int, int]], across: int, dtype: torch.dtype) -> torch.Tensor:
    """One buffer that every slice of a weight is dequantized into in turn."""
    return torch.empty(max(stop - start for start, stop in slices) * across, dtype=dtype)


def base_linear(x2: torch.Tensor, weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype) -> torch.Tensor:
    """x2 [tokens, in] @ W.T -> [tokens, out] for the frozen base weight (dense, or 4-bit with its state)."""
    slices = _cpu_slices(weight, state, dtype, axis=0)
    if slices is None:
        w = _dense_weight(weight, state, dtype)
        return x2 @ w.t()  # the dequantized (or cast) weight lives only for this matmul
    y = x2.new_empty(x2.shape[0], state.shape[0])
    absmax, buffer = state.absmax_float32(), _slice_buffer(slices, state.shape[1], dtype)
    for start, stop in slices:
        w = _slice_of(weight, state, dtype, (start, stop), 0, absmax, buffer)
        torch.mm(x2, w.t(), out=y[:, start:stop])
    return y


def base_grad_input(
    g: torch.Tensor, weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """g [tokens, out] @ W -> [tokens, in], added into `out` when given (the gradient for the base's input)."""
    slices = _cpu_slices(weight, state, dtype, axis=1)
    if slices is None:
        w = _dense_weight(weight, state, dtype)
        return g @ w if out is None else out.addmm_(g, w)
    absmax, buffer = state.absmax_float32(), _slice_buffer(slices, state.shape[0], dtype)
    if out is None:
        out = g.new_empty(g.shape[0], state.shape[1])
        for start, stop in slices:
            torch.mm(g, _slice_of(weight, state, dtype, (start, stop), 1, absmax, buffer), out=out[:, start:stop])
    else:
        for start, stop in slices:
            out[:, start:stop].addmm_(g, _slice_of(weight, state, dtype, (start, stop), 1, absmax, buffer))
    return out


def input_grad(
    g: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState | None,
    dtype: torch.dtype,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float] | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient for a LoRA layer's input, g @ W + dropout(gb @ A), added into `out` when given. lora: (gb, A,
    keep mask or None, dropout scale), or None for the base alone. With a mask and no `out`, the LoRA term is
    computed first, into the buffer that becomes the result, and the base's term added to it: no temporary the
    size of the input."""
    if lora is not None and lora[2] is not None and out is None:
        gb, a, keep, scale = lora
        return base_grad_input(g, weight, state, dtype, out=drop_out(gb @ a, keep, scale, inplace=True))
    out = base_grad_input(g, weight, state, dtype, out=out)
    if lora is not None:
        gb, a, keep, scale = lora
        if keep is None:
            out.addmm_(gb, a)
        else:
            out += drop_out(gb @ a, keep, scale, inplace=True)
    return out


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
        y = base_linear(x2, weight, quant_state, dtype)
        if bias is not None:
            y += bias.to(dtype)
        xa = None
        if lora_A is not None:
            if dropout_p > 0:
                keep, scale = dropout_keep(x2, dropout_p, dropout_seed)
                xd = drop_out(x2, keep, scale)
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

        lora = None
        if lora_A is not None:
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            gb = (g @ b).mul_(ctx.scaling)  # [tokens, r] = scaling * dL/d(xa)
            keep, scale = dropout_keep(x2, ctx.dropout_p, ctx.dropout_seed) if ctx.dropout_p > 0 else (None, 1.0)
            lora = (gb, a, keep, scale)
        if need_x:
            grad_x = input_grad(g, weight, ctx.quant_state, dtype, lora)  # [tokens, in]
        if lora_A is not None:
            if need_A:
                xd = drop_out(x2, keep, scale) if keep is not None else x2
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
