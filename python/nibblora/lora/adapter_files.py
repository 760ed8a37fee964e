"""Reading a peft adapter folder, once, for every tool (load_adapter, merge, verify, the trainer's resume).

    files = read_adapter_files("out/adapter")                 # AdapterFiles: config checked, header checked
    files.modules["model.layers.0.self_attn.q_proj"].a_key    # grouped LoRA keys, ranks and scales resolved
    a = files.read(files.modules[...].a_key)                  # float32 copy; non-finite values refused

The header goes through nibblora's Rust reader (`nibblora._native.SafetensorsFile`: sizes, offsets, overlaps,
dtype widths and truncation checked before any read), and tensors are read one at a time from the mapped file.
Every refusal is an AdapterError (or CheckpointFileNotFoundError for a missing file) whose one-line message
starts with the phase and names the file and the key or tensor.

Keys (peft's saved format, adapter name removed, prefix `base_model.model.`):
    <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]       nn.Linear (and Conv1D with fan_in_fan_out)
    <module>.lora_embedding_A [r, num_embeddings], <module>.lora_embedding_B [dim, r]    nn.Embedding
    <module>.lora_magnitude_vector[.weight] [out]                          DoRA
    <module>.base_layer.weight                                             peft's copy of an adapted embedding
    anything else, e.g. lm_head.weight                                     modules_to_save: replaces the base tensor
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nibblora._native import SafetensorsFile
from nibblora.dtypes import torch_dtype
from nibblora.errors import AdapterError, CheckpointError, CheckpointFileNotFoundError
from nibblora.lora.adapter_config import AdapterConfig, AnyAdapterConfig, parse_adapter_config, parse_any_adapter_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# Adapter tensors are weights: an integer tensor cast to float would load garbage (an I32 of 1 is 1.0, but an
# I32 holding float bits is 1.06e9), so only floating-point dtypes are read.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<linear>lora_[AB])\.weight|(?P<embedding>lora_embedding_[AB])"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?)$"
)


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of adapter_model.safetensors as its header describes it (dtype: safetensors name, e.g. "F32")."""

    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class AdapterModule:
    """One adapted module. Its weight's update is (B @ A) * scale, transposed when `transpose` (fan_in_fan_out
    Conv1D weights are stored [in, out], embeddings [num_embeddings, dim]); A is [rank, in], B is [out, rank]."""

    name: str
    a_key: str | None = None
    b_key: str | None = None
    magnitude_key: str | None = None  # DoRA: the per-output-row magnitude [out]
    embedding: bool = False  # lora_embedding_A / _B keys (an nn.Embedding)
    transpose: bool = False
    rank: int = 0
    scale: float = 0.0


@dataclass
class AdapterFiles:
    """An adapter folder whose config, header, keys, shapes and dtypes were checked (see read_adapter_files)."""

    directory: Path
    config: AdapterConfig
    file: SafetensorsFile
    tensors: dict[str, AdapterTensor]
    modules: dict[str, AdapterModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key (modules_to_save)
    # <module>.base_layer.weight: peft's copy of an adapted embedding's base weight (save_embedding_layers)
    saved_base_layers: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `key` as a new tensor of `dtype` and its stored shape. AdapterError if it holds NaN or infinity."""
        t = self.tensors[key]
        raw = torch.from_numpy(self.file.read(key))
        value = raw.view(torch_dtype(t.dtype)).reshape(t.shape)
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = (~finite).reshape(-1)
            first = int(bad.nonzero()[0, 0])
            index = list(torch.unravel_index(torch.tensor(first), t.shape)) if t.shape else []
            what = "NaN" if torch.isnan(value.reshape(-1)[first]) else "infinity"
            raise AdapterError(
                f"reading adapter weights: {self.weights_path}: tensor {key!r} holds {int(bad.sum())} non-finite "
                f"value(s) ({what} at index {[int(i) for i in index]}); the file is damaged or training diverged: "
                "use an earlier checkpoint of the adapter"
            )
        return value.to(dtype)

    def check_values(self) -> None:
        """Read every tensor once: AdapterError naming the first that holds NaN or infinity."""
        for key in self.tensors:
            self.read(key, torch_dtype(self.tensors[key].dtype))


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json as a dict, unvalidated (see parse_adapter_config); unknown keys are kept."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointFileNotFoundError(
            f"reading adapter config: {path} does not exist; point at a folder saved by peft's save_pretrained or "
            "nibblora.lora.save_adapter"
        )
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"reading adapter config: {path} is not valid JSON ({err})") from None
    except RecursionError:
        raise AdapterError(f"reading adapter config: {path} nests JSON too deeply to be an adapter config") from None
    except OSError as err:
        raise AdapterError(f"reading adapter config: {path} cannot be read ({err.strerror or err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"reading adapter config: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _open_weights(path: Path) -> SafetensorsFile:
    if not path.is_file():
        hint = " (found adapter_model.bin: re-save it as safetensors)" if path.with_suffix(".bin").exists() else ""
        raise CheckpointFileNotFoundError(f"reading adapter weights: {path} does not exist{hint}")
    try:
        return SafetensorsFile(path)
    except CheckpointError as err:  # the Rust reader's refusal (its message names the file and the fault)
        detail = str(err)
        for prefix in ("reading safetensors: ", f"{path}: "):
            detail = detail.removeprefix(prefix)
        raise AdapterError(f"reading adapter weights: {path}: {detail}") from None


def read_adapter_files(directory: str | Path, *, check_values: bool = True) -> AdapterFiles:
    """Read and check an adapter folder: adapter_config.json against the schema, adapter_model.safetensors's
    header, every key understood, float dtypes only, each lora_A / lora_B pair complete and 2-D with the module's
    rank (rank_pattern applied), every adapted module selected by target_modules, DoRA magnitudes [out].
    `check_values` reads every tensor once to refuse NaN / infinity up front (tools that will read each tensor
    later through `read`, which checks too, may skip it). Raises AdapterError naming the file and key."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    config = parse_adapter_config(read_adapter_config(directory), config_path)
    weights_path = directory / WEIGHTS_NAME
    file = _open_weights(weights_path)
    tensors = {name: AdapterTensor(name, dtype, tuple(shape)) for name, dtype, shape, _, _ in file.tensors()}
    files = AdapterFiles(directory, config, file, tensors)
    where = f"reading adapter weights: {weights_path}"
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"{where}: tensor {key!r} is {t.dtype}; adapter weights are floating point "
                f"({', '.join(FLOAT_DTYPES)}), so the file was not written by peft or is damaged"
            )
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"{where}: unknown tensor {key!r} (peft's keys start with {KEY_PREFIX!r})")
        inner = key[len(KEY_PREFIX) :]
        match = _LORA_KEY.match(inner)
        if match is None:
            if "lora_" in inner:
                raise AdapterError(
                    f"{where}: unknown LoRA tensor {key!r}; nibblora reads lora_A / lora_B, "
                    "lora_embedding_A / _B and lora_magnitude_vector keys"
                )
            if inner.endswith(".base_layer.weight"):
                files.saved_base_layers[inner.removesuffix(".base_layer.weight") + ".weight"] = key
            else:
                files.replacements[inner] = key  # modules_to_save (or a trained bias): replaces the base tensor
            continue
        entry = files.modules.setdefault(match["module"], AdapterModule(match["module"]))
        if match["magnitude"]:
            entry.magnitude_key = key
            continue
        embedding = bool(match["embedding"])
        if (entry.a_key or entry.b_key) and entry.embedding != embedding:
            raise AdapterError(f"{where}: {match['module']!r} has both lora_A/B and lora_embedding_A/B tensors")
        entry.embedding = embedding
        entry.transpose = embedding or config.fan_in_fan_out
        which = (match["linear"] or match["embedding"])[-1]
        setattr(entry, f"{which.lower()}_key", key)
    if not files.modules:
        raise AdapterError(
            f"{where}: the file holds no LoRA tensors (lora_A / lora_B), so there is nothing to "
            "apply; check that this is the adapter folder"
        )
    for _name, entry in sorted(files.modules.items()):
        _check_module(files, entry, where)
    if check_values:
        files.check_values()
    return files


