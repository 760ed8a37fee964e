"""merge_checkpoint: a Hugging Face checkpoint plus peft LoRA adapters in, one merged checkpoint out.

The run is planned completely before anything is written: every adapter key is matched to a base tensor, every
shape checked, every output tensor's dtype, shape and shard fixed, so bad input fails before the first byte.
Then tensors stream through one at a time: the Rust core reads the base tensor from the memory-mapped shard,
adds the updates in float32 and casts once (in parallel over row blocks), the bytes are written at their
planned place, and the tensor's pages are dropped. Untouched tensors are copied file to file. Everything goes
into a hidden sibling folder renamed into place only once complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nibblora._native import merge_array
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
from nibblora.dtypes import ANY_FLOAT_DTYPES, FLOAT_DTYPES, TORCH_NAME_TO_SAFETENSORS, torch_dtype
from nibblora.errors import CheckpointError
from nibblora.lora.config import matches_target
from nibblora.merge.adapter_source import AdapterSource, LoRAModule, MergeError, read_adapter
from nibblora.merge.methods import METHODS, Contribution, combine
from nibblora.quant import from_bnb_state_dict, quantize_4bit, to_bnb_state_dict
from nibblora.quant.bnb_format import (
    BLOCKSIZES,
    BNB_PARTS,
    BNB_QUANT_TYPES,
    bnb_quantization_config,
    bnb_specs,
    find_quant_state_key,
    is_decoder_linear_weight,
    skip_modules_for_config,
)

OUT_DTYPES = TORCH_NAME_TO_SAFETENSORS  # --dtype choices -> safetensors names
QUANT_TYPES = BNB_QUANT_TYPES  # --quantize choices
_FLOAT_DTYPES = FLOAT_DTYPES
# Re-quantization "erases" a layer's update when the 4-bit rounding error is larger than the update; when it
# does so in more than this share of the re-quantized layers, the merged model has mostly lost the fine-tune.
ERASED_SHARE_LIMIT = 0.5


@dataclass(frozen=True)
class QuantReportRow:
    """A re-quantized merged weight: how large the merge's update is against the error of re-quantizing."""

    name: str
    update_norm: float  # ||W_merged - W_base||_F
    quant_error_norm: float  # ||Q(W_merged) - W_merged||_F

    @property
    def ratio(self) -> float:
        return self.update_norm / self.quant_error_norm if self.quant_error_norm > 0 else float("inf")


