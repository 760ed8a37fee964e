"""quantize_checkpoint: a Hugging Face causal-LM checkpoint in, the transformers + bitsandbytes 4-bit layout out.

The run is planned completely before anything is written (which tensors are quantized, every output tensor's
dtype and shape, which shard it lands in), so bad input fails before the first byte. Then tensors stream through
one at a time: read one, quantize it, write its bytes at their planned place, drop it. Everything goes into a
hidden sibling folder that is renamed into place only once complete.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nibblora.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    TensorEntry,
    atomic_output_dir,
    check_out_dir,
    human_bytes,
    open_checkpoint,
    read_config,
    shard_names,
)
from nibblora.checkpoint.shards import (
    copy_side_files,
    parse_size,
    release_freed_memory,
    split_shards,
    verify_written_checkpoint,
    write_config,
    write_index,
    write_shards,
)
from nibblora.checkpoint.writer import DeferredSpec, SafetensorsWriter, TensorSpec
from nibblora.dtypes import FLOAT_DTYPES, TORCH_NAME_TO_SAFETENSORS
from nibblora.errors import CheckpointError, ExportError
from nibblora.quant import QuantizedTensor, quantize_4bit, to_bnb_state_dict
from nibblora.quant.bnb_format import (
    BLOCKSIZES,
    BNB_QUANT_TYPES,
    bnb_quantization_config,
    bnb_specs,
    is_decoder_linear_weight,
    matches_skip,
    module_name,
    skip_modules_for_config,
    unfamiliar_patterns,
)

QUANT_TYPES = BNB_QUANT_TYPES  # the --quant-type choices
COMPUTE_DTYPES = tuple(TORCH_NAME_TO_SAFETENSORS)  # float32, bfloat16, float16
QUANTIZABLE_DTYPES = FLOAT_DTYPES  # F32, BF16, F16


class QuantizeError(ExportError):
    """A problem with the user's input (files, config, options): reported as one line, exit code 2."""


@dataclass
class QuantizeSummary:
    """What a run did. Sizes are tensor bytes (headers excluded); bits_per_param counts the packed codes and
    the per-block scales of the quantized weights (4.127 for NF4 with double quantization, 4.5 without)."""

    out_dir: Path
    quant_type: str
    blocksize: int
    double_quant: bool
    tensors_total: int
    tensors_quantized: int
    params_total: int
    params_quantized: int
    bytes_before: int
    bytes_after: int
    bits_per_param: float
    seconds: float
    shards: list[str] = field(default_factory=list)
    unfamiliar: list[str] = field(default_factory=list)  # patterns of layer matrices kept as they were

    def format(self) -> str:
        dq = "double quant" if self.double_quant else "no double quant"
        share = 100.0 * self.params_quantized / max(self.params_total, 1)
        ratio = self.bytes_before / max(self.bytes_after, 1)
        lines = [
            f"quantized {self.tensors_quantized} of {self.tensors_total} tensors "
            f"({self.quant_type}, blocksize {self.blocksize}, {dq}) in {self.seconds:.1f} s",
            f"parameters: {self.params_total:,} total, {self.params_quantized:,} quantized ({share:.1f}%)",
            f"size: {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)} ({ratio:.2f}x smaller)",
            f"quantized weights: {self.bits_per_param:.3f} bits/parameter",
            f"wrote {self.out_dir} ({len(self.shards)} shard{'s' if len(self.shards) != 1 else ''})",
        ]
        if self.unfamiliar:
            lines.append(
                "kept unquantized (not a known nn.Linear; listed in llm_int8_skip_modules): "
                + ", ".join(self.unfamiliar)
            )
        return "\n".join(lines)


@dataclass
class _Item:
    """One source tensor and the tensors it becomes."""

    source: TensorEntry
    quantize: bool
    specs: list[TensorSpec]
    deferred: list[DeferredSpec]

    @property
    def planned_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs) + sum(d.max_nbytes for d in self.deferred)


