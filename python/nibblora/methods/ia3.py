"""IA³ (Liu et al. 2022): learned vectors that rescale activations, in peft's format both ways.

    inject_ia3(model)                       # Llama defaults: k_proj, v_proj scale their output, down_proj its input
    save_ia3(model, "out/ia3")              # base_model.model.<module>.ia3_l, [out, 1] or [1, in] for feed-forward
    load_ia3(model, "out/ia3")              # reads peft's IA3 adapters too
    merge_ia3(model)                        # folds every vector into its weight; the wrappers are removed

Vectors start at ones, so an injected model computes exactly what the base model does. A scale on the output of
W x + b is a row scale of W and b; a scale on the input is a column scale of W, so IA³ merges exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nibblora.errors import AdapterError
from nibblora.lora.adapter_files import CONFIG_NAME, KEY_PREFIX, read_method_files
from nibblora.lora.config import matches_target
from nibblora.lora.inject import _set_submodule, find_target_modules
from nibblora.lora.layers import NF4Linear, _base_shape
from nibblora.methods.common import (
    expect_peft_type,
    freeze,
    model_name_or_path,
    module_device,
    task_type,
    write_peft_folder,
)

DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
DEFAULT_FEEDFORWARD = ("down_proj",)

# Every key peft 0.21 writes for an IA3 adapter (peft_version left out: we are not peft).
_PEFT_DEFAULTS: dict[str, object] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "feedforward_modules": None,
    "inference_mode": True,
    "init_ia3_weights": True,
    "modules_to_save": None,
    "peft_type": "IA3",
    "revision": None,
    "target_modules": None,
    "task_type": None,
}


class IA3Linear(nn.Module):
    """A linear layer (nn.Linear, NF4Linear or transformers' Conv1D) whose output (or, when `feedforward`, input)
    is multiplied by a learned float32 vector `ia3_l` ([out, 1], or [1, in] for feed-forward), initialised to ones.
    The product is taken in float32 and cast back, as peft does, so half-precision results match too."""

    def __init__(self, base: nn.Module, feedforward: bool = False):
        super().__init__()
        in_features, out_features, self.fan_in_fan_out = _base_shape(base)
        self.base = base
        self.feedforward = feedforward
        self.merged = False
        device = module_device(base)
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base((x.to(scale.dtype) * scale).to(x.dtype))
        out = self.base(x)
        return (out * scale).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the vector into the base weight (and bias, for output scales); returns the base layer."""
        if isinstance(self.base, NF4Linear):
            raise AdapterError(
                "merging IA3: the base layer is 4-bit (NF4Linear); merge into a dense copy of the "
                "base model (load it unquantized, load_ia3, then merge_ia3)"
            )
        weight = self.base.weight
        scale = self.ia3_l.T if self.fan_in_fan_out else self.ia3_l  # Conv1D stores [in, out]
        weight.copy_((weight.float() * scale).to(weight.dtype))
        bias = getattr(self.base, "bias", None)
        if not self.feedforward and bias is not None:
            bias.copy_((bias.float() * self.ia3_l.flatten()).to(bias.dtype))
        self.merged = True
        return self.base

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, ia3_l={list(self.ia3_l.shape)}"


def ia3_modules(model: nn.Module) -> dict[str, IA3Linear]:
    """{module name: IA3Linear} in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def inject_ia3(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    feedforward_modules: str | list[str] | tuple[str, ...] = DEFAULT_FEEDFORWARD,
) -> dict[str, IA3Linear]:
    """Freeze `model` and wrap every linear layer target_modules selects (peft's rule: a name suffix, or a regex
    that matches the whole name) in an IA3Linear; those feedforward_modules also selects scale their input.
    Returns {module name: IA3Linear}; their `ia3_l` vectors are the only trainable parameters."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    names = find_target_modules(model, targets)
    if not names:
        raise AdapterError(
            f"injecting IA3: target_modules {targets!r} selects no linear layer of "
            f"{type(model).__name__}; name modules that exist (e.g. {list(DEFAULT_TARGETS)})"
        )
    ff = feedforward_modules if isinstance(feedforward_modules, str) else tuple(feedforward_modules)
    freeze(model)
    out = {}
    for name in names:
        layer = IA3Linear(model.get_submodule(name), feedforward=bool(ff) and matches_target(name, ff))
        _set_submodule(model, name, layer)
        out[name] = layer
    return out


def save_ia3(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write every IA3Linear's vector in peft's format (`base_model.model.<module>.ia3_l`). Returns the folder."""
    layers = ia3_modules(model)
    if not layers:
        raise AdapterError(f"saving IA3: {type(model).__name__} has no IA3 layers; call inject_ia3 first")
    if any(m.merged for m in layers.values()):
        raise AdapterError("saving IA3: the vectors were merged into the weights already; save before merge_ia3")
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
    # Suffixes (as peft writes them) when no unwrapped linear layer shares one, full names otherwise.
    exact = not find_target_modules(model, suffixes)
    targets = suffixes if exact else sorted(layers)
    ff_names = sorted(n for n, m in layers.items() if m.feedforward)
    ff_suffixes = sorted({n.rsplit(".", 1)[-1] for n in ff_names})
    ff_exact = all(m.feedforward == (n.rsplit(".", 1)[-1] in ff_suffixes) for n, m in layers.items())
    config = dict(_PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path or model_name_or_path(model),
        task_type=task_type(model),
        target_modules=targets,
        feedforward_modules=(ff_suffixes if exact and ff_exact else ff_names),
    )
    tensors = {f"{KEY_PREFIX}{name}.ia3_l": m.ia3_l for name, m in layers.items()}
    return write_peft_folder(directory, config, tensors)


def load_ia3(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> dict[str, IA3Linear]:
    """Inject and fill the IA3 vectors of a peft IA3 folder into `model` (frozen). Every tensor must be
    `base_model.model.<module>.ia3_l` for a linear module of `model` that target_modules selects, shaped [out, 1]
    or, when feedforward_modules selects it, [1, in]. `trainable` leaves the vectors trainable (to continue
    training); by default they are frozen like the base. Raises AdapterError naming the file and the key."""
    directory = Path(directory)
    config, files = read_method_files(directory)
    expect_peft_type(config, "IA3", directory)
    where = f"loading adapter: {files.weights_path}"
    if not files.tensors:
        raise AdapterError(f"{where}: the file holds no ia3_l tensors, so there is nothing to apply")
    wanted = {}
    for key, t in files.tensors.items():
        name = key.removeprefix(KEY_PREFIX).removesuffix(".ia3_l")
        if not key.startswith(KEY_PREFIX) or not key.endswith(".ia3_l"):
            raise AdapterError(
                f"{where}: unknown tensor {key!r}; an IA3 adapter holds "
                f"{KEY_PREFIX}<module>.ia3_l keys only (modules_to_save is not supported)"
            )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(
                f"{where}: {key!r} adapts {name!r}, which {type(model).__name__} does not have; "
                "is this adapter for another model?"
            ) from None
        if not config.selects(name):
            raise AdapterError(
                f"{where}: {key!r} adapts {name!r}, which target_modules in {CONFIG_NAME} does not "
                "select; the config and the weights disagree"
            )
        try:
            in_features, out_features, _ = _base_shape(module)
        except TypeError:
            raise AdapterError(
                f"{where}: {key!r} adapts {name!r}, a {type(module).__name__}; IA3 adapts linear layers only"
            ) from None
        feedforward = config.is_feedforward(name)
        shape = (1, in_features) if feedforward else (out_features, 1)
        if t.shape != shape:
            kind = "feed-forward (input) scale" if feedforward else "output scale"
            raise AdapterError(
                f"{where}: {key!r} has shape {list(t.shape)}, expected {list(shape)} (the {kind} "
                f"of {name!r}, per feedforward_modules in {CONFIG_NAME})"
            )
        wanted[name] = (key, feedforward)
    freeze(model)
    out = {}
    for name, (key, feedforward) in wanted.items():
        layer = IA3Linear(model.get_submodule(name), feedforward=feedforward)
        with torch.no_grad():
            layer.ia3_l.copy_(files.read(key))
        layer.ia3_l.requires_grad_(trainable)
        _set_submodule(model, name, layer)
        out[name] = layer
    return out


def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every IA3Linear into its base weight and put the base layer back in its place. Returns `model`."""
    for name, layer in ia3_modules(model).items():
        _set_submodule(model, name, layer.merge())
    return model