@dataclass
class MergeSummary:
    out_dir: Path
    method: str
    adapters: list[str]
    out_dtype: str
    quantize: str | None
    tensors_total: int
    tensors_merged: int
    tensors_replaced: int
    params_total: int
    bytes_written: int
    seconds: float
    shards: list[str] = field(default_factory=list)
    quant_report: list[QuantReportRow] = field(default_factory=list)
    accept_quantization_loss: bool = False

    @property
    def erased_layers(self) -> int:
        """Re-quantized layers whose update is smaller than their 4-bit rounding error."""
        return sum(r.ratio < 1 for r in self.quant_report)

    @property
    def fine_tune_mostly_lost(self) -> bool:
        """Re-quantization rounded away the update in most of the layers the adapters changed."""
        return bool(self.quant_report) and self.erased_layers > ERASED_SHARE_LIMIT * len(self.quant_report)

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 1 when the fine-tune was mostly lost and that was not accepted, else 0."""
        return 1 if self.fine_tune_mostly_lost and not self.accept_quantization_loss else 0

    def format(self) -> str:
        what = f"{len(self.adapters)} adapter{'s' if len(self.adapters) != 1 else ''}"
        lines = [
            f"merged {what} ({self.method}) into {self.tensors_merged} of {self.tensors_total} tensors"
            + (f", replaced {self.tensors_replaced} (modules_to_save)" if self.tensors_replaced else "")
            + f" in {self.seconds:.1f} s",
            f"parameters: {self.params_total:,}; output {self.out_dtype}"
            + (f", re-quantized to {self.quantize}" if self.quantize else "")
            + f", {human_bytes(self.bytes_written)}",
            f"wrote {self.out_dir} ({len(self.shards)} shard{'s' if len(self.shards) != 1 else ''})",
        ]
        if self.quant_report:
            lines.append(
                "re-quantization, per layer: ||update|| vs ||quantization error|| (ratio < 1: the "
                "4-bit rounding is larger than what the adapter changed)"
            )
            width = max(len(r.name) for r in self.quant_report)
            for r in self.quant_report:
                flag = "  <- adapter mostly erased" if r.ratio < 1 else ""
                lines.append(
                    f"  {r.name:<{width}}  {r.update_norm:10.4g}  {r.quant_error_norm:10.4g}  {r.ratio:8.3f}{flag}"
                )
            erased = self.erased_layers
            lines.append(f"{erased} of {len(self.quant_report)} layers: update smaller than the quantization error")
            if self.fine_tune_mostly_lost:
                lines.append(
                    f"WARNING: re-quantizing to {self.quantize} erased most of the fine-tune: in {erased} of "
                    f"{len(self.quant_report)} changed layers the 4-bit rounding is larger than what the adapter "
                    "changed, so the merged model will behave much like the base model. Keep the merge in 16-bit "
                    "(drop --quantize; use --dtype bfloat16) and load it in 4-bit at run time, or serve the base "
                    "with the adapter unmerged."
                    + (
                        ""
                        if self.accept_quantization_loss
                        else " The output was written, but the exit status is 1; pass --accept-quantization-loss to "
                        "accept this."
                    )
                )
        return "\n".join(lines)


@dataclass
class _Base:
    """The base checkpoint: its open shards (the one checkpoint reader) and every tensor by name."""

    directory: Path
    config: dict
    ckpt: Checkpoint
    quantized: dict[str, tuple[str, str, tuple[int, ...]]]  # weight -> (quant_type, dtype, logical shape)

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        return self.ckpt.entries

    def parts(self, weight: str) -> list[str]:
        """A 4-bit weight's stored tensors: packed codes, scales, maps, quant state."""
        names = [weight, *(f"{weight}.{p}" for p in BNB_PARTS)]
        state = find_quant_state_key(self.tensors.keys(), weight)
        return [n for n in names if n in self.tensors] + ([state] if state else [])


@dataclass
class _Item:
    """One output weight (or a 4-bit weight's group of tensors) and what goes into it."""

    source: TensorEntry  # logical name / dtype / shape (for a 4-bit base: of the dequantized weight)
    specs: list[TensorSpec]
    deferred: list[DeferredSpec]
    quantize: bool = False  # written in bitsandbytes 4-bit
    copy: bool = False  # bytes copied file to file
    contributions: list[tuple[int, LoRAModule]] = field(default_factory=list)
    replacement: tuple[int, str] | None = None

    @property
    def planned_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs) + sum(d.max_nbytes for d in self.deferred)


def _read_base(model_dir: Path) -> _Base:
    if not model_dir.is_dir():
        raise MergeError(f"{model_dir}: base model folder does not exist")
    config_path = model_dir / CONFIG_FILE
    try:
        config = read_config(model_dir)
        quant = config.get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise MergeError(
                f"{config_path}: quantization_config is a JSON {type(quant).__name__}, expected an "
                "object (or leave it out for a full-precision base)"
            )
        if quant and (
            quant.get("quant_method") != "bitsandbytes"
            or not quant.get("load_in_4bit", True)
            or quant.get("load_in_8bit")
        ):
            method = str(quant.get("quant_method"))[:100]
            raise MergeError(
                f"{config_path}: quantization {method!r} is not supported; "
                "bases are full precision or bitsandbytes 4-bit"
            )
        compute = (quant.get("bnb_4bit_compute_dtype") or "float32") if quant else "float32"
        if compute not in OUT_DTYPES:
            raise MergeError(
                f"{config_path}: bnb_4bit_compute_dtype {str(compute)[:100]!r} is not one of {', '.join(OUT_DTYPES)}"
            )
        ckpt = open_checkpoint(model_dir, require_config=False)
    except CheckpointError as err:
        raise MergeError(str(err)) from None
    names = ckpt.entries.keys()
    quantized = {}
    for name, entry in ckpt.entries.items():
        state = find_quant_state_key(names, name) if entry.dtype == "U8" else None
        if state is not None:
            quantized[name] = _quant_state_summary(ckpt, state)
    return _Base(model_dir, config, ckpt, quantized)


