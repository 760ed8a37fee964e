"""LoRA and QLoRA layers: adapters over a frozen dense or 4-bit base, injected into any nn.Module.

summary = inject_lora(model, "all-linear", r=16, alpha=32, quantize_base="nf4")
print(summary)                                   # trainable parameters per module and in total
save_adapter(model, "out/adapter")               # peft's format: adapter_config.json + safetensors
load_adapter(other_model, "out/adapter")         # reads peft adapters too
print(param_table("llama-2-7b"))                 # exact counts before building anything

The other methods (DoRA training, IA3, prompt and prefix tuning, bottleneck adapters) live in nibblora.methods,
whose `load_adapter` loads a folder of any of them, LoRA included, by its peft_type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nibblora._lazy import lazy_exports
from nibblora.lora.config import LoRAConfig, lora_scaling
from nibblora.lora.params import DecoderShape, ParamTable, param_table, projection_lora_params

if TYPE_CHECKING:
    from nibblora.lora.adapters import load_adapter, read_adapter_config, save_adapter
    from nibblora.lora.function import LoRALinearFunction, lora_linear
    from nibblora.lora.group import LoRAGroupFunction, LoRASwiGLUFunction, project_group, swiglu_mlp
    from nibblora.lora.inject import (
        LoRASummary,
        find_target_modules,
        inject_lora,
        lora_modules,
        lora_summary,
        set_adapter,
    )
    from nibblora.lora.layers import LoRAAdapter, LoRALinear, NF4Linear

# The torch-free parts (configs, parameter counts) load at once; the layers and adapter I/O on first use, so
# `nibblora.memory` can count parameters without importing torch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        **dict.fromkeys(("load_adapter", "read_adapter_config", "save_adapter"), "nibblora.lora.adapters"),
        **dict.fromkeys(("LoRALinearFunction", "lora_linear"), "nibblora.lora.function"),
        **dict.fromkeys(
            ("LoRAGroupFunction", "LoRASwiGLUFunction", "project_group", "swiglu_mlp"), "nibblora.lora.group"
        ),
        **dict.fromkeys(
            ("LoRASummary", "find_target_modules", "inject_lora", "lora_modules", "lora_summary", "set_adapter"),
            "nibblora.lora.inject",
        ),
        **dict.fromkeys(("LoRAAdapter", "LoRALinear", "NF4Linear"), "nibblora.lora.layers"),
    },
)

__all__ = [
    "DecoderShape",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRALinear",
    "LoRAGroupFunction",
    "LoRALinearFunction",
    "LoRASwiGLUFunction",
    "LoRASummary",
    "NF4Linear",
    "ParamTable",
    "find_target_modules",
    "inject_lora",
    "load_adapter",
    "lora_linear",
    "lora_modules",
    "lora_scaling",
    "lora_summary",
    "param_table",
    "project_group",
    "projection_lora_params",
    "read_adapter_config",
    "save_adapter",
    "set_adapter",
    "swiglu_mlp",
]
