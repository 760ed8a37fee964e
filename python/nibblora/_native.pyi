"""Type stubs for nibblora's private Rust extension. Import the public wrappers from nibblora.quant instead."""

import os
import numpy as np
import numpy.typing as npt

NESTED_BLOCKSIZE: int

def quantize_4bit(
    values: npt.NDArray[np.float32] | npt.NDArray[np.uint16], dtype: str, quant_type: str, blocksize: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Quantize a flat array (float32, or bfloat16/float16 bits as uint16). Returns (packed, absmax)."""

def dequantize_4bit(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    quant_type: str,
    blocksize: int,
    n: int,
    dtype: str,
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]:
    """Dequantize into a new array of n elements (float32, or uint16 bits of bfloat16/float16) in pooled memory."""

def set_output_pool_limit(limit_bytes: int) -> None:
    """How many bytes of freed dequantization output to keep for reuse (0 disables the pool)."""

def output_pool_stats() -> tuple[int, int, int]:
    """(buffers cached, bytes cached, byte limit) of the dequantization output pool."""

class PooledBuffer:
    """Owner of pooled memory behind a numpy array returned by dequantize_4bit."""

def dequantize_4bit_into(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    quant_type: str,
    blocksize: int,
    out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    dtype: str,
) -> None:
    """Dequantize into `out` (float32, or uint16 bits of bfloat16/float16), in place."""

def double_quantize(
    absmax: npt.NDArray[np.float32], offset: float | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], float]:
    """Quantize block scales to 8-bit dynamic codes in blocks of 256. Returns (codes, nested_absmax, offset)."""

def dequantize_absmax(
    codes: npt.NDArray[np.uint8], nested_absmax: npt.NDArray[np.float32], offset: float
) -> npt.NDArray[np.float32]:
    """Recover float32 block scales from double-quantized codes."""

def code_table(quant_type: str) -> list[float]:
    """The 16 code values of nf4, fp4 or int4, indexed by stored code."""

def dynamic_map() -> npt.NDArray[np.float32]:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values)."""

class SafetensorsFile:
    """A safetensors file whose header was checked (sizes, offsets, overlaps, dtype widths, truncation), then
    memory-mapped. ValueError for a corrupt or hostile file; FileNotFoundError / OSError when unreadable."""

    def __init__(self, path: str | os.PathLike[str]) -> None: ...
    @property
    def path(self) -> str: ...
    def tensors(self) -> list[tuple[str, str, list[int], int, int]]: ...  # name, dtype, shape, offset, nbytes
    def metadata(self) -> list[tuple[str, str]]: ...
    def read(self, name: str) -> np.ndarray: ...  # uint8 copy of the tensor's bytes
    def merge(
        self,
        name: str,
        out_dtype: str,
        terms: list[tuple[np.ndarray, np.ndarray, int, float]],
        dense: np.ndarray | None = None,
        magnitude: np.ndarray | None = None,
    ) -> np.ndarray: ...

def merge_array(
    base: np.ndarray,
    base_dtype: str,
    shape: list[int],
    out_dtype: str,
    terms: list[tuple[np.ndarray, np.ndarray, int, float]],
    dense: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
) -> np.ndarray: ...

# Data preparation (nibblora.data wraps these).
TEMPLATE_NAMES: list[str]

def named_template_source(name: str) -> str | None:
    """The Jinja source of a named chat format (chatml, llama-2, llama-3, mistral, alpaca), or None."""

class DataPipeline:
    """A tokenizer.json + chat template + policies, compiled once; all calls release the GIL for long work."""

    def __init__(
        self,
        tokenizer_path: str,
        template_source: str | None,
        variables: list[tuple[str, str]],
        train_on: str = "assistant",
        content_specials_as_text: bool = True,
        eos_token: str | None = None,
    ) -> None: ...
    def render(self, messages_json: str, add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(text, loss spans as character offsets)."""
    def encode(self, row_json: str) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint8]]:
        """(input_ids, loss_mask) of one row."""
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def prepare(
        self,
        sources: list[tuple],
        out_dir: str,
        max_length: int | None = None,
        truncation: str = "keep-start",
        pack: bool = False,
        shard: tuple[int, int] = (0, 1),
        skip_bad_lines: bool = False,
        batch_rows: int = 2048,
        progress: object | None = None,
    ) -> dict[str, int]:
        """Prepare ("jsonl", path) / ("rows", name, [json]) sources into out_dir; returns the counts."""
