"""quantize_checkpoint: a Hugging Face causal-LM checkpoint in, the transformers + bitsandbytes 4-bit layout out.

The run is planned completely before anything is written (which tensors are quantized, every output tensor's
dtype and shape, which shard it lands in), so bad input fails before the first byte. Then tensors stream through
one at a time: read one, quantize it, write its bytes at their planned place, drop it. Everything goes into a
hidden sibling folder that is renamed into place only once complete.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path

from nibblora.quant import QuantizedTensor, quantize_4bit, to_bnb_state_dict
from nibblora.quant.state import NESTED_BLOCKSIZE
from nibblora.outdir import human_bytes
from nibblora.export import (
    atomic_output_dir,
    copy_side_files,
    parse_size,
    prepare_out_dir,
    release_freed_memory,
    shard_names,
    split_shards,
    write_shards,
    write_config,
    write_index,
)
from nibblora.quantize.source import QuantizeError, SourceTensor, read_checkpoint, read_tensor
from nibblora.safetensors_writer import DeferredSpec, SafetensorsWriter, TensorSpec

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZABLE_DTYPES = ("F32", "BF16", "F16")
# Linear weights inside the repeated decoder blocks: model.layers.N.*, language_model.model.layers.N.*, ...
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")
# Leaf names of the nn.Linear projections transformers' causal LMs keep in their decoder layers. A 2-D weight
# named otherwise (an MoE router such as `mlp.gate`, a bare Parameter in transformers 5) may not be an nn.Linear,
# which transformers would not convert: it stays unquantized and is named in llm_int8_skip_modules, so the
# checkpoint loads whichever it is.
LINEAR_LEAF_NAMES = frozenset(
    """q_proj k_proj v_proj o_proj qkv_proj query_key_value query key value dense out_proj in_proj
    gate_proj up_proj down_proj gate_up_proj fc1 fc2 fc_in fc_out dense_h_to_4h dense_4h_to_h w1 w2 w3
    q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj x_proj dt_proj""".split()
)
# Longest repr of a float (sign, 17 digits, point, "e-308"): bounds the JSON quant state's length.
_LONGEST_FLOAT = -1.2345678901234567e-308


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
        lines = (
            [
                f"quantized {self.tensors_quantized} of {self.tensors_total} tensors "
                f"({self.quant_type}, blocksize {self.blocksize}, {dq}) in {self.seconds:.1f} s",
                f"parameters: {self.params_total:,} total, {self.params_quantized:,} quantized ({share:.1f}%)",
                f"size: {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)} ({ratio:.2f}x smaller)",
                f"quantized weights: {self.bits_per_param:.3f} bits/parameter",
                f"wrote {self.out_dir} ({len(self.shards)} shard{'s' if len(self.shards) != 1 else ''})",
            ]
        )
        if self.unfamiliar:
            lines.append(
                "kept unquantized (not a known nn.Linear; listed in llm_int8_skip_modules): "
                + ", ".join(self.unfamiliar)
            )
        return "\n".join(lines)


def module_name(tensor_name: str) -> str:
    """"model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj"."""
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


def matches_skip(module: str, patterns: Sequence[str]) -> bool:
    """Whether transformers would leave `module` unconverted for llm_int8_skip_modules=`patterns`.

    transformers 5 matches a pattern against the module name from its start up to a dot boundary (as a regex:
    "model.layers.1" or "model.layers.*.mlp"), or as a suffix ("mlp.down_proj"). The tool applies the same
    rule, so what it leaves unquantized is exactly what transformers expects when it loads the output.
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def _is_layer_matrix(tensor: SourceTensor) -> bool:
    return tensor.name.endswith(".weight") and len(tensor.shape) == 2 and bool(_DECODER_LAYER.search(tensor.name))


def is_decoder_linear_weight(tensor: SourceTensor) -> bool:
    """A 2-D `.weight` of a known nn.Linear projection inside a decoder layer (attention and MLP), not of an
    MoE expert: transformers 5 fuses per-expert checkpoint weights into 3-D parameters when it loads them,
    and bitsandbytes' 4-bit layers do not cover those, so expert weights stay as they are."""
    module = module_name(tensor.name)
    return _is_layer_matrix(tensor) and module.rsplit(".", 1)[-1] in LINEAR_LEAF_NAMES and ".experts." not in module


def _unfamiliar_pattern(module: str) -> str:
    """One skip pattern for every layer (and expert): "model.layers.3.mlp.gate" -> the regex
    model[.]layers[.]<digits>[.]mlp[.]gate, written with escaped dots and \\d+."""
    escaped = re.escape(module)
    escaped = re.sub(r"layers\\\.\d+\\\.", lambda _: r"layers\.\d+\.", escaped)
    return re.sub(r"experts\\\.\d+\\\.", lambda _: r"experts\.\d+\.", escaped)


@dataclass
class _Item:
    """One source tensor and the tensors it becomes."""

    source: SourceTensor
    quantize: bool
    specs: list[TensorSpec]
    deferred: list[DeferredSpec]

    @property
    def planned_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs) + sum(d.max_nbytes for d in self.deferred)


