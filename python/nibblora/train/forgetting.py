"""What the training loop can do against forgetting: pull the trained weights back toward where they started.

    anchor = WeightAnchor.build(params, l2sp=0.01, ewc=0.0, fisher=None)
    ...backward, unscale...
    penalty = anchor.add_gradients()        # before clipping, like any loss term

L2-SP (Li et al. 2018) adds l2sp/2 * sum((w - w0)^2); EWC (Kirkpatrick et al. 2017) adds ewc/2 * sum(F * (w - w0)^2)
with F the diagonal Fisher information of the general-domain data at the starting weights. Both are quadratic, so
their gradients, l2sp * (w - w0) and ewc * F * (w - w0), are added to the weights' gradients directly: no autograd
graph, no second forward. The Fisher is rescaled to mean 1 over all trained weights, so `ewc` and `l2sp` share one
scale (EWC with a flat Fisher is L2-SP) and a value tuned for one model size carries over.

The starting weights w0 (and F) are copies held beside the model: one extra copy of the trained weights for L2-SP,
two for EWC. Both are rebuilt identically on resume (w0 is the model before the checkpoint is loaded; F is computed
from the same rows at the same weights), so a resumed run continues exactly.

The third mitigation, mixing general rows into every step (data.general_fraction), lives in nibblora.train.data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nibblora.data.encoder import IGNORE_INDEX


@dataclass
class WeightAnchor:
    """The starting weights of the trained parameters and the penalty that pulls toward them."""

    params: list[nn.Parameter]
    start: list[torch.Tensor]  # w0, detached copies in each parameter's dtype
    fisher: list[torch.Tensor] | None  # F (mean 1), same shapes; None without EWC
    l2sp: float
    ewc: float

    @classmethod
    def build(
        cls, params: Sequence[nn.Parameter], l2sp: float, ewc: float, fisher: list[torch.Tensor] | None
    ) -> WeightAnchor | None:
        """The anchor at the parameters' current values; None when both weights are 0 (nothing to hold)."""
        if l2sp <= 0 and ewc <= 0:
            return None
        if ewc > 0 and fisher is None:
            raise ValueError("EWC needs the Fisher information (estimate_fisher)")
        start = [p.detach().clone() for p in params]
        return cls(list(params), start, fisher if ewc > 0 else None, l2sp, ewc)

    @property
    def bytes(self) -> int:
        """Memory the copies take (w0, and F under EWC)."""
        copies = self.start + (self.fisher or [])
        return sum(t.numel() * t.element_size() for t in copies)

    @torch.no_grad()
    def add_gradients(self) -> float:
        """Add the penalty's gradient to every parameter's .grad (creating it where a parameter got none this
        step) and return the penalty's value, l2sp/2 * sum(d^2) + ewc/2 * sum(F * d^2) with d = w - w0, in
        float64. Call it on unscaled gradients, before clipping."""
        total = torch.zeros((), dtype=torch.float64, device=self.params[0].device if self.params else "cpu")
        for i, (p, w0) in enumerate(zip(self.params, self.start)):
            diff = p.detach().float() - w0.float()
            weight = torch.full_like(diff, self.l2sp)
            if self.fisher is not None:
                weight.add_(self.fisher[i].float(), alpha=self.ewc)
            grad = weight * diff
            total += 0.5 * (grad * diff).sum().double()
            if p.grad is None:
                p.grad = grad.to(p.dtype)
            else:
                p.grad.add_(grad.to(p.grad.dtype))
        return float(total)


def estimate_fisher(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    rows: Sequence[dict[str, torch.Tensor]],
    loss_of: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[torch.Tensor]:
    """Diagonal empirical Fisher of `params` at their current values: the mean over `rows` of the squared gradient
    of each row's mean next-token loss (one row at a time, so it is a per-example Fisher, not a batch's), then
    scaled to mean 1 over every element of every parameter. In eval mode (no dropout); gradients are left cleared.

    `loss_of(model, batch)` returns the batch's summed loss (a [1, seq] batch of one row); rows without a
    supervised token are skipped. Returns float32 tensors shaped like the parameters."""
    fisher = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    was_training = model.training
    model.eval()
    counted = 0
    try:
        for row in rows:
            labels = row["labels"]
            supervised = int((labels[1:] != IGNORE_INDEX).sum())
            if supervised == 0:
                continue
            batch = {k: v[None].to(device) for k, v in row.items()}
            for p in params:
                p.grad = None
            with autocast():
                loss = loss_of(model, batch) / supervised
            loss.backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f.add_(p.grad.float().square())
            counted += 1
    finally:
        for p in params:
            p.grad = None
        model.train(was_training)
    if counted == 0:
        raise ValueError("no general row has a supervised token: the Fisher cannot be estimated")
    total = sum(float(f.sum()) for f in fisher)
    elements = sum(f.numel() for f in fisher)
    scale = elements / total if total > 0 else 0.0
    return [f.mul_(scale) for f in fisher]
