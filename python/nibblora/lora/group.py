"""Group-level LoRA functions: several frozen-base (+ LoRA) projections in one autograd Function.

    q, k, v = project_group(x, (attn.q_proj, attn.k_proj, attn.v_proj))     # one x, saved once, one grad_x
    y = swiglu_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj)            # down(silu(gate(x)) * up(x))

Each projection computes exactly what `LoRALinearFunction` computes (same ops in the same order), so results
equal the per-projection path. What the grouping buys:
  * q, k and v (`LoRAGroupFunction`): x is cast to the compute dtype and saved once, and backward accumulates the
    three input gradients into one buffer (addmm_) instead of three tensors summed by autograd.
  * the SwiGLU MLP (`LoRASwiGLUFunction`): saved are x, gate(x) and up(x) only. The per-projection path also keeps
    silu(gate(x)) (for the product's backward) and the product itself (down_proj's input): two more
    [tokens, intermediate] tensors per layer. Backward recomputes silu(gate) * up, one cheap elementwise pass.
Dropout is unchanged: each projection draws its own seed, in the order the modules would have been called, so the
masks are the very ones the per-projection path draws.

A projection takes the fused path when it is a LoRALinear, NF4Linear or nn.Linear whose base weight is frozen
and which has no forward hooks (a hook expects its module to be called); otherwise the plain modules run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nibblora.lora.function import base_linear, drop_out, dropout_keep, input_grad
from nibblora.lora.layers import LoRALinear, NF4Linear
from nibblora.quant import QuantState

# Arguments per projection in the flattened apply(...) call: weight, quant_state, bias, lora_A, lora_B, scaling,
# dropout_p, dropout_seed, plain (an nn.Linear: forward through F.linear, as the module itself would).
_PER_PROJECTION = 9


@dataclass
class ProjectionArgs:
    """What one projection contributes to a fused call (see LoRALinearFunction for the meaning of each)."""

    weight: torch.Tensor
    quant_state: QuantState | None
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scaling: float
    dropout_p: float
    dropout_seed: int
    compute_dtype: torch.dtype
    plain: bool = False

    def flat(self) -> tuple:
        return (
            self.weight,
            self.quant_state,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout_p,
            self.dropout_seed,
            self.plain,
        )


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def projection_args(module: nn.Module) -> ProjectionArgs | None:
    """The fused-call arguments of `module`, or None when it must run as a module (trainable or unknown base,
    hooks). Draws the dropout seed, so call it in the order the modules would run."""
    if _hooked(module):
        return None
    if isinstance(module, LoRALinear):
        if module.fan_in_fan_out or _hooked(module.base):
            return None
        adapter = None if module.merged else module.adapter
        weight, state = module._base_weight()
        if weight.requires_grad:
            return None
        bias = getattr(module.base, "bias", None)
        compute_dtype = module.base.compute_dtype if state is not None else weight.dtype
        p = adapter.dropout if adapter is not None and module.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else 0
        return ProjectionArgs(
            weight,
            state,
            bias,
            None if adapter is None else adapter.lora_A,
            None if adapter is None else adapter.lora_B,
            1.0 if adapter is None else adapter.scaling,
            p,
            seed,
            compute_dtype,
        )
    if isinstance(module, NF4Linear):
        return ProjectionArgs(
            module.weight, module.quant_state, module.bias, None, None, 1.0, 0.0, 0, module.compute_dtype
        )
    if type(module) is nn.Linear and not module.weight.requires_grad:
        return ProjectionArgs(module.weight, None, module.bias, None, None, 1.0, 0.0, 0, module.weight.dtype, True)
    return None


def _forward_one(x2, weight, state, bias, lora_A, lora_B, scaling, dropout_p, dropout_seed, plain, output=True):
    """(y [tokens, out], xa [tokens, r] or None): LoRALinearFunction.forward's ops, in its order (plain: those of
    nn.Linear). output=False: only xa (what backward keeps) is computed, and y is left uninitialized."""
    if plain:
        return F.linear(x2, weight, bias), None
    dtype = x2.dtype
    if output:
        y = base_linear(x2, weight, state, dtype)
        if bias is not None:
            y += bias.to(dtype)
    else:
        y = x2.new_empty(x2.shape[0], (state.shape if state is not None else weight.shape)[0])
    xa = None
    if lora_A is not None:
        if dropout_p > 0:
            keep, scale = dropout_keep(x2, dropout_p, dropout_seed)
            xd = drop_out(x2, keep, scale)
        else:
            xd = x2
        xa = xd @ lora_A.to(dtype).t()
        del xd
        if output:
            y.addmm_(xa, lora_B.to(dtype).t(), alpha=scaling)
    return y, xa


# Set while a checkpointed decoder layer is recomputed in backward (nibblora.models.llama): only the tensors its
# functions save matter then, not what they return, so the MLP skips its down projection's matmul.
_recomputing = threading.local()


@contextlib.contextmanager
def outputs_unused() -> Iterator[None]:
    """Within: the group functions' outputs will not be used (a recomputation that only rebuilds saved tensors)."""
    before = getattr(_recomputing, "active", False)
    _recomputing.active = True
    try:
        yield
    finally:
        _recomputing.active = before


