"""nibblora: LoRA and QLoRA fine-tuning with a Rust core.

Modules: `nibblora.quant` (bitsandbytes-compatible 4-bit quantization), `nibblora.lora` (LoRA / QLoRA layers,
injection, peft-format adapters), `nibblora.models` (Llama-family decoder loaded from HF checkpoints),
`nibblora.checkpoint` (reading HF checkpoints). Tools: `python -m nibblora.quantize`.
"""

from nibblora.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    InputError,
    NibbloraError,
    OutputError,
)
from nibblora.lora import (
    LoRAConfig,
    LoRALinear,
    NF4Linear,
    inject_lora,
    load_adapter,
    param_table,
    save_adapter,
)
from nibblora.models import KVCache, LlamaForCausalLM, ModelConfig, generate, load_model
from nibblora.quant import QuantizedTensor, QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "InputError",
    "NibbloraError",
    "OutputError",
    "KVCache",
    "LlamaForCausalLM",
    "LoRAConfig",
    "LoRALinear",
    "ModelConfig",
    "NF4Linear",
    "QuantState",
    "QuantizedTensor",
    "__version__",
    "dequantize_4bit",
    "generate",
    "inject_lora",
    "load_adapter",
    "load_model",
    "param_table",
    "quantize_4bit",
    "save_adapter",
]
