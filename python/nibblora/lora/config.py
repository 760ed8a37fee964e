"""LoRA hyper-parameters and the name-matching rules peft uses for target_modules, rank_pattern and alpha_pattern."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nibblora.errors import ConfigError
from nibblora.quant.names import BNB_QUANT_TYPES

ALL_LINEAR = "all-linear"
INIT_CHOICES = ("kaiming", "gaussian")
QUANT_BASE_CHOICES = (None, *BNB_QUANT_TYPES)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (rsLoRA)."""
    if r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def match_pattern_key(patterns: Iterable[str], module_name: str) -> str | None:
    """The first key of `patterns` that matches `module_name` as peft does (`(.*\\.)?(key)$`), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def matches_target(module_name: str, target_modules: str | Iterable[str]) -> bool:
    """peft's rule: a string is a regex that must match the full name; a list entry matches the full name or a
    dotted suffix of it (`q_proj` matches `model.layers.0.self_attn.q_proj`)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith(f".{t}") for t in target_modules)


@dataclass
class LoRAConfig:
    """What `inject_lora` builds for every targeted linear layer.

    r / alpha: rank and scale numerator (scaling = alpha / r, or alpha / sqrt(r) with `rslora`).
    rank_pattern / alpha_pattern: per-module overrides, keyed by a module-name suffix or regex, as in peft.
    init: "kaiming" (peft's default: kaiming-uniform A with a = sqrt(5)) or "gaussian" (A ~ N(0, 1/r)); B is zero.
    quantize_base: None keeps the dense base; "nf4" / "fp4" replaces it by a frozen 4-bit `NF4Linear`.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False
    init: str = "kaiming"
    train_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    quantize_base: str | None = None
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        if not _positive_int(self.r):
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not _finite_number(self.alpha):
            raise ConfigError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        for name, value in self.rank_pattern.items():
            if not _positive_int(value):
                raise ConfigError(f"rank_pattern[{name!r}] must be a positive integer, got {value!r}")
        for name, value in self.alpha_pattern.items():
            if not _finite_number(value):
                raise ConfigError(f"alpha_pattern[{name!r}] must be a finite number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        if self.quantize_base not in QUANT_BASE_CHOICES:
            raise ValueError(f"quantize_base must be None, 'nf4' or 'fp4', got {self.quantize_base!r}")
        if isinstance(self.target_modules, Mapping):
            raise TypeError("target_modules must be a list of module names, a regex string or 'all-linear'")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one module, e.g. ['q_proj', 'v_proj']")

    def rank_for(self, module_name: str) -> int:
        key = match_pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = match_pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha
