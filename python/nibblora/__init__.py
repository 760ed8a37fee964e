"""nibblora: LoRA and QLoRA fine-tuning with a Rust core.

Public modules: `nibblora.quant` (bitsandbytes-compatible 4-bit quantization). Tools: `python -m nibblora.quantize`.
"""

from nibblora.quant import QuantizedTensor, QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = ["QuantState", "QuantizedTensor", "__version__", "dequantize_4bit", "quantize_4bit"]
