"""bitsandbytes-compatible blockwise 4-bit quantization (NF4, FP4; INT4 for comparison), with double quantization.

q = quantize_4bit(weight, "nf4", blocksize=64, double_quant=True)   # QuantizedTensor
w = dequantize_4bit(q, torch.bfloat16)
sd = to_bnb_state_dict(q, "model.layers.0.mlp.up_proj.weight")       # the keys transformers saves
"""

from nibblora._lazy import lazy_exports

# torch loads with the first of these names used, so `nibblora.quant.names` (the CLIs' choices) stays light.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "code_table": "nibblora.quant.api",
        "dequantize_4bit": "nibblora.quant.api",
        "dequantize_absmax": "nibblora.quant.api",
        "dynamic_map": "nibblora.quant.api",
        "output_pool_stats": "nibblora.quant.api",
        "quantize_4bit": "nibblora.quant.api",
        "set_output_pool_limit": "nibblora.quant.api",
        "find_quant_state_key": "nibblora.quant.bnb_format",
        "from_bnb_state_dict": "nibblora.quant.bnb_format",
        "to_bnb_state_dict": "nibblora.quant.bnb_format",
        "QuantError": "nibblora.quant.report",
        "error_report": "nibblora.quant.report",
        "format_error_report": "nibblora.quant.report",
        "quantization_error": "nibblora.quant.report",
        "QuantizedTensor": "nibblora.quant.state",
        "QuantState": "nibblora.quant.state",
    },
)

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