def _quant_state_summary(ckpt: Checkpoint, state: str) -> tuple[str, str, tuple[int, ...]]:
    """(quant type, safetensors dtype, logical 2-D shape) from a bitsandbytes quant state, every field checked."""
    where = f"{ckpt.file_of(state)}: {state!r}"
    try:
        meta = json.loads(bytes(ckpt.read_bytes(state)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise MergeError(f"{where} is not a JSON quant state ({type(err).__name__})") from None
    if not isinstance(meta, dict):
        raise MergeError(f"{where} is not a JSON object")
    quant_type, dtype, shape, blocksize = (meta.get(k) for k in ("quant_type", "dtype", "shape", "blocksize"))
    problems = []
    if quant_type not in BNB_QUANT_TYPES:
        problems.append(f"quant_type {str(quant_type)[:40]!r} is not nf4 or fp4")
    if dtype not in OUT_DTYPES:
        problems.append(f"dtype {str(dtype)[:40]!r} is not float32, bfloat16 or float16")
    if blocksize not in BLOCKSIZES or isinstance(blocksize, bool):
        problems.append(f"blocksize {str(blocksize)[:40]} is not a power of two from 32 to 4096")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**40 for d in shape)
    ):
        problems.append(f"shape {str(shape)[:40]} is not two positive integers")
    if problems:
        raise MergeError(f"{where}: not a valid bitsandbytes quant state ({'; '.join(problems)})")
    assert isinstance(quant_type, str) and isinstance(dtype, str) and isinstance(shape, list)  # checked above
    return quant_type, OUT_DTYPES[dtype], (int(shape[0]), int(shape[1]))


def _target_of(base: _Base, module: str) -> str | None:
    """The base tensor a LoRA on `module` updates: `module.weight`, or with tied embeddings (no lm_head.weight
    in the checkpoint) the input embedding it shares."""
    name = f"{module}.weight"
    if name in base.tensors:
        return name
    if module.rsplit(".", 1)[-1] == "lm_head":
        embeds = [n for n in base.tensors if n.endswith("embed_tokens.weight")]
        if len(embeds) == 1:
            return embeds[0]
    return None


def _logical(base: _Base, name: str) -> tuple[str, tuple[int, ...]]:
    if name in base.quantized:
        return base.quantized[name][1], base.quantized[name][2]
    return base.tensors[name].dtype, base.tensors[name].shape


