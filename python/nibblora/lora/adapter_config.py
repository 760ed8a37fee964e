"""The one schema of peft's adapter_config.json: every key nibblora reads is type-checked here, once.

    config = parse_adapter_config(json.loads(text), path)      # AdapterConfig, or AdapterError naming key and file

Values are refused, never coerced: `r: 4.5` is not truncated to 4, `use_rslora: "false"` is not truthy, a NaN
`lora_alpha` is not a number. Unknown keys are tolerated (peft adds some in most releases) and kept in `raw`.
`parse_adapter_config` reads LoRA (and DoRA) configs, what the LoRA tools take; `parse_any_adapter_config` also
reads IA3, PROMPT_TUNING and PREFIX_TUNING configs (IA3AdapterConfig, PromptLearningConfig) and nibblora's own
BOTTLENECK adapters (BottleneckAdapterConfig), which
`nibblora.methods.load_adapter` dispatches on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nibblora.errors import AdapterError
from nibblora.lora.config import ALL_LINEAR, LoRAConfig, lora_scaling, match_pattern_key, matches_target

PHASE = "reading adapter config"
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class AdapterConfig:
    """A validated LoRA adapter_config.json.

    target_modules: a regex (full match), a tuple of module-name suffixes, "all-linear", or None when the file
    leaves it out (then only the tensor keys say what is adapted). rank_pattern / alpha_pattern: per-module
    overrides keyed by name suffix or regex, as peft matches them. raw: the whole JSON object, unknown keys kept.
    """

    path: Path | None
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    peft_type: str = "LORA"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def narrowed(self) -> bool:
        """layers_to_transform / layers_pattern / exclude_modules take modules out of what target_modules selects."""
        return bool(self.layers_to_transform is not None or self.layers_pattern or self.exclude_modules)

    def selects(self, module: str) -> bool:
        """Whether target_modules (peft's rule) selects `module`; True when the config does not say."""
        if self.target_modules is None or self.target_modules == ALL_LINEAR:
            return True
        return matches_target(module, self.target_modules)

    def rank_for(self, module: str) -> int:
        key = match_pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = match_pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        """lora_alpha / r (or / sqrt(r) with use_rslora) with this module's rank_pattern / alpha_pattern applied."""
        return lora_scaling(self.rank_for(module), self.alpha_for(module), self.use_rslora)

    def lora_config(self) -> LoRAConfig:
        """The LoRAConfig that builds these adapters' layers (target_modules must be given)."""
        if self.target_modules is None:
            raise AdapterError(
                _where(
                    self.path,
                    "target_modules",
                    "is missing; an adapter config to load needs r, lora_alpha and target_modules",
                )
            )
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoRAConfig(
            r=self.r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=targets,
            rslora=self.use_rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
        )


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows 1e400 written out in digits)
        return False


def _where(path: Path | None, key: str, problem: str) -> str:
    return f"{PHASE}: {path if path is not None else 'adapter_config.json'}: key {key!r} {problem}"


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed access to one JSON object's keys; every refusal names the file and the key."""

    def __init__(self, raw: Mapping[str, Any], path: Path | None) -> None:
        self.raw, self.path = raw, path

    def fail(self, key: str, problem: str) -> AdapterError:
        return AdapterError(_where(self.path, key, problem))

    def required(self, key: str, needs: str = "a LoRA adapter config needs at least r and lora_alpha") -> object:
        if key not in self.raw:
            raise self.fail(key, f"is missing; {needs}")
        return self.raw[key]

    def positive_int(self, key: str, value: object, what: str = "") -> int:
        # bool is an int in Python, and 4.0 is not an integer in JSON's sense either: refuse both.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, f"must be a positive integer{what}, got {_describe(value)}")
        return value

    def finite_number(self, key: str, value: object, what: str = "") -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise self.fail(key, f"must be a finite number{what}, got {_describe(value)}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.raw.get(key)
        if value is None:  # absent or null: peft's default, false
            return False
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_describe(value)}")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"must be a string or null, got {_describe(value)}")
        return value

    def names(self, key: str, allow_str: bool) -> str | tuple[str, ...] | None:
        """null, a string (when allowed) or a list of strings; only target_modules may not be empty."""
        value = self.raw.get(key)
        if value is None or (allow_str and isinstance(value, str)):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            kinds = "a string or a list of strings" if allow_str else "a list of strings"
            raise self.fail(key, f"must be {kinds}, got {_describe(value)}")
        if not value:
            if key == "target_modules":  # the others only narrow or add, so an empty list means "none"
                raise self.fail(key, "is an empty list: it selects no module; name the modules to adapt")
            return None
        return tuple(value)

    def regex(self, key: str, pattern: str, what: str = "") -> None:
        try:
            re.compile(pattern)
        except (re.error, RecursionError) as err:
            raise self.fail(
                key, f"holds {_describe(pattern)}{what}, which is not a valid regular expression ({err})"
            ) from None

    def pattern(self, key: str, check: Callable[[str, object, str], Any]) -> dict:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be an object of module name -> value, got {_describe(value)}")
        for name in value:
            self.regex(key, name, " (a key: peft matches keys as regular expressions)")
        return {name: check(key, v, f" for {name!r}") for name, v in value.items()}


