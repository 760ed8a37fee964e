"""Type stubs for nibblora's private Rust extension. Import the public wrappers from nibblora.quant instead.

Errors arrive as nibblora.errors classes (rust/python/src/errors.rs): CheckpointError /
CheckpointFileNotFoundError for safetensors files, DataError / DataFileNotFoundError for data preparation,
InputError for bad arguments (an unknown quant type or dtype name), OutputError when writing fails,
KeyboardInterrupt when Ctrl-C stops a long call. Checked by `python -m mypy.stubtest nibblora._native`.
"""

import os
from collections.abc import Callable
from typing import Literal, TypeAlias, final

import numpy as np
import numpy.typing as npt

_QuantType: TypeAlias = Literal["nf4", "fp4", "int4"]
_FloatDtype: TypeAlias = Literal["float32", "bfloat16", "float16"]
_SafetensorsDtype: TypeAlias = Literal[
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
]
_TrainOn: TypeAlias = Literal["assistant", "all", "last"]
_Truncation: TypeAlias = Literal["keep-start", "keep_start", "drop", "error"]
_Source: TypeAlias = tuple[Literal["jsonl"], str] | tuple[Literal["rows"], str, list[str]]

__all__ = [
    "DataPipeline",
    "NESTED_BLOCKSIZE",
    "PooledBuffer",
    "SafetensorsFile",
    "TEMPLATE_NAMES",
    "__version__",
    "add_lora_segments",
    "code_table",
    "dequantize_4bit",
    "dequantize_4bit_to",
    "dequantize_absmax",
    "double_quantize",
    "dynamic_map",
    "merge_array",
    "named_template_source",
    "output_pool_stats",
    "quantize_4bit",
    "set_output_pool_limit",
]

__version__: str
NESTED_BLOCKSIZE: int

def quantize_4bit(
    values: npt.NDArray[np.float32] | npt.NDArray[np.uint16], dtype: _FloatDtype, quant_type: _QuantType, blocksize: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Quantize a flat array (float32, or bfloat16/float16 bits as uint16). Returns (packed, absmax)."""

def dequantize_4bit(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    quant_type: _QuantType,
    blocksize: int,
    n: int,
    dtype: _FloatDtype,
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]:
    """Dequantize into a new array of n elements (float32, or uint16 bits of bfloat16/float16) in pooled memory."""

def dequantize_4bit_to(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    quant_type: _QuantType,
    blocksize: int,
    out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    dtype: _FloatDtype,
) -> None:
    """Dequantize len(out) values into out (float32, or uint16 bits of bfloat16/float16 as dtype says)."""

def set_output_pool_limit(limit_bytes: int) -> None:
    """How many bytes of freed dequantization output to keep for reuse (0 disables the pool)."""

def output_pool_stats() -> tuple[int, int, int]:
    """(buffers cached, bytes cached, byte limit) of the dequantization output pool."""

@final
class PooledBuffer:
    """Owner of pooled memory behind a numpy array returned by dequantize_4bit."""

def double_quantize(
    absmax: npt.NDArray[np.float32], offset: float | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], float]:
    """Quantize block scales to 8-bit dynamic codes in blocks of 256. Returns (codes, nested_absmax, offset)."""

def dequantize_absmax(
    codes: npt.NDArray[np.uint8], nested_absmax: npt.NDArray[np.float32], offset: float
) -> npt.NDArray[np.float32]:
    """Recover float32 block scales from double-quantized codes."""

def code_table(quant_type: _QuantType) -> list[float]:
    """The 16 code values of nf4, fp4 or int4, indexed by stored code."""

def dynamic_map() -> npt.NDArray[np.float32]:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values)."""

@final
class SafetensorsFile:
    """A safetensors file whose header was checked (by the safetensors crate, plus whole-byte dtypes), then
    memory-mapped. CheckpointError for a corrupt, hostile or unreadable file; CheckpointFileNotFoundError when
    it does not exist."""

    def __new__(cls, path: str | os.PathLike[str]) -> SafetensorsFile: ...
    @property
    def path(self) -> str: ...
    def tensors(self) -> list[tuple[str, str, list[int], int, int]]: ...  # name, dtype, shape, offset, nbytes
    def metadata(self) -> list[tuple[str, str]]: ...
    def read(self, name: str) -> np.ndarray: ...  # uint8 copy of the tensor's bytes
    def merge(
        self,
        name: str,
        out_dtype: _SafetensorsDtype,
        terms: list[tuple[np.ndarray, np.ndarray, int, float]],
        dense: np.ndarray | None = None,
        magnitude: np.ndarray | None = None,
    ) -> np.ndarray: ...

def merge_array(
    base: np.ndarray,
    base_dtype: _SafetensorsDtype,
    shape: list[int],
    out_dtype: _SafetensorsDtype,
    terms: list[tuple[np.ndarray, np.ndarray, int, float]],
    dense: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
) -> np.ndarray: ...

# Serving (nibblora.serve.lora_ops wraps this).
def add_lora_segments(
    y: npt.NDArray[np.float32],
    x: npt.NDArray[np.float32],
    lora_a: npt.NDArray[np.float32],
    lora_bt: npt.NDArray[np.float32],
    ranks: npt.NDArray[np.int64],
    scaling: npt.NDArray[np.float32],
    segments: npt.NDArray[np.int64],
    max_rank: int,
    in_features: int,
    out_features: int,
) -> None:
    """y[tokens*out] += each (start, end, slot) segment's scaling * (x @ A[slot,:r].T) @ Bt[slot,:r], in place.
    Flat contiguous views: lora_a [slots*max_rank*in], lora_bt [slots*max_rank*out] (B transposed), ranks and
    scaling [slots], segments [3*segments]. InputError for shapes that disagree; the GIL is released."""

# Data preparation (nibblora.data wraps these).
TEMPLATE_NAMES: list[str]

def named_template_source(name: str) -> str | None:
    """The Jinja source of a named chat format (chatml, llama-2, llama-3, mistral, alpaca), or None."""

@final
class DataPipeline:
    """A tokenizer.json + chat template + policies, compiled once; all calls release the GIL for long work."""

    def __new__(
        cls,
        tokenizer_path: str | os.PathLike[str],
        template_source: str | None,
        variables: list[tuple[str, str]],
        train_on: _TrainOn = "assistant",
        content_specials_as_text: bool = True,
        eos_token: str | None = None,
    ) -> DataPipeline: ...
    def render(self, messages_json: str, add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(text, loss spans as character offsets)."""
    def encode(self, row_json: str) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint8]]:
        """(input_ids, loss_mask) of one row."""
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def prepare(
        self,
        sources: list[_Source],
        out_dir: str | os.PathLike[str],
        max_length: int | None = None,
        truncation: _Truncation = "keep-start",
        pack: bool = False,
        shard: tuple[int, int] = ...,
        skip_bad_lines: bool = False,
        batch_rows: int = 2048,
        progress: Callable[[dict[str, int]], object] | None = None,
        max_line_bytes: int = 8388608,
    ) -> dict[str, int]:
        """Prepare ("jsonl", path) / ("rows", name, [json]) sources into out_dir; returns the counts. A row over
        max_line_bytes bytes stops the run with a DataError naming file:line."""