def _match_adapters(base: _Base, adapters: list[AdapterSource]) -> tuple[dict, dict]:
    """{base tensor: [(adapter index, LoRAModule)]} and {base tensor: (adapter index, key)}, all checked."""
    updates: dict[str, list[tuple[int, LoRAModule]]] = {}
    replacements: dict[str, tuple[int, str]] = {}
    for i, adapter in enumerate(adapters):
        where = adapter.weights_path
        for module, entry in adapter.modules.items():
            target = _target_of(base, module)
            if target is None:
                raise MergeError(
                    f"{where}: {entry.a_key!r} targets {module}.weight, which the base checkpoint "
                    f"{base.directory} does not have; the adapter was made for a different base model"
                )
            dtype, shape = _logical(base, target)
            if dtype not in _FLOAT_DTYPES or len(shape) != 2:
                raise MergeError(
                    f"{where}: {entry.a_key!r} targets {target!r}, a {dtype} {list(shape)} tensor; "
                    "LoRA merges into 2-D float weights only"
                )
            rows, cols = shape
            a_shape, b_shape = adapter.shapes[entry.a_key][1], adapter.shapes[entry.b_key][1]
            out_f, in_f = (cols, rows) if entry.transpose else (rows, cols)
            if a_shape[1] != in_f or b_shape[0] != out_f:
                raise MergeError(
                    f"{where}: {entry.a_key!r} {list(a_shape)} and {entry.b_key!r} {list(b_shape)} do "
                    f"not fit {target!r} {list(shape)}; the adapter was made for a different base model"
                )
            updates.setdefault(target, []).append((i, entry))
        for inner, key in adapter.replacements.items():
            if inner not in base.tensors and not (inner.endswith("lm_head.weight") and _target_of(base, "lm_head")):
                raise MergeError(
                    f"{where}: {key!r} (modules_to_save) replaces {inner!r}, which the base checkpoint does not have"
                )
            want = _logical(base, inner)[1] if inner in base.tensors else _logical(base, _target_of(base, "lm_head"))[1]
            if adapter.shapes[key][1] != want:
                raise MergeError(
                    f"{where}: {key!r} has shape {list(adapter.shapes[key][1])} but {inner!r} has {list(want)}"
                )
            if inner in replacements:
                raise MergeError(
                    f"{where}: {inner!r} is replaced by two adapters (modules_to_save); merge them one at a time"
                )
            replacements[inner] = (i, key)
    for adapter in adapters:
        for inner, key in adapter.saved_base_layers.items():
            target = _target_of(base, inner.removesuffix(".weight"))
            if target is None or adapter.shapes[key][1] != _logical(base, target)[1]:
                raise MergeError(
                    f"{adapter.weights_path}: {key!r} (the embedding peft saved with the adapter) does "
                    "not match the base checkpoint's; merging into a resized vocabulary is not supported"
                )
    for name in set(updates) & set(replacements):
        raise MergeError(f"{name!r} is both replaced (modules_to_save) and LoRA-adapted; that adapter is inconsistent")
    for i, adapter in enumerate(adapters):
        _check_targets_covered(base, adapter, {n for n, c in updates.items() if any(j == i for j, _ in c)})
    return updates, replacements


