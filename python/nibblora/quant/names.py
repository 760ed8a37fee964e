"""The 4-bit format's names and sizes, defined once and free of torch (the CLIs' argument parsers read them).

BNB_QUANT_TYPES   the 4-bit types bitsandbytes (and so transformers, peft, the trainer, the server) knows
QUANT_TYPES       those plus "int4", a linear 16-level code nibblora offers for comparison only
BLOCKSIZES        elements per absmax block: the powers of two bitsandbytes accepts
NESTED_BLOCKSIZE  absmax values per block of the double quantization (from the Rust core: 256)
DEQUANT_SLICE_BYTES  on a CPU a 4-bit layer dequantizes its base weight in slices of about this many bytes
                  (nibblora.lora.function; the memory estimate counts one slice)
"""

from nibblora._native import NESTED_BLOCKSIZE

BNB_QUANT_TYPES = ("nf4", "fp4")
QUANT_TYPES = (*BNB_QUANT_TYPES, "int4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEQUANT_SLICE_BYTES = 4 << 20

__all__ = ["BLOCKSIZES", "BNB_QUANT_TYPES", "DEQUANT_SLICE_BYTES", "NESTED_BLOCKSIZE", "QUANT_TYPES"]
