"""Read one peft LoRA folder into plain tensors for the serving engine, refusing what the engine cannot run.

This is the only place the serving code reads adapter files: adapter_config.json through nibblora.lora's
reader, adapter_model.safetensors directly (one flat dict of tensors, no module injection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nibblora.errors import AdapterError
from nibblora.lora.adapters import lora_config_from_peft, read_adapter_config
from nibblora.lora.config import lora_scaling

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")


@dataclass
class LoRAModuleWeights:
    """One adapted linear: lora_A [r, in], lora_B [out, r] (float32 on the host; a transposed view of a contiguous
    [r, out] tensor) and scaling (alpha / r or rsLoRA)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class AdapterWeights:
    """Every adapted module of one adapter, keyed by module name (`model.layers.0.self_attn.q_proj`)."""

    path: Path
    modules: dict[str, LoRAModuleWeights]

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.lora_A.nbytes + m.lora_B.nbytes for m in self.modules.values())


def read_lora_folder(directory: str | Path, targets: dict[str, tuple[int, int]]) -> AdapterWeights:
    """Read a peft LoRA adapter folder for a base whose adaptable linears are `targets` {name: (in, out)}.

    Returns float32 host tensors. Raises AdapterError naming the file or tensor for: a missing or broken folder,
    DoRA / non-LoRA / trained-bias / modules_to_save adapters, a key for a module the base does not have (or
    cannot adapt), a missing lora_A / lora_B of a pair, and a tensor whose shape does not fit its module and rank.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(
            f"reading adapter: {directory} is not a directory; pass a folder holding "
            "adapter_config.json and adapter_model.safetensors"
        )
    try:
        config = read_adapter_config(directory)
    except (OSError, ValueError) as err:
        raise AdapterError(f"reading adapter: {err}") from None
    config_path = directory / "adapter_config.json"
    _check_supported(config, config_path)
    try:
        lora_config = lora_config_from_peft(config)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"reading adapter config: {config_path}: {err}") from None
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(f"reading adapter: {weights_path} does not exist; save the adapter as safetensors")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterError(f"reading adapter: {weights_path} is not a readable safetensors file ({err})") from None

    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        if key.endswith("lora_magnitude_vector") or ".lora_magnitude_vector" in key:
            raise AdapterError(
                f"reading adapter: {weights_path}: tensor {key!r} is a DoRA magnitude; DoRA adapters "
                "cannot be served, merge the adapter into the base instead"
            )
        match = _KEY_RE.match(key.removeprefix(KEY_PREFIX))
        if match is None:
            raise AdapterError(
                f"reading adapter: {weights_path}: tensor {key!r} is not a LoRA weight; the server "
                "reads only '<module>.lora_A.weight' and '<module>.lora_B.weight'"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = key
    if not pairs:
        raise AdapterError(f"reading adapter: {weights_path} holds no lora_A / lora_B tensors")

    checked: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
    for name, pair in sorted(pairs.items()):
        first = next(iter(pair.values()))
        if name not in targets:
            raise AdapterError(
                f"reading adapter: {weights_path}: tensor {first!r} targets module {name!r}, which "
                "is not an adaptable linear of this base model (the adapter was made for another "
                "base, or adapts embeddings / lm_head)"
            )
        for which in ("lora_A", "lora_B"):
            if which not in pair:
                raise AdapterError(
                    f"reading adapter: {weights_path}: missing {KEY_PREFIX}{name}.{which}.weight "
                    f"(its pair {first!r} is present); the adapter file is incomplete"
                )
        in_features, out_features = targets[name]
        r = lora_config.rank_for(name)
        a, b = tensors[pair["lora_A"]], tensors[pair["lora_B"]]
        for key, tensor, want in ((pair["lora_A"], a, (r, in_features)), (pair["lora_B"], b, (out_features, r))):
            if tuple(tensor.shape) != want:
                raise AdapterError(
                    f"reading adapter: {weights_path}: tensor {key!r} has shape {list(tensor.shape)} "
                    f"but module {name!r} with rank {r} needs {list(want)}; the adapter does not "
                    "fit this base model"
                )
            if not tensor.is_floating_point():
                raise AdapterError(f"reading adapter: {weights_path}: tensor {key!r} is {tensor.dtype}, not a float")
        checked.append((name, a, b, lora_scaling(r, lora_config.alpha_for(name), lora_config.rslora)))
    return AdapterWeights(directory, _pack(checked))


def _pack(checked: list[tuple[str, torch.Tensor, torch.Tensor, float]]) -> dict[str, LoRAModuleWeights]:
    """Copy every module's A [r, in] and B.T [r, out] into ONE float32 buffer and return views of it.

    B is kept as the transpose of a contiguous [r, out] view: the device slots hold B.T, so copying an adapter
    into a slot is a plain memory copy instead of a strided transpose (5x slower, and paid on every slot miss,
    which with hundreds of adapters is most admissions); the transpose is done here, in the loader thread.
    One buffer per adapter (not 2 x modules small tensors): the file's tensors are freed right away and their
    space reused by the next read, while the buffer, large enough for the allocator to map it on its own, goes
    back to the system whole when the LRU evicts the adapter. Transposing into separate small tensors instead
    left the freed originals as holes in the heap: 256 adapters of 152 MB took 247 MB of resident memory.
    """
    total = sum(a.numel() + b.numel() for _, a, b, _ in checked)
    buffer = torch.empty(total, dtype=torch.float32)
    modules: dict[str, LoRAModuleWeights] = {}
    offset = 0
    for name, a, b, scaling in checked:
        r, fan_in = a.shape
        fan_out = b.shape[0]
        a_view = buffer[offset : offset + r * fan_in].view(r, fan_in)
        offset += r * fan_in
        bt_view = buffer[offset : offset + r * fan_out].view(r, fan_out)
        offset += r * fan_out
        a_view.copy_(a)
        bt_view.copy_(b.t())
        modules[name] = LoRAModuleWeights(a_view, bt_view.t(), scaling)
    return modules


def _check_supported(config: dict, path: Path) -> None:
    """Refuse adapter kinds the batched LoRA path cannot run, naming the config key."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"reading adapter config: {path}: peft_type is {config.get('peft_type')!r}; the server "
            "serves LORA adapters only"
        )
    if config.get("use_dora"):
        raise AdapterError(
            f"reading adapter config: {path}: use_dora=true; DoRA adapters cannot be served "
            "(their magnitude rescales the whole weight), merge the adapter instead"
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            f"reading adapter config: {path}: modules_to_save={config['modules_to_save']} (fully "
            "trained modules) cannot be served per request; merge the adapter instead"
        )
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise AdapterError(
            f"reading adapter config: {path}: trained biases (bias={config.get('bias')!r}, "
            f"lora_bias={config.get('lora_bias')!r}) cannot be served; only bias='none' is"
        )
    if config.get("fan_in_fan_out"):
        raise AdapterError(
            f"reading adapter config: {path}: fan_in_fan_out=true is for Conv1D bases; Llama-family bases have none"
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"reading adapter config: {path}: missing {key!r}")
