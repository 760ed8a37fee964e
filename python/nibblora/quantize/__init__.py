"""`python -m nibblora.quantize`: quantize a Hugging Face causal-LM checkpoint to the bitsandbytes 4-bit layout.

    from nibblora.quantize import quantize_checkpoint
    summary = quantize_checkpoint("Llama-3.2-1B", "Llama-3.2-1B-nf4")   # QuantizeSummary
    print(summary.format())

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` (bitsandbytes installed), as if
transformers had quantized the model itself with BitsAndBytesConfig(load_in_4bit=True, ...) and saved it.
"""

from nibblora.quant.bnb_format import bnb_quantization_config
from nibblora.quantize.cli import main
from nibblora.quantize.tool import QuantizeError, QuantizeSummary, quantize_checkpoint

__all__ = ["QuantizeError", "QuantizeSummary", "bnb_quantization_config", "main", "quantize_checkpoint"]
