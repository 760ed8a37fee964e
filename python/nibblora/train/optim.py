"""AdamW over the trainable parameters, the learning-rate schedule, and optimizer states paged to host memory."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over the parameters that require grad.

    Decay applies to matrices only: biases and norm weights (1-D) are never decayed, as in most recipes.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter: inject LoRA or unfreeze something first")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # foreach=False: one parameter at a time, so peak memory is not a second copy of all states.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def lr_multiplier(step: int, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The factor on the base lr for optimizer step `step` (0-based): linear warmup from ~0, then decay.

    cosine: from 1 down to min_lr_ratio over the steps after warmup; linear: the same on a straight line;
    constant: 1 after warmup.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, max_steps, warmup_steps, schedule, min_lr_ratio)
    )


class PagedOptimizerStates:
    """Keep an optimizer's state tensors in (pinned) host memory between steps; page them to the device for the step.

    This is the role QLoRA's paged optimizers play: the Adam moments (8 bytes per trainable parameter) leave the
    GPU except while `step()` runs, so a memory spike elsewhere (a long batch) does not meet them there. The
    copies in are non_blocking from pinned memory; the copies out go into the same pinned buffers.

    `active` is False when parameters already live in host memory (CPU training): then `step()` is the plain
    step and nothing moves. `pin` can be turned off to exercise the paging logic without a GPU.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, device: torch.device, *, force: bool = False, pin: bool | None = None
    ):
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.active = force or self.device.type != "cpu"
        self.pin = (self.device.type == "cuda") if pin is None else pin
        self._host: dict[int, dict[str, torch.Tensor]] = {}

    def _tensors(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state:
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor) and value.numel() > 1:
                            yield p, state, key, value

    def page_in(self) -> None:
        """Copy every state tensor to the parameters' device (before the step)."""
        for p, state, key, value in self._tensors():
            if value.device != p.device:
                state[key] = value.to(p.device, non_blocking=self.pin)

    def page_out(self) -> None:
        """Copy every state tensor into its host buffer and drop the device copy (after the step)."""
        for p, state, key, value in self._tensors():
            buffers = self._host.setdefault(id(p), {})
            host = buffers.get(key)
            if host is None or host.shape != value.shape or host.dtype != value.dtype:
                host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=self.pin)
                buffers[key] = host
            if host.data_ptr() != value.data_ptr():
                host.copy_(value, non_blocking=False)
            state[key] = host

    def step(self) -> None:
        if not self.active:
            self.optimizer.step()
            return
        self.page_in()
        self.optimizer.step()
        self.page_out()

    def resident_state_bytes(self, device_type: str) -> int:
        """Bytes of optimizer state currently on devices of `device_type` ("cpu", "cuda")."""
        return sum(v.numel() * v.element_size() for _, _, _, v in self._tensors() if v.device.type == device_type)
