"""Parameter-efficient methods beyond LoRA, one small module each, in peft's file format both ways.

    from nibblora.methods import inject_ia3, inject_prompt_tuning, inject_prefix_tuning, load_adapter, save_adapter
    inject_ia3(model)                                   # ia3.py: learned scales on k, v and down_proj's input
    inject_prompt_tuning(model, num_virtual_tokens=8)   # prompt_tuning.py: virtual input embeddings
    inject_prefix_tuning(model, num_virtual_tokens=8)   # prefix_tuning.py: per-layer key/value prefixes
    inject_dora(model, ["q_proj", "v_proj"], r=8)       # dora.py: LoRA direction + learned magnitude
    inject_bottleneck(model, "houlsby")                 # bottleneck.py: residual MLPs after attention / MLP
    trainable_parameters(model)                         # {name: parameter} the optimizer gets
    save_adapter(model, "out/adapter")                  # whichever method the model carries
    load_adapter(model, "out/adapter")                  # dispatches on adapter_config.json's peft_type

Every module has the same shape: inject_<m>(model, ...) freezes the model and adds the method's parameters;
save_<m> / load_<m> write and read peft's adapter folder; merge_<m> folds the method into the weights where it
can be (IA3, DoRA). Plain LoRA stays in nibblora.lora; load_adapter hands LORA folders to it (DoRA ones to
load_dora).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nibblora.errors import AdapterError
from nibblora.lora.adapter_config import parse_any_adapter_config
from nibblora.lora.adapter_files import read_adapter_config
from nibblora.methods.bottleneck import (
    Bottleneck,
    bottleneck_modules,
    inject_bottleneck,
    load_bottleneck,
    remove_bottleneck,
    save_bottleneck,
)
from nibblora.methods.common import freeze, trainable_parameters
from nibblora.methods.dora import DoRALinear, dora_modules, inject_dora, load_dora, merge_dora, save_dora
from nibblora.methods.ia3 import IA3Linear, ia3_modules, inject_ia3, load_ia3, merge_ia3, save_ia3
from nibblora.methods.prefix_tuning import (
    PrefixTuning,
    inject_prefix_tuning,
    load_prefix_tuning,
    remove_prefix_tuning,
    save_prefix_tuning,
)
from nibblora.methods.prompt_tuning import (
    PromptTuning,
    inject_prompt_tuning,
    load_prompt_tuning,
    remove_prompt_tuning,
    save_prompt_tuning,
)

_LOADERS = {
    "IA3": load_ia3,
    "PROMPT_TUNING": load_prompt_tuning,
    "PREFIX_TUNING": load_prefix_tuning,
    "BOTTLENECK": load_bottleneck,
}


def load_adapter(model: nn.Module, directory: str | Path, *, trainable: bool = False):
    """Load the adapter folder `directory` into `model`, whatever its method: adapter_config.json's peft_type
    picks the loader (LORA -> nibblora.lora.load_adapter, or load_dora when use_dora is true; IA3,
    PROMPT_TUNING, PREFIX_TUNING and nibblora's own BOTTLENECK -> this package's). The method's parameters stay
    frozen unless `trainable`.
    Returns what that loader returns. Raises AdapterError (naming file and key) for an unknown peft_type or a
    malformed folder."""
    config = parse_any_adapter_config(read_adapter_config(directory), Path(directory) / "adapter_config.json")
    if config.peft_type == "LORA":
        if config.use_dora:
            return load_dora(model, directory, trainable=trainable)
        from nibblora.lora.adapters import load_adapter as load_lora

        return load_lora(model, directory, trainable=trainable)
    return _LOADERS[config.peft_type](model, directory, trainable=trainable)


def method_of(model: nn.Module) -> str | None:
    """The method `model` carries: "LORA", "DORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK", or
    None."""
    from nibblora.lora.inject import lora_modules

    found = [
        kind
        for kind, present in (
            ("LORA", bool(lora_modules(model))),
            ("DORA", bool(dora_modules(model))),
            ("IA3", bool(ia3_modules(model))),
            ("PROMPT_TUNING", isinstance(getattr(model, "prompt_tuning", None), PromptTuning)),
            ("PREFIX_TUNING", isinstance(getattr(model, "prefix_tuning", None), PrefixTuning)),
            ("BOTTLENECK", bool(bottleneck_modules(model))),
        )
        if present
    ]
    if len(found) > 1:
        raise AdapterError(
            f"saving adapter: {type(model).__name__} carries {' and '.join(found)} adapters; peft's "
            "format holds one method per folder: save each with its own save_<method>"
        )
    return found[0] if found else None


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Save the one adapter `model` carries in peft's format (see method_of). Returns the folder."""
    kind = method_of(model)
    if kind is None:
        raise AdapterError(f"saving adapter: {type(model).__name__} carries no adapter; inject one first")
    if kind == "LORA":
        from nibblora.lora.adapters import save_adapter as save_lora

        return save_lora(model, directory, base_model_name_or_path)
    saver = {
        "DORA": save_dora,
        "IA3": save_ia3,
        "PROMPT_TUNING": save_prompt_tuning,
        "PREFIX_TUNING": save_prefix_tuning,
        "BOTTLENECK": save_bottleneck,
    }[kind]
    return saver(model, directory, base_model_name_or_path)


__all__ = [
    "Bottleneck",
    "bottleneck_modules",
    "inject_bottleneck",
    "load_bottleneck",
    "remove_bottleneck",
    "save_bottleneck",
    "DoRALinear",
    "dora_modules",
    "inject_dora",
    "load_dora",
    "merge_dora",
    "save_dora",
    "IA3Linear",
    "PrefixTuning",
    "PromptTuning",
    "freeze",
    "ia3_modules",
    "inject_ia3",
    "inject_prefix_tuning",
    "inject_prompt_tuning",
    "load_adapter",
    "load_ia3",
    "load_prefix_tuning",
    "load_prompt_tuning",
    "merge_ia3",
    "method_of",
    "remove_prefix_tuning",
    "remove_prompt_tuning",
    "save_adapter",
    "save_ia3",
    "save_prefix_tuning",
    "save_prompt_tuning",
    "trainable_parameters",
]
