"""Twin tiny Llamas for the nibblora.methods tests: a transformers model and nibblora's model loaded from its
saved weights, so peft (on transformers) and nibblora can be compared logit for logit."""

from __future__ import annotations

import torch
from helpers_models import hf_tiny_model, random_ids, save_hf

from nibblora.models import load_model

IDS = random_ids(2, 10, seed=3)


def twins(tmp_path, *, kv_heads: int = 2, seed: int = 0, **overrides):
    """(transformers LlamaForCausalLM, nibblora LlamaForCausalLM) with identical weights, both in eval mode.
    kv_heads=2 of 4 query heads is grouped-query attention; kv_heads=4 is multi-head attention."""
    hf = hf_tiny_model("llama", seed=seed, num_key_value_heads=kv_heads, **overrides)
    folder = save_hf(hf, tmp_path / f"base_kv{kv_heads}_{seed}")
    return hf, load_model(folder)


def nib_model(tmp_path, *, kv_heads: int = 2, seed: int = 0, **overrides):
    return twins(tmp_path, kv_heads=kv_heads, seed=seed, **overrides)[1]


def logits(model, ids=IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def train_steps(model, params, ids, steps: int = 30, lr: float = 0.05) -> list[float]:
    """Plain next-token training on `ids` with Adam over `params`; returns the loss per step."""
    model.train()
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss_sum, n = model(ids, labels=ids)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
