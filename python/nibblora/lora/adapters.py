"""Save and load LoRA adapters in peft's format (adapter_config.json + adapter_model.safetensors).

Keys carry no adapter name: `base_model.model.<module name>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
where <module name> is the module's name in the plain (un-wrapped) model, e.g. `model.layers.0.self_attn.q_proj`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nibblora.lora.config import ALL_LINEAR, LoRAConfig
from nibblora.lora.inject import find_target_modules, inject_lora_config, lora_modules
from nibblora.lora.layers import LoRALinear, _base_shape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")

# Every key peft 0.21 writes for a plain LoRA adapter, at peft's defaults (peft_version is left out: we are not
# peft). The per-adapter fields are filled in by save_adapter.
_PEFT_DEFAULTS: dict[str, object] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}


def _model_name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name or None


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                 adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` of every LoRALinear in `model` to `directory` in peft's format.

    The most common rank / alpha become r / lora_alpha; modules that differ go to rank_pattern / alpha_pattern
    under their full names. Returns the directory.
    """
    layers = {name: m for name, m in lora_modules(model).items() if adapter_name in m.adapters}
    if not layers:
        raise ValueError(f"no LoRALinear in {type(model).__name__} holds an adapter named {adapter_name!r}; "
                         "call inject_lora first or pass the right adapter_name")
    adapters = {name: m.adapters[adapter_name] for name, m in layers.items()}
    for name, m in layers.items():
        bias = getattr(m.base, "bias", None)
        if bias is not None and bias.requires_grad:
            raise ValueError(f"{name} trains its bias, which peft's LoRA format does not carry; save the bias "
                             "separately (torch.save) or train with train_bias=False")
    for field_name in ("rslora", "dropout"):
        values = {getattr(a, field_name) for a in adapters.values()}
        if len(values) > 1:
            raise ValueError(f"adapter {adapter_name!r} mixes {field_name} values {sorted(values)} across layers; "
                             "peft's format holds one value for the whole adapter")
    r = Counter(a.r for a in adapters.values()).most_common(1)[0][0]
    alpha = Counter(a.alpha for a in adapters.values()).most_common(1)[0][0]
    first = next(iter(adapters.values()))

    suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
    # A short suffix list when it selects exactly these modules (as peft writes it), full names otherwise.
    exact = set(find_target_modules(model, suffixes)) == set(layers)
    config = dict(_PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path or _model_name_or_path(model),
        task_type=_task_type(model),
        r=r,
        lora_alpha=_number(alpha),
        lora_dropout=first.dropout,
        use_rslora=first.rslora,
        fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()),
        target_modules=suffixes if exact else sorted(layers),
        rank_pattern={name: a.r for name, a in adapters.items() if a.r != r},
        alpha_pattern={name: _number(a.alpha) for name, a in adapters.items() if a.alpha != alpha},
    )
    tensors = {}
    for name, a in adapters.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.lora_A.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = a.lora_B.detach().cpu().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json as a dict; unknown keys are kept and ignored by the loader."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"reading adapter: {path} does not exist; point at a directory saved by peft's "
                                "save_pretrained or nibblora.lora.save_adapter")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"reading adapter: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"reading adapter: {path} must hold a JSON object")
    return config


