"""Moved to nibblora.checkpoint.writer (dtype names: nibblora.dtypes); these names stay importable from here."""

from nibblora.checkpoint.writer import SAFETENSORS_DTYPES, DeferredSpec, SafetensorsWriter, TensorSpec  # noqa: F401
from nibblora.dtypes import dtype_itemsize, safetensors_dtype  # noqa: F401