def _parse_lora(raw: Mapping[str, Any], path: Path | None) -> AdapterConfig:
    f = _Fields(raw, path)
    r = f.positive_int("r", f.required("r"))
    alpha = f.finite_number("lora_alpha", f.required("lora_alpha"))
    dropout_value = raw.get("lora_dropout")
    dropout = 0.0 if dropout_value is None else f.finite_number("lora_dropout", dropout_value)
    if not 0.0 <= dropout < 1.0:
        raise f.fail("lora_dropout", f"must be in [0, 1), got {_describe(dropout_value)}")
    bias = raw.get("bias", "none")
    if bias is None:
        bias = "none"
    if bias not in BIAS_CHOICES:
        raise f.fail("bias", f"must be one of {', '.join(map(repr, BIAS_CHOICES))}, got {_describe(bias)}")
    layers = raw.get("layers_to_transform")
    if layers is not None and not isinstance(layers, bool) and isinstance(layers, int):
        layers = (layers,)
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers
        ):
            raise f.fail(
                "layers_to_transform",
                f"must be a layer index or a list of them, got {_describe(raw.get('layers_to_transform'))}",
            )
        layers = tuple(layers) or None
    targets = f.names("target_modules", allow_str=True)
    if isinstance(targets, str) and targets != ALL_LINEAR:
        f.regex("target_modules", targets)  # a string is a regex that must match whole module names
    return AdapterConfig(
        path=path,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=f.boolean("use_rslora"),
        use_dora=f.boolean("use_dora"),
        fan_in_fan_out=f.boolean("fan_in_fan_out"),
        lora_bias=f.boolean("lora_bias"),
        bias=bias,
        modules_to_save=f.names("modules_to_save", allow_str=False),  # type: ignore[arg-type]
        rank_pattern=f.pattern("rank_pattern", f.positive_int),
        alpha_pattern=f.pattern("alpha_pattern", f.finite_number),
        layers_to_transform=layers,
        layers_pattern=f.names("layers_pattern", allow_str=True),
        exclude_modules=f.names("exclude_modules", allow_str=True),
        base_model_name_or_path=f.optional_str("base_model_name_or_path"),
        peft_type="LORA",
        raw=dict(raw),
    )


@dataclass(frozen=True)
class IA3AdapterConfig:
    """A validated IA3 adapter_config.json: which modules carry a learned scale (target_modules) and which of them
    scale their input (feedforward_modules, a subset) rather than their output. Matching follows peft's rule."""

    path: Path | None
    target_modules: str | tuple[str, ...] | None
    feedforward_modules: str | tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    peft_type: str = "IA3"
    raw: dict[str, Any] = field(default_factory=dict)

    def selects(self, module: str) -> bool:
        if self.target_modules is None or self.target_modules == ALL_LINEAR:
            return True
        return matches_target(module, self.target_modules)

    def is_feedforward(self, module: str) -> bool:
        return self.feedforward_modules is not None and matches_target(module, self.feedforward_modules)


PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass(frozen=True)
class PromptLearningConfig:
    """A validated PROMPT_TUNING or PREFIX_TUNING adapter_config.json (peft's PromptLearningConfig).

    num_virtual_tokens: virtual tokens per sequence. token_dim: hidden size (prompt tuning) or, for prefix tuning,
    the key/value width per layer (num_key_value_heads x head_dim for grouped-query attention, as peft rewrites
    it). num_layers / num_attention_heads: decoder layers and (key/value) heads. The four sizes may be null in a
    hand-written config; the loader then takes them from the model.
    """

    path: Path | None
    peft_type: str
    num_virtual_tokens: int
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _parse_ia3(raw: Mapping[str, Any], path: Path | None) -> IA3AdapterConfig:
    f = _Fields(raw, path)
    targets = f.names("target_modules", allow_str=True)
    feedforward = f.names("feedforward_modules", allow_str=True)
    for key, value in (("target_modules", targets), ("feedforward_modules", feedforward)):
        if isinstance(value, str) and value != ALL_LINEAR:
            f.regex(key, value)
    if isinstance(targets, tuple) and isinstance(feedforward, tuple) and not set(feedforward) <= set(targets):
        raise f.fail(
            "feedforward_modules",
            f"names {sorted(set(feedforward) - set(targets))}, which target_modules "
            "does not select; peft requires feedforward_modules to be a subset of target_modules",
        )
    return IA3AdapterConfig(
        path=path,
        target_modules=targets,
        feedforward_modules=feedforward,
        fan_in_fan_out=f.boolean("fan_in_fan_out"),
        modules_to_save=f.names("modules_to_save", allow_str=False),  # type: ignore[arg-type]
        exclude_modules=f.names("exclude_modules", allow_str=True),
        base_model_name_or_path=f.optional_str("base_model_name_or_path"),
        raw=dict(raw),
    )


def _optional_positive(f: _Fields, key: str) -> int | None:
    value = f.raw.get(key)
    return None if value is None else f.positive_int(key, value)


def _parse_prompt_learning(raw: Mapping[str, Any], path: Path | None) -> PromptLearningConfig:
    f = _Fields(raw, path)
    peft_type = raw["peft_type"]
    n = f.positive_int(
        "num_virtual_tokens",
        f.required("num_virtual_tokens", "a prompt-learning adapter config needs num_virtual_tokens"),
    )
    submodules = _optional_positive(f, "num_transformer_submodules")
    if submodules not in (None, 1):
        raise f.fail("num_transformer_submodules", f"is {submodules}: nibblora's models are decoder-only (1)")
    init = raw.get("prompt_tuning_init") or "RANDOM"
    if peft_type == "PROMPT_TUNING" and init not in PROMPT_TUNING_INITS:
        raise f.fail(
            "prompt_tuning_init", f"must be one of {', '.join(map(repr, PROMPT_TUNING_INITS))}, got {_describe(init)}"
        )
    return PromptLearningConfig(
        path=path,
        peft_type=peft_type,
        num_virtual_tokens=n,
        token_dim=_optional_positive(f, "token_dim"),
        num_layers=_optional_positive(f, "num_layers"),
        num_attention_heads=_optional_positive(f, "num_attention_heads"),
        num_transformer_submodules=submodules,
        prompt_tuning_init=init if isinstance(init, str) else "RANDOM",
        prompt_tuning_init_text=f.optional_str("prompt_tuning_init_text"),
        prefix_projection=f.boolean("prefix_projection"),
        encoder_hidden_size=_optional_positive(f, "encoder_hidden_size"),
        base_model_name_or_path=f.optional_str("base_model_name_or_path"),
        raw=dict(raw),
    )


BOTTLENECK_VARIANTS = ("houlsby", "pfeiffer")
BOTTLENECK_ACTIVATIONS = ("relu", "silu", "gelu")