def read_method_files(directory: str | Path, *, check_values: bool = True) -> tuple[AnyAdapterConfig, AdapterFiles]:
    """Read an adapter folder of any peft_type nibblora knows (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING): the
    config through `parse_any_adapter_config`, the safetensors header through the Rust reader, float dtypes only.
    Returns (config, files); a LORA folder is read by `read_adapter_files` (all its LoRA checks), the others leave
    their key checks to their method's loader (nibblora.methods). Raises AdapterError naming file and key."""
    directory = Path(directory)
    config = parse_any_adapter_config(read_adapter_config(directory), directory / CONFIG_NAME)
    if config.peft_type == "LORA":
        files = read_adapter_files(directory, check_values=check_values)
        return files.config, files
    weights_path = directory / WEIGHTS_NAME
    file = _open_weights(weights_path)
    tensors = {name: AdapterTensor(name, dtype, tuple(shape)) for name, dtype, shape, _, _ in file.tensors()}
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"reading adapter weights: {weights_path}: tensor {key!r} is {t.dtype}; adapter "
                f"weights are floating point ({', '.join(FLOAT_DTYPES)}), so the file was not written "
                "by peft or is damaged"
            )
    files = AdapterFiles(directory, config, file, tensors)  # type: ignore[arg-type]
    if check_values:
        files.check_values()
    return config, files


def _check_module(files: AdapterFiles, entry: AdapterModule, where: str) -> None:
    config, name = files.config, entry.name
    if entry.a_key is None or entry.b_key is None:
        present = entry.a_key or entry.b_key or entry.magnitude_key
        missing = "lora_B" if entry.a_key else "lora_A"
        key = (
            f"{KEY_PREFIX}{name}.lora_embedding_{missing[-1]}"
            if entry.embedding
            else f"{KEY_PREFIX}{name}.{missing}.weight"
        )
        raise AdapterError(
            f"{where}: {name!r} has {present!r} but no {missing} (missing {key}); the adapter file is incomplete"
        )
    if not config.selects(name):
        raise AdapterError(
            f"{where}: {entry.a_key!r} adapts {name!r}, which target_modules "
            f"{_show(config.target_modules)} in {CONFIG_NAME} does not select; the config and the "
            "weights disagree (was the config edited or copied from another adapter?)"
        )
    entry.rank = config.rank_for(name)
    a_shape, b_shape = files.tensors[entry.a_key].shape, files.tensors[entry.b_key].shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != entry.rank or b_shape[1] != entry.rank:
        raise AdapterError(
            f"{where}: {entry.a_key!r} {list(a_shape)} and {entry.b_key!r} {list(b_shape)} do not "
            f"have rank {entry.rank} (r / rank_pattern in {CONFIG_NAME})"
        )
    entry.scale = config.scaling_for(name)
    if entry.magnitude_key is not None:
        m_shape = files.tensors[entry.magnitude_key].shape
        out = b_shape[0]  # lora_B is [out, r] whatever the base weight's layout
        if m_shape != (out,):
            raise AdapterError(
                f"{where}: {entry.magnitude_key!r} has shape {list(m_shape)}, expected [{out}] (the "
                f"output size of {name!r})"
            )


def _show(targets: str | tuple[str, ...] | None) -> str:
    return repr(list(targets)) if isinstance(targets, tuple) else repr(targets)
