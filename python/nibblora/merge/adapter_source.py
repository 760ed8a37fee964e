"""Reading a peft LoRA adapter for merging: its config resolved per module, its tensors checked by the Rust reader.

Keys (peft's saved format, adapter name removed, prefix `base_model.model.`):
    <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]       nn.Linear (and Conv1D with fan_in_fan_out)
    <module>.lora_embedding_A [r, num_embeddings], <module>.lora_embedding_B [dim, r]    nn.Embedding
    <module>.lora_magnitude_vector[.weight] [out]                          DoRA
    anything else, e.g. lm_head.weight                                     modules_to_save: replaces the base tensor
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nibblora._native import SafetensorsFile
from nibblora.export import ExportError
from nibblora.lora.adapters import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, lora_config_from_peft, read_adapter_config
from nibblora.lora.config import lora_scaling
from nibblora.safetensors_writer import SAFETENSORS_DTYPES


class MergeError(ExportError):
    """Bad merge input (files, keys, shapes, options): nothing is written; the CLI exits with code 2."""


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<linear>lora_[AB])\.weight|(?P<embedding>lora_embedding_[AB])"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?)$"
)


@dataclass
class LoRAModule:
    """One adapted module of one adapter. The update of its weight is (B @ A) * scale, transposed when
    `transpose` (fan_in_fan_out Conv1D weights are stored [in, out]; embeddings [num_embeddings, dim])."""

    module: str
    a_key: str | None = None
    b_key: str | None = None
    magnitude_key: str | None = None
    transpose: bool = False
    rank: int = 0
    scale: float = 0.0


@dataclass
class AdapterSource:
    directory: Path
    config: dict
    file: SafetensorsFile
    shapes: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype, shape)
    modules: dict[str, LoRAModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key
    # <module>.base_layer.weight: peft's copy of an adapted embedding's base weight (save_embedding_layers)
    saved_base_layers: dict[str, str] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `key` in `dtype` (a copy)."""
        st_dtype, shape = self.shapes[key]
        raw = torch.from_numpy(self.file.read(key))
        return raw.view(SAFETENSORS_DTYPES[st_dtype][0]).reshape(shape).to(dtype)


def read_adapter(directory: str | Path) -> AdapterSource:
    """Read and check an adapter folder: a LoRA adapter_config.json and adapter_model.safetensors whose keys
    are all understood and whose A / B shapes agree with the (per-module) rank. Raises MergeError naming the key."""
    directory = Path(directory)
    try:
        config = read_adapter_config(directory)
    except (FileNotFoundError, ValueError) as err:
        raise MergeError(str(err)) from None
    config_path = directory / CONFIG_NAME
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters merge")
    if config.get("lora_bias"):
        raise MergeError(f"{config_path}: lora_bias=true (a trained bias on lora_B) is not supported")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise MergeError(f"{config_path}: missing {key!r}")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        hint = " (found adapter_model.bin: re-save it as safetensors)" if (directory / "adapter_model.bin").exists() else ""
        raise MergeError(f"reading adapter: {weights_path} does not exist{hint}")
    try:
        file = SafetensorsFile(weights_path)
    except (OSError, ValueError) as err:
        raise MergeError(str(err)) from None
    source = AdapterSource(
        directory, config, file, {name: (dtype, tuple(shape)) for name, dtype, shape, _, _ in file.tensors()}
    )
    lora_config = lora_config_from_peft(config)
    for key in source.shapes:
        if not key.startswith(KEY_PREFIX):
            raise MergeError(f"{weights_path}: unknown tensor {key!r} (peft keys start with {KEY_PREFIX!r})")
        inner = key[len(KEY_PREFIX):]
        match = _LORA_KEY.match(inner)
        if match is None:
            if "lora_" in inner:
                raise MergeError(f"{weights_path}: unknown LoRA tensor {key!r}")
            if inner.endswith(".base_layer.weight"):
                source.saved_base_layers[inner.removesuffix(".base_layer.weight") + ".weight"] = key
                continue
            source.replacements[inner] = key  # modules_to_save (or a trained bias): replaces the base tensor
            continue
        entry = source.modules.setdefault(match["module"], LoRAModule(match["module"]))
        if match["magnitude"]:
            entry.magnitude_key = key
        else:
            which = (match["linear"] or match["embedding"])[-1]
            setattr(entry, f"{which.lower()}_key", key)
            entry.transpose = bool(match["embedding"]) or bool(config.get("fan_in_fan_out"))
    for name, entry in sorted(source.modules.items()):
        if entry.a_key is None or entry.b_key is None:
            present = entry.a_key or entry.b_key or entry.magnitude_key
            missing = "lora_B" if entry.a_key else "lora_A"
            raise MergeError(f"{weights_path}: {name!r} has {present!r} but no {missing}; the adapter file is incomplete")
        entry.rank = lora_config.rank_for(name)
        a_shape, b_shape = source.shapes[entry.a_key][1], source.shapes[entry.b_key][1]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != entry.rank or b_shape[1] != entry.rank:
            raise MergeError(
                f"{weights_path}: {entry.a_key!r} {list(a_shape)} and {entry.b_key!r} {list(b_shape)} do not have "
                f"rank {entry.rank} (r / rank_pattern in {CONFIG_NAME})"
            )
        entry.scale = lora_scaling(entry.rank, lora_config.alpha_for(name), lora_config.rslora)
        if entry.magnitude_key is not None:
            if entry.transpose:
                raise MergeError(f"{weights_path}: DoRA on a transposed weight ({name!r}) is not supported")
            if source.shapes[entry.magnitude_key][1] != (b_shape[0],):
                raise MergeError(
                    f"{weights_path}: {entry.magnitude_key!r} has shape {list(source.shapes[entry.magnitude_key][1])}, "
                    f"expected [{b_shape[0]}] (the output size of {name!r})"
                )
    return source