def _check_targets_covered(base: _Base, adapter: AdapterSource, covered: set[str]) -> None:
    """Every base linear weight that target_modules selects must have LoRA weights in the file."""
    cfg = adapter.config
    targets = cfg.get("target_modules")
    if (
        not targets
        or targets == "all-linear"
        or any(cfg.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    ):
        return
    for name in base.tensors:
        if not name.endswith(".weight") or name in covered:
            continue
        module = name[: -len(".weight")]
        _, shape = _logical(base, name)
        if len(shape) == 2 and matches_target(module, targets):
            raise MergeError(
                f"{adapter.weights_path}: missing base_model.model.{module}.lora_A.weight: "
                f"target_modules {targets!r} selects {module!r} but the file has no weights for it"
            )


def _plan(
    base: _Base, adapters: list[AdapterSource], out_dtype: str, quantize: str | None, blocksize: int, double_quant: bool
) -> list[_Item]:
    updates, replacements = _match_adapters(base, adapters)
    out_st = OUT_DTYPES[out_dtype]
    parts_of_quantized = {p for w in base.quantized for p in base.parts(w) if p != w}
    items: list[_Item] = []
    for name, t in base.tensors.items():
        if name in parts_of_quantized:
            continue
        dtype, shape = _logical(base, name)
        logical = TensorEntry(
            name,
            dtype,
            shape,
            t.path,
            t.offset,
            sum(base.tensors[p].nbytes for p in base.parts(name)) if name in base.quantized else t.nbytes,
        )
        contributions = updates.get(name, [])
        replacement = replacements.get(name)
        in_4bit = name in base.quantized
        if not in_4bit and name.endswith(".weight") and dtype not in ANY_FLOAT_DTYPES:
            # A model's weights are real numbers: integer "weights" would be cast to float and merged as if they
            # were (values in the billions). 4-bit weights were recognised above by their quant state.
            raise MergeError(
                f"{t.path}: tensor {name!r} has dtype {dtype}; a weight must be floating point (F32, "
                "BF16 or F16), so this base checkpoint is damaged or in a format merge does not read"
            )
        requantize = quantize is not None and (
            in_4bit or (not base.quantized and is_decoder_linear_weight(name, shape))
        )
        if requantize:
            assert quantize is not None
            changed = contributions or replacement or (in_4bit and base.quantized[name][0] != quantize)
            if in_4bit and not changed:  # an untouched 4-bit weight stays byte for byte what it was
                specs = [TensorSpec(p, base.tensors[p].dtype, base.tensors[p].shape) for p in base.parts(name)]
                items.append(_Item(logical, specs, [], quantize=True, copy=True))
                continue
            specs, deferred = bnb_specs(name, out_st, shape, quantize, blocksize, double_quant)
            items.append(_Item(logical, specs, deferred, True, False, contributions, replacement))
            continue
        if dtype not in _FLOAT_DTYPES:  # integer buffers and the like: as they are
            items.append(_Item(logical, [TensorSpec(name, dtype, shape)], [], copy=True))
            continue
        copy = not contributions and not replacement and not in_4bit and dtype == out_st
        items.append(_Item(logical, [TensorSpec(name, out_st, shape)], [], False, copy, contributions, replacement))
    # A tied lm_head replaced by modules_to_save: the output gets its own lm_head.weight (and is untied).
    for inner, replacement in replacements.items():
        if inner not in base.tensors:
            i, key = replacement
            shape = adapters[i].shapes[key][1]
            src = TensorEntry(inner, adapters[i].shapes[key][0], shape, adapters[i].weights_path, 0, 0)
            items.append(_Item(src, [TensorSpec(inner, out_st, shape)], [], replacement=replacement))
    return items


def _contribution(adapter: AdapterSource, entry: LoRAModule, weight: float) -> Contribution:
    a, b = adapter.read(entry.a_key), adapter.read(entry.b_key)
    if entry.transpose:  # stored [in, out]: (B @ A)^T = A^T @ B^T
        return Contribution(a.T.contiguous(), b.T.contiguous(), entry.scale, weight)
    return Contribution(b, a, entry.scale, weight)


def _dtype(st: str) -> torch.dtype:
    return torch_dtype(st)


def merge_checkpoint(
    base_dir: str | os.PathLike[str],
    adapter_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    density: float = 1.0,
    rank: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    quantize: str | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    accept_quantization_loss: bool = False,
) -> MergeSummary:
    """Merge peft LoRA adapters into a Hugging Face checkpoint and write the result as a new checkpoint.

    base_dir: config.json plus model.safetensors (or shards with their index); full precision, or bitsandbytes
        4-bit (ours or transformers'), which is dequantized to its compute dtype first, as training saw it.
    adapter_dirs: peft adapter folders (adapter_config.json + adapter_model.safetensors). rank_pattern,
        alpha_pattern, use_rslora, fan_in_fan_out, DoRA magnitudes and modules_to_save are honoured.
    weights: one per adapter (default 1.0 each). method: linear | cat | ties | dare_linear | dare_ties (see
        nibblora.merge.methods); density: share kept by TIES / DARE; rank: truncate the combined update by SVD;
        seed: DARE's random draws.
    dtype: float32 | bfloat16 | float16 of the output's float tensors (default: the base's, or its 4-bit compute
        dtype). quantize: nf4 | fp4 re-quantizes the decoder's linear weights (bitsandbytes layout, blocksize,
        double_quant) and reports per layer the update against the quantization error. When the 4-bit rounding
        is larger than the update in most re-quantized layers, the summary says the fine-tune is mostly lost
        and its `exit_code` is 1 (the CLI's exit status) unless `accept_quantization_loss`.
    out_dir: written atomically; must be absent or empty unless `overwrite`.
    Raises MergeError (a ValueError) naming the file and tensor; nothing is written then.
    """
    start = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_paths = [Path(a) for a in adapter_dirs]
    if not adapter_paths:
        raise MergeError("no adapter given: pass at least one --adapter DIR")
    weights = [1.0] * len(adapter_paths) if not weights else list(weights)
    if len(weights) != len(adapter_paths):
        raise MergeError(f"{len(weights)} weights for {len(adapter_paths)} adapters: give one --weight per --adapter")
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")
    if rank is not None and rank < 1:
        raise MergeError(f"rank must be a positive integer, got {rank}")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise MergeError(f"dtype {dtype!r} is not supported: use float32, bfloat16 or float16")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise MergeError(f"quantize {quantize!r} is not supported: use nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise MergeError(f"blocksize {blocksize} is not supported: use a power of two from 32 to 4096")
    max_shard_bytes = parse_size(max_shard_size)

    base = _read_base(base_dir)
    adapters = [read_adapter(p) for p in adapter_paths]
    if any(e.magnitude_key for a in adapters for e in a.modules.values()) and (
        len(adapters) > 1 or method != "linear" or rank is not None
    ):
        raise MergeError(
            "DoRA adapters merge alone with method 'linear' and no --rank (the magnitude rescales "
            "the whole weight, so it does not combine with other updates)"
        )
    qconfig = base.config.get("quantization_config") or {}
    compute = str(qconfig.get("bnb_4bit_compute_dtype") or "float32") if base.quantized else None
    out_dtype = dtype or compute or _majority_dtype(base)
    items = _plan(base, adapters, out_dtype, quantize, blocksize, double_quant)
    check_out_dir(out_dir, overwrite, [base_dir, *adapter_paths], MergeError)
    shards = split_shards(items, max_shard_bytes)
    names = shard_names(len(shards))
    report: list[QuantReportRow] = []
    prepare = _Preparer(
        base,
        adapters,
        weights,
        method,
        density,
        rank,
        seed,
        out_dtype,
        compute,
        quantize,
        blocksize,
        double_quant,
        report,
    )
    try:
        with atomic_output_dir(out_dir) as tmp:
            written = write_shards(tmp, shards, names, prepare, desc="merging", progress=progress)
            write_config(tmp, _out_config(base, items, out_dtype, quantize, double_quant))
            write_index(tmp, written.shard_tensors, written.nbytes, sum(i.source.numel for i in items))
            copy_side_files(base_dir, tmp)
            verify_written_checkpoint(tmp, written.tensors)
    finally:
        base.ckpt.close()
    return MergeSummary(
        out_dir=out_dir,
        method=method,
        adapters=[str(p) for p in adapter_paths],
        out_dtype=out_dtype,
        quantize=quantize,
        tensors_total=len(items),
        tensors_merged=sum(bool(i.contributions) for i in items),
        tensors_replaced=sum(i.replacement is not None for i in items),
        params_total=sum(i.source.numel for i in items),
        bytes_written=written.nbytes,
        seconds=time.perf_counter() - start,
        shards=names,
        quant_report=report,
        accept_quantization_loss=accept_quantization_loss,
    )


def _majority_dtype(base: _Base) -> str:
    sizes: dict[str, int] = {}
    for t in base.tensors.values():
        if t.dtype in _FLOAT_DTYPES:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    st = max(sizes, key=sizes.__getitem__) if sizes else "F32"
    return {v: k for k, v in OUT_DTYPES.items()}[st]


def _out_config(base: _Base, items: list[_Item], out_dtype: str, quantize: str | None, double_quant: bool) -> dict:
    config = dict(base.config)
    config.pop("quantization_config", None)
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = out_dtype
    if any(i.source.name not in base.tensors for i in items):
        config["tie_word_embeddings"] = False  # a replaced lm_head of a tied model now stands alone
    if quantize is not None:
        old = base.config.get("quantization_config") or {}
        skip = (
            old.get("llm_int8_skip_modules")
            if base.quantized
            else skip_modules_for_config([(i.source.name, i.source.shape, i.quantize) for i in items], [])
        )
        config["quantization_config"] = bnb_quantization_config(quantize, double_quant, out_dtype, skip)
    return config


@dataclass
class _Preparer:
    """Computes one item's output (called in order by write_shards) and returns the job that writes it."""

    base: _Base
    adapters: list[AdapterSource]
    weights: list[float]
    method: str
    density: float
    rank: int | None
    seed: int
    out_dtype: str
    compute: str | None
    quantize: str | None
    blocksize: int
    double_quant: bool
    report: list[QuantReportRow]

    def __call__(self, item: _Item) -> Callable[[SafetensorsWriter], None]:
        t = item.source
        if item.copy:
            return self._copy([s.name for s in item.specs])
        release_freed_memory()
        out_st = OUT_DTYPES[self.out_dtype]
        if item.replacement is not None:
            i, key = item.replacement
            merged = self.adapters[i].read(key, _dtype(out_st))
        else:
            merged = self._merge(item, out_st)
        if not item.quantize:
            return self._write({t.name: merged})
        base_w = self._base_float32(t.name) if item.contributions or item.replacement else None
        try:
            q = quantize_4bit(merged, self.quantize, self.blocksize, self.double_quant, name=t.name)
        except ValueError as err:
            raise MergeError(f"re-quantizing {t.name}: {err}") from None
        if base_w is not None:
            merged32 = merged.float()
            error = (q.dequantize(torch.float32) - merged32).norm().item()
            self.report.append(QuantReportRow(t.name, (merged32 - base_w).norm().item(), error))
        return self._write(to_bnb_state_dict(q, t.name))

    def _merge(self, item: _Item, out_st: str) -> torch.Tensor:
        t = item.source
        terms, dense, magnitude = [], None, None
        if item.contributions:
            contributions = [_contribution(self.adapters[i], e, self.weights[i]) for i, e in item.contributions]
            terms, dense = combine(
                contributions, self.method, density=self.density, rank=self.rank, seed=self.seed, name=t.name
            )
            mags = [self.adapters[i].read(e.magnitude_key).numpy() for i, e in item.contributions if e.magnitude_key]
            magnitude = mags[0] if mags else None
        try:
            if t.name in self.base.quantized:
                w = self._dequantized(t.name)
                raw = w.reshape(-1).view(torch.uint8).numpy()
                out = merge_array(
                    raw, OUT_DTYPES[self.compute or "float32"], list(t.shape), out_st, terms, dense, magnitude
                )
            else:
                out = self.base.ckpt.handle_of(t.name).merge(t.name, out_st, terms, dense, magnitude)
        except ValueError as err:
            if not item.contributions:
                raise MergeError(f"{t.path}: {err}") from None
            sources = ", ".join(sorted({str(self.adapters[i].weights_path) for i, _ in item.contributions}))
            raise MergeError(
                f"merging {t.name}: the update from {sources} makes the weight non-finite "
                f"(overflow in {out_st}?): {err}"
            ) from None
        return torch.from_numpy(out).view(_dtype(out_st)).reshape(t.shape)

    def _dequantized(self, name: str) -> torch.Tensor:
        """A 4-bit base weight in its training compute dtype (what the adapter was trained against)."""
        parts = {}
        for p in self.base.parts(name):
            src = self.base.tensors[p]
            raw = torch.from_numpy(self.base.ckpt.read_bytes(p))
            parts[p] = raw.view(_dtype(src.dtype)).reshape(src.shape)
        try:
            q = from_bnb_state_dict(parts, name)
        except (KeyError, ValueError) as err:
            raise MergeError(f"{self.base.directory}: {err}") from None
        return q.dequantize(_dtype(OUT_DTYPES[self.compute or "float32"])).contiguous()

    def _base_float32(self, name: str) -> torch.Tensor:
        if name in self.base.quantized:
            return self._dequantized(name).float()
        src = self.base.tensors[name]
        raw = torch.from_numpy(self.base.ckpt.read_bytes(name))
        return raw.view(_dtype(src.dtype)).reshape(src.shape).float()

    def _copy(self, names: list[str]) -> Callable[[SafetensorsWriter], None]:
        sources = [self.base.tensors[n] for n in names]

        def copy(writer: SafetensorsWriter) -> None:
            for src in sources:
                with open(src.path, "rb") as f:
                    writer.copy_from(src.name, f, src.offset)

        return copy

    @staticmethod
    def _write(tensors: dict[str, torch.Tensor]) -> Callable[[SafetensorsWriter], None]:
        def write(writer: SafetensorsWriter) -> None:
            for key, value in tensors.items():
                writer.write(key, value)

        return write