def _plan(
    tensors: list[TensorEntry], quant_type: str, blocksize: int, double_quant: bool, skip: Sequence[str]
) -> list[_Item]:
    for t in tensors:
        if ".quant_state." in t.name or t.name.endswith((".absmax", ".SCB", ".weight_format")):
            raise QuantizeError(f"{t.path}: checkpoint is already quantized (it holds {t.name!r})")
    modules = {module_name(t.name) for t in tensors}
    for pattern in skip:
        try:
            re.compile(pattern)
        except re.error as err:
            raise QuantizeError(f"--skip {pattern!r} is not a valid pattern ({err})") from None
        if not any(matches_skip(m, [pattern]) for m in modules):
            raise QuantizeError(
                f"--skip {pattern!r} matches no module; a pattern matches a module name from its start "
                f"(regex, e.g. 'model.layers.0' or '.*self_attn') or as a suffix (e.g. 'mlp.down_proj'), "
                f"as transformers' llm_int8_skip_modules does"
            )
    items = []
    for t in tensors:
        if is_decoder_linear_weight(t.name, t.shape) and not matches_skip(module_name(t.name), skip):
            if t.dtype not in QUANTIZABLE_DTYPES:
                hint = " (already quantized?)" if t.dtype in ("U8", "I8") else ""
                raise QuantizeError(
                    f"{t.path}: tensor {t.name!r} has dtype {t.dtype}{hint}; 4-bit quantization reads F32, BF16 or F16"
                )
            if t.numel == 0:
                raise QuantizeError(f"{t.path}: tensor {t.name!r} is empty (shape {list(t.shape)})")
            specs, deferred = bnb_specs(t.name, t.dtype, t.shape, quant_type, blocksize, double_quant)
            items.append(_Item(t, True, specs, deferred))
        else:
            items.append(_Item(t, False, [TensorSpec(t.name, t.dtype, t.shape)], []))
    if not any(item.quantize for item in items):
        raise QuantizeError("no linear weight inside the decoder layers (model.layers.N.*) to quantize")
    return items


def load_config(model_dir: Path) -> dict[str, object]:
    """config.json of a causal LM that is not already quantized."""
    if not model_dir.is_dir():
        raise QuantizeError(f"{model_dir}: model folder does not exist")
    path = model_dir / CONFIG_FILE
    try:
        config = read_config(model_dir)
    except CheckpointError as err:
        raise QuantizeError(str(err)) from None
    if not config.get("model_type"):
        raise QuantizeError(f"{path}: no model_type; only causal language models (…ForCausalLM) are supported")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not any(str(a).endswith("ForCausalLM") for a in architectures):
        shown = repr(architectures)
        shown = shown if len(shown) <= 200 else shown[:200] + "…"
        raise QuantizeError(
            f"{path}: architectures {shown} name no causal LM (…ForCausalLM); only causal language models are supported"
        )
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise QuantizeError(
            f"{path}: checkpoint is already quantized (quantization_config, quant_method {str(method)[:100]!r})"
        )
    return config


def _open_input(model_dir: Path) -> Checkpoint:
    """The input's weights through the one checkpoint reader; its errors reported as this tool's."""
    try:
        ckpt = open_checkpoint(model_dir, require_config=False)
    except CheckpointError as err:
        raise QuantizeError(str(err)) from None
    if not len(ckpt):
        raise QuantizeError(f"{model_dir}: checkpoint holds no tensors")
    return ckpt


def _layout(items: list[_Item]) -> list[tuple[str, tuple[int, ...], bool]]:
    return [(i.source.name, i.source.shape, i.quantize) for i in items]