def bnb_specs(
    t: SourceTensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[list[TensorSpec], list[DeferredSpec]]:
    """The tensors bitsandbytes' Linear4bit saves for weight `t` (see nibblora.quant.to_bnb_state_dict); only
    t.name, t.dtype and t.shape are read."""
    n = t.numel
    blocks = ceil(n / blocksize)
    p = t.name
    specs = [
        TensorSpec(p, "U8", ((n + 1) // 2, 1)),
        TensorSpec(f"{p}.absmax", "U8" if double_quant else "F32", (blocks,)),
        TensorSpec(f"{p}.quant_map", "F32", (16,)),
    ]
    meta: dict[str, object] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[t.dtype],
        "shape": list(t.shape),
    }
    if double_quant:
        specs += [
            TensorSpec(f"{p}.nested_absmax", "F32", (ceil(blocks / NESTED_BLOCKSIZE),)),
            TensorSpec(f"{p}.nested_quant_map", "F32", (256,)),
        ]
        meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": _LONGEST_FLOAT}
    longest = len(json.dumps(meta).encode("utf-8"))
    return specs, [DeferredSpec(f"{p}.quant_state.bitsandbytes__{quant_type}", "U8", longest)]


def _plan(
    tensors: list[SourceTensor], quant_type: str, blocksize: int, double_quant: bool, skip: Sequence[str]
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
        if is_decoder_linear_weight(t) and not matches_skip(module_name(t.name), skip):
            if t.dtype not in QUANTIZABLE_DTYPES:
                hint = " (already quantized?)" if t.dtype in ("U8", "I8") else ""
                raise QuantizeError(
                    f"{t.path}: tensor {t.name!r} has dtype {t.dtype}{hint}; 4-bit quantization reads F32, BF16 or F16"
                )
            if t.numel == 0:
                raise QuantizeError(f"{t.path}: tensor {t.name!r} is empty (shape {list(t.shape)})")
            specs, deferred = bnb_specs(t, quant_type, blocksize, double_quant)
            items.append(_Item(t, True, specs, deferred))
        else:
            items.append(_Item(t, False, [TensorSpec(t.name, t.dtype, t.shape)], []))
    if not any(item.quantize for item in items):
        raise QuantizeError("no linear weight inside the decoder layers (model.layers.N.*) to quantize")
    return items


def skip_modules_for_config(items: list[_Item], skip: Sequence[str]) -> list[str] | None:
    """llm_int8_skip_modules to write. transformers converts every nn.Linear not matched by it, and with an
    explicit list it no longer adds its default (lm_head), so the list must name every 2-D weight we left
    unquantized outside the decoder layers. None (transformers' default) when that default covers them."""
    outside = sorted(
        {
            module_name(i.source.name)
            for i in items
            if not i.quantize
            and i.source.name.endswith(".weight")
            and len(i.source.shape) == 2
            and not _DECODER_LAYER.search(i.source.name)
        }
    )
    default_covers = all(m.split(".")[-1] == "lm_head" or "embed" in m for m in outside)
    unfamiliar = unfamiliar_patterns(items, skip)
    if not skip and default_covers and not unfamiliar:
        return None
    extra = [m for m in outside if not matches_skip(m, skip)]
    return list(dict.fromkeys([*skip, *extra, *unfamiliar]))


def unfamiliar_patterns(items: list[_Item], skip: Sequence[str]) -> list[str]:
    """Skip patterns for the 2-D weights in the decoder layers left unquantized because their module is not a
    known nn.Linear projection (and not skipped by the user)."""
    modules = [
        module_name(i.source.name)
        for i in items
        if not i.quantize and _is_layer_matrix(i.source) and not matches_skip(module_name(i.source.name), skip)
    ]
    return list(dict.fromkeys(_unfamiliar_pattern(m) for m in modules))


def bnb_quantization_config(
    quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: list[str] | None
) -> dict[str, object]:
    """The `quantization_config` transformers 5 writes for BitsAndBytesConfig(load_in_4bit=True, ...)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


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
    config, tensors = read_checkpoint(model_dir)
    items = _plan(tensors, quant_type, blocksize, double_quant, skip)
    prepare_out_dir([model_dir], out_dir, overwrite)
    shards = split_shards(items, max_shard_bytes)
    names = shard_names(len(shards))
    with atomic_output_dir(out_dir) as tmp:
        stats = _write_shards(tmp, shards, names, quant_type, blocksize, double_quant, progress)
        out_config = dict(config)
        out_config["quantization_config"] = bnb_quantization_config(
            quant_type, double_quant, compute_dtype, skip_modules_for_config(items, skip)
        )
        write_config(tmp, out_config)
        write_index(tmp, stats.shard_tensors, stats.bytes_after, stats.params_saved)
        copy_side_files(model_dir, tmp)
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
        unfamiliar=unfamiliar_patterns(items, skip),
    )


@dataclass
class _WriteStats:
    params_quantized: int = 0
    quantized_bytes: int = 0  # packed codes + block scales of the quantized weights
    bytes_after: int = 0
    params_saved: int = 0  # what transformers' num_parameters() reports for the loaded 4-bit model
    shard_tensors: dict[str, list[str]] = field(default_factory=dict)


def _write_shards(
    tmp: Path,
    shards: list[list[_Item]],
    names: list[str],
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    progress: bool,
) -> _WriteStats:
    """Read, quantize and write every item (see nibblora.export.write_shards)."""
    stats = _WriteStats()
    written = write_shards(
        tmp,
        shards,
        names,
        lambda item: _prepare_item(item, quant_type, blocksize, double_quant, stats),
        desc="quantizing",
        progress=progress,
    )
    stats.shard_tensors, stats.bytes_after = written.shard_tensors, written.nbytes
    return stats


def _prepare_item(
    item: _Item, quant_type: str, blocksize: int, double_quant: bool, stats: _WriteStats
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
    weight = read_tensor(t)
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