def _outputs_used() -> bool:
    return not getattr(_recomputing, "active", False)


def _backward_one(
    g,
    x2,
    grad_x,
    need_x,
    need_bias,
    need_A,
    need_B,
    weight,
    state,
    bias,
    lora_A,
    lora_B,
    scaling,
    dropout_p,
    dropout_seed,
    xa,
    x2_scratch=False,
):
    """(grad_x, grad_bias, grad_A, grad_B): LoRALinearFunction.backward's ops. grad_x: a buffer to add the input
    gradient into, or None to start one. x2_scratch: x2 is the caller's own temporary, so the dropped-out input
    is built in its buffer instead of a new one (the same values)."""
    dtype = x2.dtype
    grad_bias = grad_A = grad_B = None
    lora = None
    if lora_A is not None:
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        gb = (g @ b).mul_(scaling)
        keep, scale = dropout_keep(x2, dropout_p, dropout_seed) if dropout_p > 0 else (None, 1.0)
        lora = (gb, a, keep, scale)
    if need_x:
        grad_x = input_grad(g, weight, state, dtype, lora, out=grad_x)
    if lora_A is not None:
        if need_A:
            if keep is None:
                xd = x2
            else:
                xd = drop_out(x2, keep, scale, inplace=x2_scratch)
            grad_A = (gb.t() @ xd).to(lora_A.dtype)
        if need_B:
            grad_B = (g.t() @ xa).mul_(scaling).to(lora_B.dtype)
    if need_bias:
        grad_bias = g.sum(0).to(bias.dtype)
    return grad_x, grad_bias, grad_A, grad_B


def _split(flat: Sequence, count: int) -> list[tuple]:
    return [tuple(flat[i * _PER_PROJECTION : (i + 1) * _PER_PROJECTION]) for i in range(count)]


def _grads_out(per_projection: list[tuple]) -> list:
    """The flat gradient list for apply(x, *projections): None for the non-tensor and frozen slots."""
    out: list = []
    for grad_bias, grad_A, grad_B in per_projection:
        out += [None, None, grad_bias, grad_A, grad_B, None, None, None, None]
    return out


class LoRAGroupFunction(torch.autograd.Function):
    """apply(x, *p_1, ..., *p_n) -> (y_1, ..., y_n): n projections of one input x [..., in], each p_i the 8
    arguments of LoRALinearFunction after x (weight, quant_state, bias, lora_A, lora_B, scaling, dropout_p,
    dropout_seed) and a flag `plain` (a bare nn.Linear). x is in the compute dtype. Saved: x once, each adapter's
    x A^T [tokens, r]."""

    @staticmethod
    def forward(ctx, x, *flat):
        count = len(flat) // _PER_PROJECTION
        projections = _split(flat, count)
        x2 = x.reshape(-1, x.shape[-1])
        outputs, saved = [], [x]
        for weight, state, bias, lora_A, lora_B, scaling, p, seed, plain in projections:
            y, xa = _forward_one(x2, weight, state, bias, lora_A, lora_B, scaling, p, seed, plain)
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
            saved += [weight, bias, lora_A, lora_B, xa]
        ctx.save_for_backward(*saved)
        ctx.meta = [(state, scaling, p, seed) for _, state, _, _, _, scaling, p, seed, _ in projections]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, *saved = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need = ctx.needs_input_grad
        grad_x, grads = None, []
        for i, (state, scaling, p, seed) in enumerate(ctx.meta):
            weight, bias, lora_A, lora_B, xa = saved[5 * i : 5 * i + 5]
            base = 1 + i * _PER_PROJECTION
            go = grad_outputs[i]
            if go is None:
                grads.append((None, None, None))
                continue
            g = go.reshape(-1, go.shape[-1]).to(x.dtype)
            grad_x, grad_bias, grad_A, grad_B = _backward_one(
                g,
                x2,
                grad_x,
                need[0],
                need[base + 2],
                need[base + 3],
                need[base + 4],
                weight,
                state,
                bias,
                lora_A,
                lora_B,
                scaling,
                p,
                seed,
                xa,
            )
            grads.append((grad_bias, grad_A, grad_B))
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return (grad_x, *_grads_out(grads))


