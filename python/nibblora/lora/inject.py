"""inject_lora: wrap the targeted linear layers of any nn.Module in LoRALinear, freeze the rest, report the count."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nibblora.lora.config import ALL_LINEAR, LoRAConfig, matches_target
from nibblora.lora.layers import LoRALinear, NF4Linear


@dataclass
class TrainableRow:
    """One adapted module: its name, [out, in] shape, rank and trainable parameter count."""

    name: str
    out_features: int
    in_features: int
    r: int
    trainable: int
    quantized: bool


@dataclass
class LoRASummary:
    """Trainable parameters per adapted module and in total. `str(summary)` is a printable table."""

    rows: list[TrainableRow] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def format_table(self) -> str:
        width = max([len("module")] + [len(r.name) for r in self.rows])
        lines = [f"{'module':<{width}}  {'shape [out, in]':>16}  {'r':>4}  {'base':>5}  {'trainable':>12}"]
        for r in self.rows:
            shape = f"[{r.out_features}, {r.in_features}]"
            base = "4-bit" if r.quantized else "dense"
            lines.append(f"{r.name:<{width}}  {shape:>16}  {r.r:>4}  {base:>5}  {r.trainable:>12,}")
        lines.append(
            f"trainable {self.trainable_params:,} of {self.total_params:,} parameters "
            f"({100 * self.trainable_fraction:.2f}%) in {len(self.rows)} LoRA modules"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the output head ("lm_head"), which all-linear leaves alone, as peft does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}
    return {name for name, module in model.named_modules() if module is head}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, NF4Linear)) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def find_target_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules `target_modules` selects (linear layers and existing LoRALinear), in model order."""
    excluded = _output_embedding_names(model) if target_modules == ALL_LINEAR else set()
    names = []
    for name, module in model.named_modules():
        if not name or name in excluded:
            continue
        if isinstance(module, LoRALinear):
            hit = target_modules == ALL_LINEAR or matches_target(name, target_modules)
        elif _is_linear(module) and not _inside_lora(name, model):
            hit = target_modules == ALL_LINEAR or matches_target(name, target_modules)
        else:
            hit = False
        if hit:
            names.append(name)
    return names


def _inside_lora(name: str, model: nn.Module) -> bool:
    parent = name.rpartition(".")[0]
    while parent:
        if isinstance(model.get_submodule(parent), LoRALinear):
            return True
        parent = parent.rpartition(".")[0]
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    # A fresh module starts in training mode; it must follow the model's mode, or LoRA dropout would stay on
    # in a model that was put in eval mode before the adapter arrived.
    module.train(owner.training)
    setattr(owner, child, module)


def inject_lora(
    model: nn.Module,
    target_modules: str | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
    quantize_base: str | None = None,
    *,
    init: str = "kaiming",
    train_bias: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    adapter_name: str = "default",
    adapter_dtype: torch.dtype = torch.float32,
    freeze: bool = True,
) -> LoRASummary:
    """Put a LoRA adapter on every module `target_modules` selects, in place, and freeze everything else.

    target_modules: module-name suffixes (["q_proj", "v_proj"]), a regex matched against full names, or
    "all-linear" (every linear layer except the output head, as peft). quantize_base "nf4"/"fp4" replaces each
    targeted dense base by a frozen 4-bit NF4Linear (compute dtype: `compute_dtype`, default the layer's dtype).
    A module that already is a LoRALinear gets one more adapter named `adapter_name` (which becomes active).
    Returns the trainable-parameter summary (print it for a table).
    """
    config = LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        rslora=rslora,
        init=init,
        train_bias=train_bias,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        quantize_base=quantize_base,
        blocksize=blocksize,
        double_quant=double_quant,
    )
    return inject_lora_config(
        model,
        config,
        compute_dtype=compute_dtype,
        adapter_name=adapter_name,
        adapter_dtype=adapter_dtype,
        freeze=freeze,
    )


def inject_lora_config(
    model: nn.Module,
    config: LoRAConfig,
    *,
    compute_dtype: torch.dtype | None = None,
    adapter_name: str = "default",
    adapter_dtype: torch.dtype = torch.float32,
    freeze: bool = True,
    names: list[str] | None = None,
) -> LoRASummary:
    """inject_lora with a LoRAConfig; `names` (full module names) overrides the target_modules search."""
    if names is None:
        names = find_target_modules(model, config.target_modules)
        if not names:
            raise ValueError(
                f"target_modules {config.target_modules!r} matched no linear layer of {type(model).__name__}; "
                "check the module names with [n for n, _ in model.named_modules()]"
            )
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        r, alpha = config.rank_for(name), config.alpha_for(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r, alpha, config.dropout, config.rslora, config.init, adapter_dtype)
            module.train(module.training)  # the new adapter takes the layer's mode
            continue
        if config.quantize_base is not None and isinstance(module, nn.Linear):
            module = NF4Linear.from_linear(
                module, config.quantize_base, config.blocksize, config.double_quant, compute_dtype
            )
        _set_submodule(
            model,
            name,
            LoRALinear(
                module,
                r,
                alpha,
                config.dropout,
                config.rslora,
                config.init,
                config.train_bias,
                adapter_name,
                adapter_dtype,
            ),
        )
    return lora_summary(model)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` active in every LoRALinear of `model` (None: base only)."""
    for module in lora_modules(model).values():
        module.set_adapter(name)


def lora_summary(model: nn.Module) -> LoRASummary:
    """Count trainable parameters per LoRALinear and in total. 4-bit weights count as their logical size."""
    summary = LoRASummary()
    for name, module in lora_modules(model).items():
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        adapter = module.adapter
        summary.rows.append(
            TrainableRow(
                name,
                module.out_features,
                module.in_features,
                0 if adapter is None else adapter.r,
                trainable,
                module.is_quantized,
            )
        )
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            summary.total_params += p.numel()
            summary.trainable_params += p.numel() if p.requires_grad else 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            summary.total_params += module.weight_shape.numel()
    return summary
