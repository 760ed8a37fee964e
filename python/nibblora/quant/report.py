"""How much each 4-bit format loses on given tensors: mean squared error and relative (Frobenius) error.

The QLoRA paper found NF4 < FP4 < INT4 on normally distributed weights; `error_report` lets a user check
whether that ordering holds on their own weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from nibblora.quant.api import dequantize_4bit, quantize_4bit


@dataclass(frozen=True)
class QuantError:
    name: str
    quant_type: str
    numel: int
    mse: float
    relative_error: float
    max_abs_error: float


def quantization_error(
    tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, name: str = ""
) -> QuantError:
    """Quantize and dequantize `tensor`, comparing in float64: mse, ||W - Q(W)||_F / ||W||_F, max |W - Q(W)|."""
    q = quantize_4bit(tensor, quant_type, blocksize, double_quant, name=name or None)
    original = tensor.detach().double()
    diff = dequantize_4bit(q, torch.float32).double() - original
    norm = original.norm().item()
    return QuantError(
        name=name,
        quant_type=quant_type,
        numel=tensor.numel(),
        mse=diff.pow(2).mean().item(),
        relative_error=diff.norm().item() / norm if norm > 0 else 0.0,
        max_abs_error=diff.abs().max().item(),
    )


def error_report(
    tensors: Mapping[str, torch.Tensor] | torch.Tensor,
    quant_types: Iterable[str] = ("nf4", "fp4", "int4"),
    blocksize: int = 64,
    double_quant: bool = True,
) -> list[QuantError]:
    """One QuantError per (tensor, quant type)."""
    if isinstance(tensors, torch.Tensor):
        tensors = {"tensor": tensors}
    return [
        quantization_error(t, qt, blocksize, double_quant, name) for name, t in tensors.items() for qt in quant_types
    ]


def format_error_report(rows: list[QuantError]) -> str:
    """A plain-text table, plus a line per tensor saying which format erred least."""
    lines = [f"{'tensor':<40} {'type':<5} {'mse':>12} {'rel. error':>11} {'max |err|':>11}"]
    for r in rows:
        lines.append(
            f"{r.name[:40]:<40} {r.quant_type:<5} {r.mse:>12.4e} {r.relative_error:>11.5f} {r.max_abs_error:>11.4e}"
        )
    by_tensor: dict[str, list[QuantError]] = {}
    for r in rows:
        by_tensor.setdefault(r.name, []).append(r)
    for name, group in by_tensor.items():
        ordered = " < ".join(r.quant_type for r in sorted(group, key=lambda r: r.mse))
        lines.append(f"{name}: mse order {ordered}")
    return "\n".join(lines)