class LoRASwiGLUFunction(torch.autograd.Function):
    """apply(x, *gate, *up, *down) -> down(silu(gate(x)) * up(x)) [..., hidden]; each of gate/up/down the 9
    per-projection arguments of LoRAGroupFunction. Saved: x, gate(x) and up(x) [tokens, intermediate], the adapters'
    r-wide products; silu(gate) * up is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, *flat):
        gate, up, down = _split(flat, 3)
        x2 = x.reshape(-1, x.shape[-1])
        g, gate_xa = _forward_one(x2, *gate)
        u, up_xa = _forward_one(x2, *up)
        h = F.silu(g).mul_(u)
        # In a recomputation (outputs_unused) y is not used: the down projection's matmul, a third of the MLP's, is
        # skipped; its adapter's x A^T is still computed, for backward keeps it.
        y, down_xa = _forward_one(h, *down, output=_outputs_used())
        del h
        saved = [x, g, u]
        for (weight, _, bias, lora_A, lora_B, *_), xa in zip((gate, up, down), (gate_xa, up_xa, down_xa)):
            saved += [weight, bias, lora_A, lora_B, xa]
        ctx.save_for_backward(*saved)
        ctx.meta = [(state, scaling, p, seed) for _, state, _, _, _, scaling, p, seed, _ in (gate, up, down)]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        x, g, u, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        dtype = x.dtype
        go = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)
        silu_g = F.silu(g)
        h = silu_g * u  # the down projection's input, recomputed (the same ops as forward: same bits)

        def unpack(i):
            weight, bias, lora_A, lora_B, xa = saved[5 * i : 5 * i + 5]
            state, scaling, p, seed = ctx.meta[i]
            return weight, state, bias, lora_A, lora_B, scaling, p, seed, xa

        base = [1 + i * _PER_PROJECTION for i in range(3)]
        grad_h, *down_grads = _backward_one(
            go, h, None, True, need[base[2] + 2], need[base[2] + 3], need[base[2] + 4], *unpack(2), x2_scratch=True
        )
        del h  # (overwritten by the down projection's dropout: not used again)
        # The autograd path's ops: mul's backward, then silu's (grad_u in grad_h's buffer once grad_h * u is taken).
        grad_hu = grad_h * u
        grad_u = grad_h.mul_(silu_g)
        del silu_g, grad_h
        grad_g = torch.ops.aten.silu_backward(grad_hu, g)
        del grad_hu
        grad_x, *up_grads = _backward_one(
            grad_u, x2, None, need[0], need[base[1] + 2], need[base[1] + 3], need[base[1] + 4], *unpack(1)
        )
        del grad_u
        grad_x, *gate_grads = _backward_one(
            grad_g, x2, grad_x, need[0], need[base[0] + 2], need[base[0] + 3], need[base[0] + 4], *unpack(0)
        )
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return (grad_x, *_grads_out([tuple(gate_grads), tuple(up_grads), tuple(down_grads)]))


def project_group(x: torch.Tensor, modules: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """(module(x) for module in modules), through one LoRAGroupFunction when every module allows it (same compute
    dtype, frozen base, no hooks), else module by module. Outputs come back in x's dtype."""
    args = _all_args(modules, None)
    if args is None:
        return tuple(module(x) for module in modules)
    flat = [a for arg in args for a in arg.flat()]
    outputs = LoRAGroupFunction.apply(x.to(args[0].compute_dtype), *flat)
    return tuple(y.to(x.dtype) for y in outputs)


def swiglu_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) through one LoRASwiGLUFunction when all three allow it, else module by module."""
    args = _all_args((gate, up, down), x.dtype)
    if args is None:
        return down(F.silu(gate(x)) * up(x))
    flat = [a for arg in args for a in arg.flat()]
    return LoRASwiGLUFunction.apply(x.to(args[0].compute_dtype), *flat).to(x.dtype)


def _all_args(modules: Sequence[nn.Module], input_dtype: torch.dtype | None) -> list[ProjectionArgs] | None:
    """Every module's fused-call arguments, or None if one of them cannot take part: not eligible, compute dtypes
    that differ, or (input_dtype given) a compute dtype other than the input's (the per-projection path would
    round between the projections; the fused one would not). Seeds are drawn only when all can take part, so the
    fallback draws them itself, in the same order."""
    dtypes = {_compute_dtype(m) for m in modules}
    if None in dtypes or len(dtypes) != 1 or (input_dtype is not None and dtypes != {input_dtype}):
        return None
    return [projection_args(m) for m in modules]  # type: ignore[misc]


def _compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype projection_args(module) would compute in, or None when it cannot take part (checked without
    drawing a dropout seed)."""
    if _hooked(module):
        return None
    if isinstance(module, LoRALinear):
        if module.fan_in_fan_out or _hooked(module.base):
            return None
        weight, state = module._base_weight()
        if weight.requires_grad:
            return None
        return module.base.compute_dtype if state is not None else weight.dtype
    if isinstance(module, NF4Linear):
        return module.compute_dtype
    if type(module) is nn.Linear and not module.weight.requires_grad:
        return module.weight.dtype
    return None
