"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP on a sublayer's output.

    inject_bottleneck(model, variant="houlsby", bottleneck_size=16)   # after attention and after the MLP
    inject_bottleneck(model, variant="pfeiffer")                      # after the MLP only
    save_bottleneck(model, "out/adapter"); load_bottleneck(model, "out/adapter")

Each adapter computes h + up(act(down(h))) on the output h of the sublayer it follows (the attention block's
o_proj output, the MLP's down_proj output), before the residual add: in a pre-norm decoder that is where Houlsby
placed them. `up` starts at zero (weight and bias), so an injected model computes exactly what the base does.
The adapter is a child module of the sublayer (`model.layers.0.mlp.bottleneck`) applied by a forward hook, so
the base model's module and parameter names do not change. Not mergeable (the activation is nonlinear).

File format (peft has none; nibblora's own, see docs/methods.md): adapter_config.json with
{"peft_type": "BOTTLENECK", "variant", "bottleneck_size", "non_linearity", "target_modules": [full module
names]} and adapter_model.safetensors with `base_model.model.<module>.bottleneck.down.weight` [b, hidden],
`.down.bias` [b], `.up.weight` [hidden, b], `.up.bias` [hidden], float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nibblora.errors import AdapterError
from nibblora.lora.adapter_files import KEY_PREFIX, read_method_files
from nibblora.methods.common import (
    expect_peft_type,
    freeze,
    model_name_or_path,
    model_sizes,
    module_device,
    write_peft_folder,
)

VARIANT_TARGETS = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
CHILD = "bottleneck"
FORMAT_VERSION = 1


class Bottleneck(nn.Module):
    """h + up(act(down(h))): down [hidden -> b], up [b -> hidden] zero-initialised; float32 parameters, the
    result cast back to h's dtype."""

    def __init__(
        self, hidden: int, bottleneck_size: int, non_linearity: str = "relu", device: torch.device | None = None
    ):
        super().__init__()
        self.non_linearity = non_linearity
        self.down = nn.Linear(hidden, bottleneck_size, device=device)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck_size, hidden, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self._handle = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        return h + self.up(self.act(self.down(x))).to(h.dtype)

    def _hook(self, module: nn.Module, args: tuple, out):
        if isinstance(out, tuple):  # transformers' attention returns (output, weights)
            return (self(out[0]), *out[1:])
        return self(out)


def bottleneck_modules(model: nn.Module) -> dict[str, Bottleneck]:
    """{name of the adapted sublayer: its Bottleneck}."""
    return {name.removesuffix(f".{CHILD}"): m for name, m in model.named_modules() if isinstance(m, Bottleneck)}


def _targets(model: nn.Module, variant: str) -> list[str]:
    suffixes = VARIANT_TARGETS[variant]
    return [
        name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in suffixes and ".layers." in f".{name}"
    ]


def _attach(model: nn.Module, names: list[str], hidden: int, size: int, act: str) -> dict[str, Bottleneck]:
    out = {}
    for name in names:
        sub = model.get_submodule(name)
        device = module_device(sub)
        adapter = Bottleneck(hidden, size, act, device=device)
        adapter.train(sub.training)
        sub.add_module(CHILD, adapter)
        adapter._handle = sub.register_forward_hook(adapter._hook)
        out[name] = adapter
    return out


def inject_bottleneck(
    model: nn.Module, variant: str = "houlsby", bottleneck_size: int = 16, non_linearity: str = "relu"
) -> dict[str, Bottleneck]:
    """Freeze `model` and add a bottleneck adapter after every decoder layer's attention and MLP (houlsby) or
    MLP only (pfeiffer): modules named `self_attn` / `mlp` under `layers`. Returns {sublayer name: adapter}."""
    if variant not in VARIANT_TARGETS:
        raise AdapterError(f"bottleneck adapters: variant must be 'houlsby' or 'pfeiffer', got {variant!r}")
    if non_linearity not in ACTIVATIONS:
        raise AdapterError(
            f"bottleneck adapters: non_linearity must be one of {sorted(ACTIVATIONS)}, got {non_linearity!r}"
        )
    if isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, int) or bottleneck_size <= 0:
        raise AdapterError(f"bottleneck adapters: bottleneck_size must be a positive integer, got {bottleneck_size!r}")
    if bottleneck_modules(model):
        raise AdapterError("bottleneck adapters: the model has them already; remove_bottleneck first")
    hidden = model_sizes(model, "bottleneck adapters")[0]
    names = _targets(model, variant)
    if not names:
        raise AdapterError(
            f"bottleneck adapters: {type(model).__name__} has no decoder sublayers named "
            f"{' / '.join(VARIANT_TARGETS[variant])} under 'layers'"
        )
    freeze(model)
    adapters = _attach(model, names, hidden, bottleneck_size, non_linearity)
    model._bottleneck_variant = variant  # recorded for save
    return adapters


def remove_bottleneck(model: nn.Module) -> None:
    """Take every bottleneck adapter (hook and child module) off `model`."""
    for name, adapter in bottleneck_modules(model).items():
        adapter._handle.remove()
        delattr(model.get_submodule(name), CHILD)


def save_bottleneck(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters in nibblora's bottleneck format (module docstring; docs/methods.md)."""
    adapters = bottleneck_modules(model)
    if not adapters:
        raise AdapterError(f"saving bottleneck adapters: {type(model).__name__} has none; call inject_bottleneck")
    first = next(iter(adapters.values()))
    config = {
        "peft_type": "BOTTLENECK",
        "format_version": FORMAT_VERSION,
        "variant": getattr(model, "_bottleneck_variant", "houlsby"),
        "bottleneck_size": first.down.out_features,
        "non_linearity": first.non_linearity,
        "target_modules": sorted(adapters),
        "base_model_name_or_path": base_model_name_or_path or model_name_or_path(model),
    }
    tensors = {}
    for name, a in adapters.items():
        for part in ("down", "up"):
            for p in ("weight", "bias"):
                tensors[f"{KEY_PREFIX}{name}.{CHILD}.{part}.{p}"] = getattr(getattr(a, part), p)
    return write_peft_folder(directory, config, tensors)


def load_bottleneck(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> dict[str, Bottleneck]:
    """Attach the adapters of a nibblora bottleneck folder to `model` (frozen unless `trainable`). Every target
    module must exist and every tensor must have its documented shape. Raises AdapterError naming file and key."""
    directory = Path(directory)
    config, files = read_method_files(directory)
    expect_peft_type(config, "BOTTLENECK", directory)
    hidden = model_sizes(model, "loading bottleneck adapters")[0]
    where = f"loading adapter: {files.weights_path}"
    b = config.bottleneck_size
    shapes = {"down.weight": (b, hidden), "down.bias": (b,), "up.weight": (hidden, b), "up.bias": (hidden,)}
    expected = {
        f"{KEY_PREFIX}{name}.{CHILD}.{part}": shape for name in config.target_modules for part, shape in shapes.items()
    }
    unknown, missing = sorted(set(files.tensors) - set(expected)), sorted(set(expected) - set(files.tensors))
    if unknown or missing:
        raise AdapterError(
            f"{where}: tensors do not match target_modules: unknown {unknown[:3]}, missing {missing[:3]}"
        )
    for key, shape in expected.items():
        if files.tensors[key].shape != shape:
            raise AdapterError(
                f"{where}: {key!r} has shape {list(files.tensors[key].shape)}, expected {list(shape)} "
                f"(bottleneck_size {b}, the model's hidden size {hidden})"
            )
    for name in config.target_modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise AdapterError(
                f"{where}: target module {name!r} is not in {type(model).__name__}; is this adapter for another model?"
            ) from None
    if bottleneck_modules(model):
        raise AdapterError("loading bottleneck adapters: the model has them already; remove_bottleneck first")
    freeze(model)
    adapters = _attach(model, list(config.target_modules), hidden, b, config.non_linearity)
    model._bottleneck_variant = config.variant
    with torch.no_grad():
        for name, a in adapters.items():
            for part in shapes:
                mod, p = part.split(".")
                getattr(getattr(a, mod), p).copy_(files.read(f"{KEY_PREFIX}{name}.{CHILD}.{part}"))
            a.requires_grad_(trainable)
    return adapters