@dataclass(frozen=True)
class BottleneckAdapterConfig:
    """A validated nibblora bottleneck-adapter config (peft has no such method; the format is nibblora's own,
    documented in docs/methods.md). target_modules: full names of the modules whose output is adapted."""

    path: Path | None
    variant: str
    bottleneck_size: int
    non_linearity: str
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None = None
    peft_type: str = "BOTTLENECK"
    raw: dict[str, Any] = field(default_factory=dict)


def _parse_bottleneck(raw: Mapping[str, Any], path: Path | None) -> BottleneckAdapterConfig:
    f = _Fields(raw, path)
    needs = "a bottleneck adapter config needs variant, bottleneck_size, non_linearity and target_modules"
    variant = f.required("variant", needs)
    if variant not in BOTTLENECK_VARIANTS:
        raise f.fail("variant", f"must be one of {', '.join(map(repr, BOTTLENECK_VARIANTS))}, got {_describe(variant)}")
    act = f.required("non_linearity", needs)
    if act not in BOTTLENECK_ACTIVATIONS:
        raise f.fail(
            "non_linearity", f"must be one of {', '.join(map(repr, BOTTLENECK_ACTIVATIONS))}, got {_describe(act)}"
        )
    f.required("target_modules", needs)
    targets = f.names("target_modules", allow_str=False)
    return BottleneckAdapterConfig(
        path=path,
        variant=variant,
        bottleneck_size=f.positive_int("bottleneck_size", f.required("bottleneck_size", needs)),
        non_linearity=act,
        target_modules=targets,  # type: ignore[arg-type]
        base_model_name_or_path=f.optional_str("base_model_name_or_path"),
        raw=dict(raw),
    )


AnyAdapterConfig = AdapterConfig | IA3AdapterConfig | PromptLearningConfig | BottleneckAdapterConfig

# peft_type -> parser. LORA covers DoRA too (use_dora); the others are read by nibblora.methods.
_PARSERS: dict[str, Callable[[Mapping[str, Any], Path | None], Any]] = {
    "LORA": _parse_lora,
    "IA3": _parse_ia3,
    "PROMPT_TUNING": _parse_prompt_learning,
    "PREFIX_TUNING": _parse_prompt_learning,
    "BOTTLENECK": _parse_bottleneck,  # nibblora's own format: peft has no bottleneck adapters
}
METHOD_NAMES = {
    "LORA": "a LoRA",
    "IA3": "an IA3",
    "PROMPT_TUNING": "a prompt-tuning",
    "PREFIX_TUNING": "a prefix-tuning",
    "BOTTLENECK": "a bottleneck",
}


def parse_adapter_config(
    raw: object, path: str | Path | None = None, *, peft_types: tuple[str, ...] | None = ("LORA",)
) -> Any:
    """Validate a parsed adapter_config.json (`path` only names the file in errors). Raises AdapterError naming
    the file and the key for a wrong type or value, a missing r / lora_alpha, or a peft_type outside
    `peft_types` (default: LoRA only, an AdapterConfig; None: every type in `_PARSERS`)."""
    path = Path(path) if path is not None else None
    if not isinstance(raw, dict):
        where = path if path is not None else "adapter_config.json"
        raise AdapterError(f"{PHASE}: {where} must hold a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")  # old peft versions (and hand-written configs) leave it out
    accepted = tuple(_PARSERS) if peft_types is None else peft_types
    parser = _PARSERS.get(peft_type) if isinstance(peft_type, str) and peft_type in accepted else None
    if parser is None:
        hint = "load this one with peft"
        if isinstance(peft_type, str) and peft_type in _PARSERS:
            hint = (
                f"this is {METHOD_NAMES[peft_type]} adapter: load it with nibblora.methods.load_adapter, "
                "which dispatches on peft_type"
            )
        raise AdapterError(
            _where(
                path,
                "peft_type",
                f"is {_describe(peft_type)}: nibblora reads "
                f"{', '.join(map(repr, accepted))} adapters only here; {hint}",
            )
        )
    return parser(raw, path)


def parse_any_adapter_config(raw: object, path: str | Path | None = None) -> AnyAdapterConfig:
    """parse_adapter_config for every peft_type nibblora reads (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, and
    nibblora's own BOTTLENECK)."""
    return parse_adapter_config(raw, path, peft_types=None)
