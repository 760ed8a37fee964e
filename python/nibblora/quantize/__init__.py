"""`python -m nibblora.quantize`: quantize a Hugging Face causal-LM checkpoint to the bitsandbytes 4-bit layout.

    from nibblora.quantize import quantize_checkpoint
    summary = quantize_checkpoint("Llama-3.2-1B", "Llama-3.2-1B-nf4")   # QuantizeSummary
    print(summary.format())

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` (bitsandbytes installed), as if
transformers had quantized the model itself with BitsAndBytesConfig(load_in_4bit=True, ...) and saved it.
"""

from nibblora._lazy import lazy_exports

# The tool (torch) loads with the first of these names used; `python -m` reads its arguments first.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "bnb_quantization_config": "nibblora.quant.bnb_format",
        "main": "nibblora.quantize.cli",
        "QuantizeError": "nibblora.quantize.tool",
        "QuantizeSummary": "nibblora.quantize.tool",
        "quantize_checkpoint": "nibblora.quantize.tool",
    },
)

__all__ = ["QuantizeError", "QuantizeSummary", "bnb_quantization_config", "main", "quantize_checkpoint"]
