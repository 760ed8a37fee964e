"""The 4-bit format's names and sizes, defined once and free of torch (the CLIs' argument parsers read them).

BNB_QUANT_TYPES   the 4-bit types bitsandbytes (and so transformers, peft, the trainer, the server) knows
QUANT_TYPES       those plus "int4", a linear 16-level code nibblora offers for comparison only
BLOCKSIZES        elements per absmax block: the powers of two bitsandbytes accepts
NESTED_BLOCKSIZE  absmax values per block of the double quantization (from the Rust core: 256)
"""

from nibblora._native import NESTED_BLOCKSIZE

BNB_QUANT_TYPES = ("nf4", "fp4")
QUANT_TYPES = (*BNB_QUANT_TYPES, "int4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

__all__ = ["BLOCKSIZES", "BNB_QUANT_TYPES", "NESTED_BLOCKSIZE", "QUANT_TYPES"]
