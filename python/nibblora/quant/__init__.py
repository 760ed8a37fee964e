"""bitsandbytes-compatible blockwise 4-bit quantization (NF4, FP4; INT4 for comparison), with double quantization.

q = quantize_4bit(weight, "nf4", blocksize=64, double_quant=True)   # QuantizedTensor
w = dequantize_4bit(q, torch.bfloat16)
sd = to_bnb_state_dict(q, "model.layers.0.mlp.up_proj.weight")       # the keys transformers saves
"""

from nibblora.quant.api import (
    code_table,
    dequantize_4bit,
    dequantize_absmax,
    dynamic_map,
    output_pool_stats,
    quantize_4bit,
    set_output_pool_limit,
)
from nibblora.quant.bnb_format import find_quant_state_key, from_bnb_state_dict, to_bnb_state_dict
from nibblora.quant.report import QuantError, error_report, format_error_report, quantization_error
from nibblora.quant.state import QuantizedTensor, QuantState

__all__ = [
    "QuantError",
    "QuantState",
    "QuantizedTensor",
    "code_table",
    "dequantize_4bit",
    "dequantize_absmax",
    "dynamic_map",
    "error_report",
    "find_quant_state_key",
    "format_error_report",
    "from_bnb_state_dict",
    "output_pool_stats",
    "quantization_error",
    "quantize_4bit",
    "set_output_pool_limit",
    "to_bnb_state_dict",
]
