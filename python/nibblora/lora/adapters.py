"""Save and load LoRA adapters in peft's format (adapter_config.json + adapter_model.safetensors).

Reading goes through `read_adapter_files` (nibblora.lora.adapter_files), the one adapter reader every tool uses;
the config schema is nibblora.lora.adapter_config.

Keys carry no adapter name: `base_model.model.<module name>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
where <module name> is the module's name in the plain (un-wrapped) model, e.g. `model.layers.0.self_attn.q_proj`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nibblora.errors import AdapterError
from nibblora.lora.adapter_config import AdapterConfig, parse_adapter_config
from nibblora.lora.adapter_files import (
    CONFIG_NAME,
    KEY_PREFIX,
    WEIGHTS_NAME,
    AdapterFiles,
    read_adapter_config,
    read_adapter_files,
)
from nibblora.lora.config import LoRAConfig
from nibblora.lora.inject import find_target_modules, inject_lora_config, lora_modules
from nibblora.lora.layers import LoRALinear, _base_shape

__all__ = [
    "CONFIG_NAME",
    "KEY_PREFIX",
    "WEIGHTS_NAME",
    "AdapterFiles",
    "load_adapter",
    "lora_config_from_peft",
    "read_adapter_config",
    "read_adapter_files",
    "save_adapter",
]

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


def save_adapter(
    model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None, adapter_name: str = "default"
) -> Path:
    """Write adapter `adapter_name` of every LoRALinear in `model` to `directory` in peft's format.

    The most common rank / alpha become r / lora_alpha; modules that differ go to rank_pattern / alpha_pattern
    under their full names. Returns the directory.
    """
    layers = {name: m for name, m in lora_modules(model).items() if adapter_name in m.adapters}
    if not layers:
        raise ValueError(
            f"no LoRALinear in {type(model).__name__} holds an adapter named {adapter_name!r}; "
            "call inject_lora first or pass the right adapter_name"
        )
    adapters = {name: m.adapters[adapter_name] for name, m in layers.items()}
    for name, m in layers.items():
        bias = getattr(m.base, "bias", None)
        if bias is not None and bias.requires_grad:
            raise ValueError(
                f"{name} trains its bias, which peft's LoRA format does not carry; save the bias "
                "separately (torch.save) or train with train_bias=False"
            )
    for field_name in ("rslora", "dropout"):
        values = {getattr(a, field_name) for a in adapters.values()}
        if len(values) > 1:
            raise ValueError(
                f"adapter {adapter_name!r} mixes {field_name} values {sorted(values)} across layers; "
                "peft's format holds one value for the whole adapter"
            )
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


def lora_config_from_peft(config: dict) -> LoRAConfig:
    """The LoRAConfig of a peft adapter_config.json dict: r, lora_alpha, lora_dropout, target_modules, use_rslora,
    rank_pattern and alpha_pattern (so `rank_for` / `alpha_for` resolve per-module values as peft does). The dict
    is validated by the adapter schema first: AdapterError naming the key for a wrong value."""
    return parse_adapter_config(config).lora_config()


def _check_supported(files: AdapterFiles) -> None:
    """What load_adapter cannot build (merge can: python -m nibblora.merge handles all of these)."""
    config, path = files.config, files.config_path
    if config.use_dora or any(m.magnitude_key for m in files.modules.values()):
        raise AdapterError(
            f"loading adapter: {path}: this is a DoRA adapter (use_dora=true), which nibblora cannot "
            "load yet; merge it with python -m nibblora.merge instead"
        )
    if config.modules_to_save or files.replacements:
        what = config.modules_to_save or sorted(files.replacements)
        raise AdapterError(
            f"loading adapter: {path}: modules_to_save={list(what)} (fully trained modules) is not "
            "supported; load this adapter with peft, or merge it first"
        )
    if config.lora_bias or config.bias != "none":
        raise AdapterError(
            f"loading adapter: {path}: adapters with trained biases (bias={config.bias!r}, "
            f"lora_bias={config.lora_bias!r}) are not supported; only bias='none' is"
        )
    embeddings = sorted(name for name, m in files.modules.items() if m.embedding)
    if embeddings or files.saved_base_layers:
        which = embeddings[:3] or sorted(files.saved_base_layers)[:3]
        raise AdapterError(
            f"loading adapter: {files.weights_path}: LoRA on embeddings ({which}) is not supported "
            "by load_adapter; merge it with python -m nibblora.merge instead"
        )
    if config.target_modules is None:
        raise AdapterError(
            f"loading adapter: {path}: missing 'target_modules'; an adapter config needs r, "
            "lora_alpha and target_modules"
        )


def _check_base_model(config: AdapterConfig, model: nn.Module, path: Path) -> None:
    expected, actual = config.base_model_name_or_path, _model_name_or_path(model)
    if expected and actual and expected != actual and Path(expected).name != Path(actual).name:
        raise AdapterError(
            f"loading adapter: {path}: adapter was trained on base model {expected!r} but this model "
            f"is {actual!r}; load the matching base model, or pass check_base_model=False if they are "
            "the same weights"
        )


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    *,
    trainable: bool = False,
    check_base_model: bool = True,
    adapter_dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALinear]:
    """Load a peft LoRA adapter from `directory` into `model` (in place), injecting LoRALinear where needed.

    Honours r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, lora_dropout and fan_in_fan_out (Conv1D
    bases). The folder is read by `read_adapter_files` (config schema, header, dtypes, ranks, NaN / infinity).
    Fails with AdapterError naming the file and key, before the model is touched, on: a key for a module the
    model lacks (a different base model), a tensor whose shape does not fit its module or rank, a missing
    lora_A / lora_B, a module that target_modules selects without weights in the file. `trainable=False` freezes
    the loaded adapter (inference); base weights are always frozen. Returns the adapted modules by name.
    """
    files = read_adapter_files(directory, check_values=False)  # every tensor is read (and checked) below
    config = files.config
    _check_supported(files)
    if check_base_model:
        _check_base_model(config, model, files.config_path)
    where = f"loading adapter: {files.weights_path}"
    module_names = dict(model.named_modules())
    for name, entry in sorted(files.modules.items()):
        if name not in module_names:
            raise AdapterError(
                f"{where}: {entry.a_key!r} targets module {name!r}, which this "
                f"{type(model).__name__} does not have; the adapter was made for a different base model"
            )
    # Modules the config targets must all have weights (unless peft's layer filters narrow the targets).
    if not config.narrowed:
        targets = config.target_modules
        assert targets is not None  # _check_supported
        for name in find_target_modules(model, targets if isinstance(targets, str) else list(targets)):
            if name not in files.modules:
                raise AdapterError(
                    f"{where}: missing {KEY_PREFIX}{name}.lora_A.weight: target_modules "
                    f"{_show_targets(targets)} selects {name!r} but the file has no weights for it"
                )

    names = sorted(files.modules)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        entry = files.modules[name]
        assert entry.a_key is not None and entry.b_key is not None  # read_adapter_files checked the pairs
        in_features, out_features = _in_out(module_names[name], name)
        for key, want in ((entry.a_key, (entry.rank, in_features)), (entry.b_key, (out_features, entry.rank))):
            shape = files.tensors[key].shape
            if shape != want:
                raise AdapterError(
                    f"{where}: {key!r} has shape {list(shape)} but module {name!r} with rank "
                    f"{entry.rank} needs {list(want)}; the adapter does not fit this base model"
                )
    for name in names:  # all read (NaN / infinity refused) before the model changes
        entry = files.modules[name]
        weights[name] = (files.read(entry.a_key), files.read(entry.b_key))  # type: ignore[arg-type]
    inject_lora_config(model, config.lora_config(), adapter_name=adapter_name, adapter_dtype=adapter_dtype, names=names)
    layers = {name: model.get_submodule(name) for name in names}
    with torch.no_grad():
        for name, layer in layers.items():
            adapter = layer.adapters[adapter_name]
            a, b = weights[name]
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
            adapter.lora_A.requires_grad_(trainable)
            adapter.lora_B.requires_grad_(trainable)
    return layers


def _show_targets(targets: str | tuple[str, ...]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))


def _in_out(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    try:
        in_features, out_features, _ = _base_shape(module)
    except TypeError:
        raise AdapterError(
            f"loading adapter: it targets {name!r}, a {type(module).__name__}; nibblora adapts "
            "linear layers (nn.Linear, NF4Linear, Conv1D) only"
        ) from None
    return in_features, out_features
