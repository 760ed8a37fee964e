"""What every method module shares: freezing the base, listing trainable parameters, writing peft's folder.

freeze(model)                                     # every parameter requires_grad=False before a method injects
trainable_parameters(model)                       # {name: parameter} that requires grad
write_peft_folder(dir, config_dict, tensors)      # adapter_config.json + adapter_model.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nibblora.errors import AdapterError, OutputError
from nibblora.lora.adapter_files import CONFIG_NAME, WEIGHTS_NAME


def freeze(model: nn.Module) -> None:
    """Stop gradients to every parameter of `model` (the method's own parameters are added after)."""
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that will be trained: {qualified name: parameter} for every one with requires_grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def module_device(module: nn.Module) -> torch.device:
    """Where `module` lives: its first parameter's or, for a 4-bit layer holding only buffers, first buffer's."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def model_name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name or None


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith("ForCausalLM") else None


def write_peft_folder(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `config` as adapter_config.json and `tensors` (detached, contiguous CPU copies are made) as
    adapter_model.safetensors under `directory` (created). Raises OutputError naming the folder."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(directory / WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
    except OSError as err:
        raise OutputError(f"saving adapter: {directory}: cannot write ({err.strerror or err})") from None
    return directory


def expect_peft_type(config, expected: str, directory: Path) -> None:
    """AdapterError when an adapter of one method is loaded as another (e.g. a LoRA folder given to load_ia3)."""
    if config.peft_type != expected:
        raise AdapterError(
            f"loading adapter: {directory / CONFIG_NAME}: peft_type is {config.peft_type!r}, not "
            f"{expected!r}: this folder holds another method's adapter; load it with "
            "nibblora.methods.load_adapter, which dispatches on peft_type"
        )


def model_sizes(model: nn.Module, what: str) -> tuple[int, int, int, int, int, int]:
    """(hidden, layers, heads, kv_heads, head_dim, max_positions) from `model.config` (nibblora's ModelConfig or
    a transformers config). AdapterError naming `what` when the model has no such config."""
    config = getattr(model, "config", None)
    try:
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        raise AdapterError(
            f"{what}: {type(model).__name__} has no decoder config (hidden_size, num_hidden_layers, "
            "num_attention_heads); use a causal LM such as nibblora.models.LlamaForCausalLM"
        ) from None
    return hidden, layers, heads, kv, head_dim, max_pos
