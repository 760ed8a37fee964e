"""Tiny base checkpoints and peft adapters for the merge tests."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers_models import hf_tiny_model, save_hf

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_base(directory: Path, family: str = "llama", dtype: torch.dtype = torch.float32, **kw) -> Path:
    return save_hf(hf_tiny_model(family, **kw).to(dtype), directory)


def peft_model(
    family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 1, adapter_name="default", **lora_kwargs
):
    """A peft model over the tiny base with random (non-zero) A and B, and random modules_to_save weights."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("target_modules", ALL_PROJ)
    lora_kwargs.setdefault("init_lora_weights", False)  # random B, so the update is not zero
    base = hf_tiny_model(family).to(dtype)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**lora_kwargs), adapter_name=adapter_name)
    randomize_extras(model)
    return model


def randomize_extras(model) -> None:
    """Give DoRA magnitudes and modules_to_save copies values the base does not have."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1.0 + 0.1 * torch.rand_like(p))


def save_adapter_dir(model, directory: Path, adapter_name: str = "default") -> Path:
    model.save_pretrained(directory, selected_adapters=[adapter_name])
    return directory / adapter_name if adapter_name != "default" else directory


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(path))
    return out
