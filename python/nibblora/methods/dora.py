"""DoRA (Liu et al. 2024): LoRA's direction update plus a learned magnitude per output row, in peft's format.

    inject_dora(model, ["q_proj", "v_proj"], r=8, alpha=16)    # DoRALinear over each target (dense or NF4 base)
    save_dora(model, "out/dora")      # peft's LoRA keys + <module>.lora_magnitude_vector [out], use_dora=true
    load_dora(model, "out/dora")      # reads peft's DoRA adapters too
    merge_dora(model)                 # W' = m / ||W + s B A||_row * (W + s B A): exact

The layer computes what peft's DoraLinearLayer does: with V = W + s B A and the row norms ||V|| treated as a
constant (detached, section 4.3 of the paper), y = base(x) + (m / ||V|| - 1) * (W x) + (m / ||V||) * s B A x.
The magnitude starts at ||W|| and B at zero, so an injected model computes exactly what the base model does.
Plain autograd: no custom backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nibblora.errors import AdapterError
from nibblora.lora.adapter_files import KEY_PREFIX, read_adapter_files
from nibblora.lora.inject import _set_submodule, find_target_modules
from nibblora.lora.layers import LoRAAdapter, NF4Linear, _base_shape
from nibblora.methods.common import (
    freeze,
    model_name_or_path,
    module_device,
    task_type,
    write_peft_folder,
)

MAGNITUDE_KEY = "lora_magnitude_vector"


class DoRALinear(nn.Module):
    """A frozen linear base (nn.Linear, NF4Linear, or transformers' Conv1D) + a LoRA adapter `lora`
    (lora_A [r, in], lora_B [out, r], float32) + `magnitude` [out] float32, initialised to the base rows' norms."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = _base_shape(base)
        self.base = base
        device = module_device(base)
        self.lora = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, rslora, device=device)
        self.merged = False
        with torch.no_grad():
            norm = self._row_norm(self.dense_weight(torch.float32), self.lora)
        self.magnitude = nn.Parameter(norm)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight [out, in] in `dtype` (dequantized for a 4-bit base), without gradient."""
        if isinstance(self.base, NF4Linear):
            return self.base.dequantized_weight(dtype).detach()
        w = self.base.weight.detach()
        return (w.t() if self.fan_in_fan_out else w).to(dtype)

    @staticmethod
    def _row_norm(weight: torch.Tensor, lora: LoRAAdapter) -> torch.Tensor:
        """||W + s B A|| per output row, float [out]; detached (the paper treats it as a constant)."""
        delta = (lora.lora_B.detach() @ lora.lora_A.detach()).to(weight.dtype)
        return torch.linalg.norm(weight + lora.scaling * delta, dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = self.lora
        xa = x.to(a.lora_A.dtype)
        weight = self.dense_weight(xa.dtype)
        scale = (self.magnitude / self._row_norm(weight, a)).view(1, -1)
        dropped = F.dropout(xa, a.dropout, self.training)
        lora = F.linear(F.linear(dropped, a.lora_A), a.lora_B)
        if a.dropout > 0 and self.training:
            base_out = F.linear(dropped, weight)  # the dropped input, as peft does when dropout is active
        else:
            bias = getattr(self.base, "bias", None)
            base_out = y.to(xa.dtype) if bias is None else (y - bias).to(xa.dtype)
        return y + ((scale - 1) * base_out + scale * lora * a.scaling).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """float32 [out, in]: m / ||W + s B A|| * (W + s B A)."""
        weight = self.dense_weight(torch.float32)
        a = self.lora
        updated = weight + a.scaling * (a.lora_B.float() @ a.lora_A.float())
        return (self.magnitude.float() / torch.linalg.norm(updated, dim=1)).view(-1, 1) * updated

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the adapter into the dense base weight; returns the base layer."""
        if isinstance(self.base, NF4Linear):
            raise AdapterError(
                "merging DoRA: the base layer is 4-bit (NF4Linear); merge into the dense checkpoint "
                "with python -m nibblora.merge instead"
            )
        new = self.merged_weight()
        w = self.base.weight
        w.copy_((new.t() if self.fan_in_fan_out else new).to(w.dtype))
        self.merged = True
        return self.base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def dora_modules(model: nn.Module) -> dict[str, DoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def inject_dora(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
) -> dict[str, DoRALinear]:
    """Freeze `model` and wrap every linear layer target_modules selects (peft's rule) in a DoRALinear; lora_A,
    lora_B and magnitude are the trainable parameters. Returns {module name: DoRALinear}."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    names = find_target_modules(model, targets)
    if not names:
        raise AdapterError(
            f"injecting DoRA: target_modules {targets!r} selects no linear layer of "
            f"{type(model).__name__}; name modules that exist (e.g. ['q_proj', 'v_proj'])"
        )
    freeze(model)
    out = {}
    for name in names:
        layer = DoRALinear(model.get_submodule(name), r, alpha, dropout, rslora)
        _set_submodule(model, name, layer)
        out[name] = layer
    return out


def save_dora(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write every DoRALinear in peft's LoRA format with use_dora=true: `<module>.lora_A.weight` [r, in],
    `<module>.lora_B.weight` [out, r] and `<module>.lora_magnitude_vector` [out]. All layers must share r, alpha,
    dropout and rslora (peft's one config per adapter)."""
    from nibblora.lora.adapters import _PEFT_DEFAULTS  # every key peft writes for a LoRA adapter

    layers = dora_modules(model)
    if not layers:
        raise AdapterError(f"saving DoRA: {type(model).__name__} has no DoRA layers; call inject_dora first")
    if any(m.merged for m in layers.values()):
        raise AdapterError("saving DoRA: the adapters were merged into the weights already; save before merging")
    settings = {(m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.rslora) for m in layers.values()}
    if len(settings) > 1:
        raise AdapterError(
            f"saving DoRA: the layers mix (r, alpha, dropout, rslora) settings {sorted(settings)}; "
            "peft's format holds one per adapter"
        )
    r, alpha, dropout, rslora = settings.pop()
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
    config = dict(_PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path or model_name_or_path(model),
        task_type=task_type(model),
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        use_dora=True,
        fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()),
        target_modules=suffixes if not find_target_modules(model, suffixes) else sorted(layers),
    )
    tensors = {}
    for name, m in layers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora.lora_A
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora.lora_B
        tensors[f"{KEY_PREFIX}{name}.{MAGNITUDE_KEY}"] = m.magnitude
    return write_peft_folder(directory, config, tensors)


