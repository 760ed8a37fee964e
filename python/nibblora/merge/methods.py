"""Combining several LoRA updates of one weight: weighted sums, concatenation, TIES, DARE, and SVD truncation.

Every update is the full product (B @ A) * scaling, never A and B combined separately (which adds cross terms
B_1 @ A_2: peft issue 3004). `linear` and `cat` stay low rank, so the Rust kernel forms the products; TIES and
DARE work on the dense [out, in] float32 updates (one per adapter, in memory at once) as peft's merge_utils do:

- linear: sum_i w_i * dW_i.
- cat: the same sum written as one LoRA of rank sum(r_i): B = [w_1 s_1 B_1 | w_2 s_2 B_2 ...], A = [A_1; A_2 ...].
- ties: keep the `density` share of each dW_i with the largest magnitude, elect each entry's sign by the sign of
  the sum, then average the weighted entries that agree with it (TIES-Merging, Yadav et al. 2023).
- dare_linear: drop entries at random with probability 1 - density, rescale the rest by 1 / density, weighted sum.
- dare_ties: DARE's random drop and rescale, then TIES' sign election and disjoint mean.

`rank` truncates the combined update to its best rank-`rank` approximation (SVD): exactly and cheaply through
QR factors for the low-rank methods, by a dense SVD of [out, in] for TIES / DARE. Random draws come from a
generator seeded with (seed, tensor name), so a run is reproducible whatever order tensors are processed in.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from nibblora.merge.names import METHODS  # noqa: F401 (re-exported)


@dataclass
class Contribution:
    """One adapter's update of one weight, in the weight's stored layout: (b @ a) * scale, times `weight`.
    b: float32 [rows, r]; a: float32 [r, cols]."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float
    weight: float = 1.0


# (B float32[rows*r], A float32[r*cols], r, scale) as the Rust kernel takes them
Term = tuple[np.ndarray, np.ndarray, int, float]


def _term(b: torch.Tensor, a: torch.Tensor, scale: float) -> Term:
    b = b.to(torch.float32).contiguous()
    a = a.to(torch.float32).contiguous()
    return (b.reshape(-1).numpy(), a.reshape(-1).numpy(), b.shape[1], float(scale))


def combine(
    contributions: list[Contribution],
    method: str = "linear",
    *,
    density: float = 1.0,
    rank: int | None = None,
    seed: int = 0,
    name: str = "",
) -> tuple[list[Term], np.ndarray | None]:
    """(low-rank terms, dense float32 update or None) to add to the weight."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if method in ("linear", "cat") and rank is None:
        if method == "linear":
            return [_term(c.b, c.a, c.scale * c.weight) for c in contributions], None
        b = torch.cat([c.b * (c.scale * c.weight) for c in contributions], dim=1)
        return [_term(b, torch.cat([c.a for c in contributions], dim=0), 1.0)], None
    if method in ("linear", "cat"):
        b = torch.cat([c.b.double() * (c.scale * c.weight) for c in contributions], dim=1)
        a = torch.cat([c.a.double() for c in contributions], dim=0)
        return [_truncate_low_rank(b, a, rank)], None
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    deltas = torch.stack([(c.b @ c.a) * c.scale for c in contributions])
    weights = torch.tensor([c.weight for c in contributions], dtype=torch.float32).view(-1, 1, 1)
    if method == "ties":
        dense = _disjoint_merge(_prune_magnitude(deltas, density), weights)
    elif method == "dare_linear":
        dense = (_prune_random(deltas, density, generator) * weights).sum(0)
    else:  # dare_ties
        dense = _disjoint_merge(_prune_random(deltas, density, generator), weights)
    if rank is not None:
        u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
        return [_term(u[:, :rank] * s[:rank], vh[:rank], 1.0)], None
    return [], dense.contiguous().reshape(-1).numpy()


def _truncate_low_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> Term:
    """Best rank-`rank` approximation of b @ a (float64 [rows, R] @ [R, cols]) without forming it: with
    b = Qb Rb and a^T = Qa Ra, b @ a = Qb (Rb Ra^T) Qa^T, and only the small R x R core needs an SVD."""
    if rank >= b.shape[1]:
        return _term(b, a, 1.0)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _term((qb @ u[:, :rank]) * s[:rank], vh[:rank] @ qa.T, 1.0)


def _prune_magnitude(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries of each update (peft's prune 'magnitude')."""
    out = torch.zeros_like(deltas)
    k = int(density * deltas[0].numel())
    for i, d in enumerate(deltas):
        if k > 0:
            top = torch.topk(d.abs().reshape(-1), k=k, largest=True).indices
            out[i].view(-1)[top] = d.reshape(-1)[top]
    return out


def _prune_random(deltas: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1 / density."""
    keep = torch.rand(deltas.shape, generator=generator) < density
    return deltas * keep / density


def _disjoint_merge(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election (sign of the sum of the unweighted updates, ties to +) and the mean of the weighted
    entries that agree with the elected sign."""
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == elected
    total = (deltas * weights * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)
