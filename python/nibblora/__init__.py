"""nibblora: LoRA and QLoRA fine-tuning with a Rust core.

Modules: `nibblora.quant` (bitsandbytes-compatible 4-bit quantization), `nibblora.lora` (LoRA / QLoRA layers,
injection, peft-format adapters), `nibblora.models` (Llama-family decoder loaded from HF checkpoints),
`nibblora.data` (chat data prepared in Rust), `nibblora.runs` (the run store), `nibblora.memory` (memory
estimates). Tools: `python -m nibblora.{prepare,train,quantize,merge,verify,memory}` and `qlora-tui`.

`import nibblora` is cheap: the exceptions are loaded at once, everything that needs torch is loaded the first
time it is used (PEP 562 `__getattr__`), so the tools and `nibblora.data`, `nibblora.runs`, `nibblora.tui` start
without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nibblora._lazy import lazy_exports
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

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from nibblora.lora import LoRAConfig, LoRALinear, NF4Linear, inject_lora, load_adapter, param_table, save_adapter
    from nibblora.models import KVCache, LlamaForCausalLM, ModelConfig, generate, load_model
    from nibblora.quant import QuantizedTensor, QuantState, dequantize_4bit, quantize_4bit

# public name -> the module that defines it; imported on first attribute access.
_LAZY = {
    "LoRAConfig": "nibblora.lora",
    "LoRALinear": "nibblora.lora",
    "NF4Linear": "nibblora.lora",
    "inject_lora": "nibblora.lora",
    "load_adapter": "nibblora.lora",
    "param_table": "nibblora.lora",
    "save_adapter": "nibblora.lora",
    "KVCache": "nibblora.models",
    "LlamaForCausalLM": "nibblora.models",
    "ModelConfig": "nibblora.models",
    "generate": "nibblora.models",
    "load_model": "nibblora.models",
    "QuantState": "nibblora.quant",
    "QuantizedTensor": "nibblora.quant",
    "dequantize_4bit": "nibblora.quant",
    "quantize_4bit": "nibblora.quant",
}


def _read_version() -> str:
    """The version the Rust extension was built with (Cargo's, the one source of truth), else the installed
    distribution's metadata (an extension built before it carried a version), else "0+unknown"."""
    try:
        from nibblora import _native

        version = getattr(_native, "__version__", None)
    except ImportError:  # no compiled extension (a source tree before `make install`): metadata may still know
        version = None
    if isinstance(version, str) and version:
        return version
    from importlib import metadata

    try:
        return metadata.version("nibblora")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _read_version()


# Subpackages a bare `import nibblora` used to load (and the rest): `nibblora.quant.quantize_4bit(...)` still works.
_SUBMODULES = (
    "checkpoint",
    "data",
    "lora",
    "memory",
    "merge",
    "models",
    "prepare",
    "quant",
    "quantize",
    "runs",
    "train",
    "tui",
    "verify",
)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, _SUBMODULES)


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