def _check_options(quant_type: str, blocksize: int, compute_dtype: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizeError(f"quant type {quant_type!r} is not supported: use nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise QuantizeError(f"blocksize {blocksize} is not supported: use a power of two from 32 to 4096 (default 64)")
    if compute_dtype not in COMPUTE_DTYPES:
        raise QuantizeError(f"compute dtype {compute_dtype!r} is not supported: use float32, bfloat16 or float16")


def quantize_checkpoint(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] = (),
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeSummary:
    """Quantize the decoder's linear weights of a Hugging Face causal-LM checkpoint to bitsandbytes 4-bit.

    model_dir: config.json plus model.safetensors, or shards with model.safetensors.index.json.
    out_dir: written atomically (a hidden sibling folder renamed into place); must be absent or empty unless
        `overwrite`. It loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` when
        bitsandbytes is installed, and holds the very bytes transformers would produce by quantizing itself.
    quant_type: "nf4" or "fp4". blocksize: 32..4096 (power of two). double_quant: also quantize the block scales
        (4.127 instead of 4.5 bits per parameter). compute_dtype: bnb_4bit_compute_dtype written to the config.
    skip_modules: module-name patterns left unquantized, with transformers' llm_int8_skip_modules rule (from the
        start of the name as a regex, or a suffix: "mlp.down_proj", "model.layers.0").
    max_shard_size: bytes, or "2GB" / "500MB" / "4GiB". progress: show a tqdm bar (stderr).

    Quantized: every 2-D `.weight` inside `...layers.N.`; everything else (embeddings, norms, lm_head, biases)
    is copied unchanged. Raises QuantizeError (a ValueError) for bad input, naming the file or tensor.
    """
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_options(quant_type, blocksize, compute_dtype)
    max_shard_bytes = parse_size(max_shard_size)
    skip = list(dict.fromkeys(skip_modules))
    config = load_config(model_dir)
    with _open_input(model_dir) as ckpt:
        items = _plan(list(ckpt.entries.values()), quant_type, blocksize, double_quant, skip)
        layout = _layout(items)
        check_out_dir(out_dir, overwrite, [model_dir], QuantizeError)
        shards = split_shards(items, max_shard_bytes)
        names = shard_names(len(shards))
        with atomic_output_dir(out_dir) as tmp:
            stats = _write_shards(ckpt, tmp, shards, names, quant_type, blocksize, double_quant, progress)
            out_config = dict(config)
            out_config["quantization_config"] = bnb_quantization_config(
                quant_type, double_quant, compute_dtype, skip_modules_for_config(layout, skip)
            )
            write_config(tmp, out_config)
            write_index(tmp, stats.shard_tensors, stats.bytes_after, stats.params_saved)
            copy_side_files(model_dir, tmp)
            verify_written_checkpoint(tmp, stats.tensors)
    return QuantizeSummary(
        out_dir=out_dir,
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        tensors_total=len(items),
        tensors_quantized=sum(i.quantize for i in items),
        params_total=sum(i.source.numel for i in items),
        params_quantized=stats.params_quantized,
        bytes_before=sum(i.source.nbytes for i in items),
        bytes_after=stats.bytes_after,
        bits_per_param=8.0 * stats.quantized_bytes / max(stats.params_quantized, 1),
        seconds=time.perf_counter() - start,
        shards=names,
        unfamiliar=unfamiliar_patterns(layout, skip),
    )


@dataclass
class _WriteStats:
    params_quantized: int = 0
    quantized_bytes: int = 0  # packed codes + block scales of the quantized weights
    bytes_after: int = 0
    params_saved: int = 0  # what transformers' num_parameters() reports for the loaded 4-bit model
    shard_tensors: dict[str, list[str]] = field(default_factory=dict)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # written: name -> dtype, shape


def _write_shards(
    ckpt: Checkpoint,
    tmp: Path,
    shards: list[list[_Item]],
    names: list[str],
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    progress: bool,
) -> _WriteStats:
    """Read, quantize and write every item (see nibblora.checkpoint.shards.write_shards)."""
    stats = _WriteStats()
    written = write_shards(
        tmp,
        shards,
        names,
        lambda item: _prepare_item(ckpt, item, quant_type, blocksize, double_quant, stats),
        desc="quantizing",
        progress=progress,
    )
    stats.shard_tensors, stats.bytes_after, stats.tensors = written.shard_tensors, written.nbytes, written.tensors
    return stats


def _prepare_item(
    ckpt: Checkpoint, item: _Item, quant_type: str, blocksize: int, double_quant: bool, stats: _WriteStats
) -> Callable[[SafetensorsWriter], None]:
    """Do the item's reading and quantizing now; return what is left: writing it."""
    t = item.source
    if not item.quantize:
        stats.params_saved += t.numel

        def copy(writer: SafetensorsWriter) -> None:
            with open(t.path, "rb") as f:
                writer.copy_from(t.name, f, t.offset)

        return copy
    release_freed_memory()
    weight = ckpt.get_tensor(t.name)
    try:
        q: QuantizedTensor = quantize_4bit(weight, quant_type, blocksize, double_quant, name=t.name)
    except ValueError as err:
        raise QuantizeError(f"{t.path}: {err}") from None
    del weight
    stats.params_quantized += t.numel
    stats.quantized_bytes += q.nbytes
    stats.params_saved += 2 * q.packed.numel()
    tensors = to_bnb_state_dict(q, t.name)

    def write(writer: SafetensorsWriter) -> None:
        for key, value in tensors.items():
            writer.write(key, value)

    return write
