"""The plumbing prompt and prefix tuning share: rewriting a causal LM's forward call to account for virtual tokens.

Both attach to the model with forward hooks, so the model's code is unchanged: a forward-pre-hook sees the call's
arguments by name (`bind_call`) and rewrites them (longer attention mask, shifted positions, padded labels),
and `check_context` refuses a call whose virtual + real tokens overflow the model's context.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from nibblora.errors import AdapterError


def bind_call(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by parameter name (positional ones named), defaults left out."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return dict(bound.arguments)


def forward_accepts(model: nn.Module, *names: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return all(n in params for n in names)


def check_context(what: str, num_virtual: int, past: int, seq: int, max_positions: int) -> None:
    """AdapterError when the virtual tokens plus this call's tokens reach past the model's context."""
    if max_positions and num_virtual + past + seq > max_positions:
        raise AdapterError(
            f"{what}: {num_virtual} virtual tokens + {past + seq} real tokens = {num_virtual + past + seq} "
            f"positions overflow the model's context of {max_positions} (max_position_embeddings); shorten the "
            "input or use fewer virtual tokens"
        )


def prepend_mask(mask: torch.Tensor | None, num_virtual: int) -> torch.Tensor | None:
    """[batch, n] -> [batch, num_virtual + n] with the virtual tokens visible (ones), in the mask's dtype."""
    if mask is None:
        return None
    ones = torch.ones(mask.shape[0], num_virtual, dtype=mask.dtype, device=mask.device)
    return torch.cat((ones, mask), dim=-1)


def remove_hooks(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