def lora_config_from_peft(config: dict) -> LoRAConfig:
    """The LoRAConfig of a peft adapter_config.json dict: r, lora_alpha, lora_dropout, target_modules, use_rslora,
    rank_pattern and alpha_pattern (so `rank_for` / `alpha_for` resolve per-module values as peft does)."""
    return LoRAConfig(
        r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=config.get("target_modules") or ALL_LINEAR, rslora=bool(config.get("use_rslora", False)),
        rank_pattern={k: int(v) for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
    )


def _check_supported(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; nibblora loads LORA adapters only")
    if config.get("use_dora"):
        raise ValueError(f"{path}: this is a DoRA adapter (use_dora=true), which nibblora cannot load yet")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save={config['modules_to_save']} (fully trained modules) is not "
                         "supported; load this adapter with peft, or merge it first")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: adapters with trained biases (bias={config.get('bias')!r}, lora_bias="
                         f"{config.get('lora_bias')!r}) are not supported; only bias='none' is")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{path}: missing {key!r}; an adapter config needs r, lora_alpha and target_modules")


def _check_base_model(config: dict, model: nn.Module, path: Path) -> None:
    expected, actual = config.get("base_model_name_or_path"), _model_name_or_path(model)
    if expected and actual and expected != actual and Path(expected).name != Path(actual).name:
        raise ValueError(f"{path}: adapter was trained on base model {expected!r} but this model is {actual!r}; "
                         "load the matching base model, or pass check_base_model=False if they are the same weights")


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default", *,
                 trainable: bool = False, check_base_model: bool = True,
                 adapter_dtype: torch.dtype = torch.float32) -> dict[str, LoRALinear]:
    """Load a peft LoRA adapter from `directory` into `model` (in place), injecting LoRALinear where needed.

    Honours r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, lora_dropout and fan_in_fan_out (Conv1D
    bases). Fails with the key named on: a key for a module the model lacks (a different base model), a tensor
    whose shape does not fit its module or rank, or a missing lora_A / lora_B. `trainable=False` freezes the
    loaded adapter (inference); base weights are always frozen. Returns the adapted modules by name.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    config_path = directory / CONFIG_NAME
    _check_supported(config, config_path)
    if check_base_model:
        _check_base_model(config, model, config_path)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        has_bin = (directory / "adapter_model.bin").exists()
        hint = " (found adapter_model.bin: re-save it as safetensors)" if has_bin else ""
        raise FileNotFoundError(f"reading adapter: {weights_path} does not exist{hint}")
    tensors = load_file(str(weights_path))

    found: dict[str, dict[str, str]] = {}
    for key in tensors:
        inner = key.removeprefix(KEY_PREFIX)
        match = _KEY_RE.match(inner)
        if match is None:
            raise ValueError(f"{weights_path}: unsupported tensor {key!r}; nibblora reads only "
                             "'<module>.lora_A.weight' and '<module>.lora_B.weight' keys")
        found.setdefault(match["module"], {})[match["which"]] = key

    lora_config = lora_config_from_peft(config)
    module_names = dict(model.named_modules())
    for name, pair in sorted(found.items()):
        key = next(iter(pair.values()))
        module = module_names.get(name)
        if module is None:
            raise ValueError(f"{weights_path}: {key!r} targets module {name!r}, which this "
                             f"{type(model).__name__} does not have; the adapter was made for a different base model")
        for which in ("lora_A", "lora_B"):
            if which not in pair:
                raise KeyError(f"{weights_path}: missing {KEY_PREFIX}{name}.{which}.weight (its pair "
                               f"{key!r} is present); the adapter file is incomplete")
    # Modules the config targets must all have weights (unless peft's layer filters narrow the targets).
    narrowed = any(config.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    if not narrowed:
        targets = config["target_modules"]
        for name in find_target_modules(model, ALL_LINEAR if targets == ALL_LINEAR else targets):
            if name not in found:
                raise KeyError(f"{weights_path}: missing {KEY_PREFIX}{name}.lora_A.weight: target_modules "
                               f"{targets!r} selects {name!r} but the file has no weights for it")

    names = sorted(found)
    for name in names:
        module = module_names[name]
        in_features, out_features = _in_out(module, name)
        r = lora_config.rank_for(name)
        a, b = tensors[found[name]["lora_A"]], tensors[found[name]["lora_B"]]
        for key, tensor, want in ((found[name]["lora_A"], a, (r, in_features)),
                                  (found[name]["lora_B"], b, (out_features, r))):
            if tuple(tensor.shape) != want:
                raise ValueError(f"{weights_path}: {key!r} has shape {list(tensor.shape)} but module {name!r} "
                                 f"with rank {r} needs {list(want)}; the adapter does not fit this base model")
    inject_lora_config(model, lora_config, adapter_name=adapter_name, adapter_dtype=adapter_dtype, names=names)
    layers = {name: model.get_submodule(name) for name in names}
    with torch.no_grad():
        for name, layer in layers.items():
            adapter = layer.adapters[adapter_name]
            adapter.lora_A.copy_(tensors[found[name]["lora_A"]])
            adapter.lora_B.copy_(tensors[found[name]["lora_B"]])
            adapter.lora_A.requires_grad_(trainable)
            adapter.lora_B.requires_grad_(trainable)
    return layers


def _in_out(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    try:
        in_features, out_features, _ = _base_shape(module)
    except TypeError:
        raise ValueError(f"adapter targets {name!r}, a {type(module).__name__}; nibblora adapts linear layers "
                         "(nn.Linear, NF4Linear, Conv1D) only") from None
    return in_features, out_features