def load_dora(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> dict[str, DoRALinear]:
    """Inject and fill the DoRA layers of a peft LoRA folder with use_dora=true (frozen unless `trainable`).
    Every adapted module needs lora_A, lora_B and its magnitude. Raises AdapterError naming the file and key."""
    files = read_adapter_files(directory)
    config = files.config
    where = f"loading adapter: {files.weights_path}"
    if not config.use_dora:
        raise AdapterError(
            f"loading adapter: {files.config_path}: use_dora is false: this is a plain LoRA adapter; "
            "load it with nibblora.lora.load_adapter (or nibblora.methods.load_adapter)"
        )
    if config.modules_to_save or files.replacements or files.saved_base_layers:
        raise AdapterError(
            f"{where}: modules_to_save / extra tensors {sorted(files.replacements)[:3]} are not "
            "supported by load_dora; merge the adapter with python -m nibblora.merge instead"
        )
    built = {}
    for name, entry in sorted(files.modules.items()):
        if entry.embedding:
            raise AdapterError(f"{where}: DoRA on the embedding {name!r} is not supported by load_dora")
        if entry.magnitude_key is None:
            raise AdapterError(
                f"{where}: {name!r} has no {KEY_PREFIX}{name}.{MAGNITUDE_KEY}; a DoRA adapter has "
                "one per adapted module"
            )
        try:
            module = model.get_submodule(name)
            in_features, out_features, _ = _base_shape(module)
        except (AttributeError, TypeError):
            raise AdapterError(
                f"{where}: {entry.a_key!r} adapts {name!r}, which is not a linear layer of "
                f"{type(model).__name__}; is this adapter for another model?"
            ) from None
        a_shape, b_shape = files.tensors[entry.a_key].shape, files.tensors[entry.b_key].shape
        if a_shape[1] != in_features or b_shape[0] != out_features:
            raise AdapterError(
                f"{where}: {entry.a_key!r} {list(a_shape)} / {entry.b_key!r} {list(b_shape)} do not "
                f"fit {name!r} ({in_features} -> {out_features})"
            )
        built[name] = (module, entry)
    freeze(model)
    out = {}
    for name, (module, entry) in built.items():
        layer = DoRALinear(module, entry.rank, config.alpha_for(name), config.lora_dropout, config.use_rslora)
        with torch.no_grad():
            layer.lora.lora_A.copy_(files.read(entry.a_key))
            layer.lora.lora_B.copy_(files.read(entry.b_key))
            layer.magnitude.copy_(files.read(entry.magnitude_key))
        for p in layer.parameters():
            p.requires_grad_(trainable)
        _set_submodule(model, name, layer)
        out[name] = layer
    return out


def merge_dora(model: nn.Module) -> nn.Module:
    """Fold every DoRALinear into its base weight and put the base layer back. Returns `model`."""
    for name, layer in dora_modules(model).items():
        _set_submodule(model, name, layer.merge())
    return model
