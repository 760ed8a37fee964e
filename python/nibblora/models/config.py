"""ModelConfig: the few numbers a Llama-family decoder needs, read from a Hugging Face config.json.

Llama, Mistral and Qwen2 share one architecture; they differ only in these fields:
- Qwen2 puts a bias on q/k/v (never on o_proj or the MLP); Llama has `attention_bias` / `mlp_bias` flags.
- Mistral (and Qwen2 with use_sliding_window) limit attention to the last `sliding_window` keys. That only changes
  anything once a sequence is longer than the window (4096 for Mistral 7B); we apply it in the mask, exactly.
- RoPE: "default", "linear" or Llama-3.1's "llama3" frequency scaling. Older config files spell it
  `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters`. Both are read.

config.json is untrusted input: every key nibblora reads is checked against one schema (`SCHEMA` below, and
`ROPE_SCHEMA` / `BNB_SCHEMA` for the nested objects) before any number is used, so a bad value is a
CheckpointError naming the file and the key, never a ZeroDivisionError or TypeError further down. Keys nibblora
does not read are ignored, as transformers ignores keys it does not know. This module imports no torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nibblora.errors import CheckpointError, ConfigError, UnsupportedModelError
from nibblora.quant.names import BNB_QUANT_TYPES

# model_type -> the causal-LM architecture name transformers writes in config.json.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


# --- the schema: each check returns None when the value is acceptable, else what was expected ---------------------

Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # JSON true is not the number 1


def _is_number(value: Any) -> bool:
    # Python's json module reads NaN and Infinity; no config value nibblora uses may be either.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Bounds that no released model comes near, so that a hostile file cannot make nibblora allocate per-layer lists
# or RoPE tables of gigabytes, or overflow torch's int64, before the checkpoint's tensors are even looked at.
MAX_SIZE = 2**31 - 1  # vocab, hidden, intermediate sizes, heads, positions, windows
MAX_LAYERS = 4096
MAX_HEAD_DIM = 2**16
INT64 = (-(2**63), 2**63 - 1)  # token ids end up in int64 tensors


def positive_int(value: Any, limit: int = MAX_SIZE) -> str | None:
    return None if _is_int(value) and 0 < value <= limit else f"a positive integer <= {limit}"


def layer_count(value: Any) -> str | None:
    return positive_int(value, MAX_LAYERS)


def head_dim(value: Any) -> str | None:
    return positive_int(value, MAX_HEAD_DIM)


def non_negative_int(value: Any) -> str | None:
    return None if _is_int(value) and 0 <= value <= MAX_SIZE else f"an integer from 0 to {MAX_SIZE}"


def any_int(value: Any) -> str | None:
    return None if _is_int(value) and INT64[0] <= value <= INT64[1] else "a 64-bit integer"


def positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "a finite number > 0"


def non_negative_number(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else "a finite number >= 0"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def string(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def json_object(value: Any) -> str | None:
    return None if isinstance(value, dict) else "an object"


def string_list(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "a list of strings"


def token_ids(value: Any) -> str | None:
    values = value if isinstance(value, list) else [value]
    return None if all(any_int(v) is None for v in values) else "a 64-bit integer or a list of them"


def nullable(check: Check) -> Check:
    """`check`, or JSON null (the field then takes its default)."""

    def check_or_null(value: Any) -> str | None:
        expected = check(value) if value is not None else None
        return None if expected is None else f"{expected} or null"

    return check_or_null


# Every top-level key ModelConfig reads (absent keys take transformers' defaults).
SCHEMA: dict[str, Check] = {
    "model_type": string,
    "architectures": nullable(string_list),
    "hidden_act": string,
    "vocab_size": positive_int,
    "hidden_size": positive_int,
    "intermediate_size": positive_int,
    "num_hidden_layers": layer_count,
    "num_attention_heads": positive_int,
    "num_key_value_heads": nullable(positive_int),
    "head_dim": nullable(head_dim),
    "rms_norm_eps": positive_number,
    "max_position_embeddings": positive_int,
    "rope_theta": positive_number,
    "rope_scaling": nullable(json_object),
    "rope_parameters": nullable(json_object),
    "tie_word_embeddings": boolean,
    "attention_bias": boolean,
    "mlp_bias": boolean,
    "sliding_window": nullable(positive_int),
    "use_sliding_window": boolean,
    "max_window_layers": non_negative_int,
    "layer_types": nullable(string_list),
    "bos_token_id": nullable(any_int),
    "eos_token_id": nullable(token_ids),
    "pad_token_id": nullable(any_int),
    "initializer_range": non_negative_number,
    "quantization_config": nullable(json_object),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# rope_scaling / rope_parameters (merged, rope_parameters winning); the factors a rope type needs are required.
ROPE_SCHEMA: dict[str, Check] = {
    "rope_type": string,
    "type": string,
    "rope_theta": positive_number,
    "factor": positive_number,
    "low_freq_factor": positive_number,
    "high_freq_factor": positive_number,
    "original_max_position_embeddings": positive_int,
}
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}

# quantization_config, the keys load_model reads when quant_method is "bitsandbytes".
BNB_SCHEMA: dict[str, Check] = {
    "quant_method": string,
    "load_in_4bit": boolean,
    "load_in_8bit": boolean,
    "bnb_4bit_quant_type": string,
    "bnb_4bit_use_double_quant": boolean,
    "bnb_4bit_compute_dtype": nullable(string),
}


def _shown(value: Any) -> str:
    """A short one-line rendering of a JSON value for an error message (strings escaped, containers by kind)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)  # repr escapes newlines and lone surrogates, so the message stays one printable line
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(
    values: Mapping[str, Any], schema: Mapping[str, Check], where: str, *, prefix: str = "", error=CheckpointError
) -> None:
    """Raise `error` naming `where` and the first key of `values` whose value the schema refuses."""
    for key, check in schema.items():
        if key in values:
            expected = check(values[key])
            if expected is not None:
                raise error(f"{where}: {prefix}{key} is {_shown(values[key])}; expected {expected}")


def _supported_list() -> str:
    return ", ".join(f"{t} ({a})" for t, a in SUPPORTED_MODEL_TYPES.items())


@dataclass
class ModelConfig:
    """Shape and options of a Llama-family decoder. Field names follow transformers' config.json.

    Built by `from_hf_dict` / `from_pretrained` (config.json checked against SCHEMA) or directly in code (the
    same checks, raising ConfigError).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...}; None for plain RoPE
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_uses_sliding_window: list[bool] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        where = "ModelConfig"
        check_fields(vars(self), SCHEMA, where, error=ConfigError)
        check_fields(vars(self), {"qkv_bias": boolean, "o_bias": boolean}, where, error=ConfigError)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_attention_shape(self.num_attention_heads, self.num_key_value_heads, self.head_dim, where, ConfigError)
        if not self.layer_uses_sliding_window:
            self.layer_uses_sliding_window = [self.sliding_window is not None] * self.num_hidden_layers
        if len(self.layer_uses_sliding_window) != self.num_hidden_layers:
            raise ConfigError(
                f"{where}: layer_uses_sliding_window has {len(self.layer_uses_sliding_window)} entries; "
                f"expected one per layer ({self.num_hidden_layers})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported; nibblora implements {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Read a transformers config dict, checking every key it uses (SCHEMA).

        Raises UnsupportedModelError for a model nibblora cannot build (another family, activation or RoPE type,
        a quantization method other than bitsandbytes 4-bit) and CheckpointError for a missing or malformed value;
        both name `source` and the key.
        """
        if not isinstance(hf, Mapping):
            raise CheckpointError(f"{source}: holds a JSON {type(hf).__name__}, expected an object")
        check_fields(hf, {k: SCHEMA[k] for k in ("model_type", "architectures")}, source)
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            found = f"model_type {model_type!r}" + (f" ({', '.join(architectures)})" if architectures else "")
            raise UnsupportedModelError(
                f"{source}: {found} is not a supported causal LM; nibblora supports {_supported_list()}"
            )
        expected = SUPPORTED_MODEL_TYPES[model_type]
        if architectures and expected not in architectures:
            raise UnsupportedModelError(
                f"{source}: architectures {architectures} is not a causal LM nibblora can load; "
                f"expected {expected!r} for model_type {model_type!r} (supported: {_supported_list()})"
            )
        check_fields(hf, {"hidden_act": string}, source)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
        for key in REQUIRED:
            if hf.get(key) is None:
                raise CheckpointError(f"{source}: missing required field {key!r}")
        check_fields(hf, SCHEMA, source)
        _check_quantization_config(hf.get("quantization_config"), source)

        n_layers = hf["num_hidden_layers"]
        n_heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or n_heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        _check_attention_shape(n_heads, kv_heads, head_dim, source, CheckpointError)
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
            if unknown:
                raise CheckpointError(f"{source}: layer_types holds {unknown}; expected only {list(LAYER_TYPES)}")
            if len(layer_types) != n_layers:
                raise CheckpointError(
                    f"{source}: layer_types has {len(layer_types)} entries; expected one per layer ({n_layers})"
                )
        rope_theta, rope_scaling = _read_rope(hf, source)

        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
            window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
            if window is None:
                sliding = [False] * n_layers
            elif layer_types:
                sliding = [t == "sliding_attention" for t in layer_types]
            else:
                sliding = [i >= hf.get("max_window_layers", 28) for i in range(n_layers)]
        else:
            bias = hf.get("attention_bias", False)
            qkv_bias, o_bias, mlp_bias = bias, bias, hf.get("mlp_bias", False)
            window = hf.get("sliding_window") if model_type == "mistral" else None
            sliding = [window is not None] * n_layers

        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            model_type=model_type,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=window,
            layer_uses_sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ModelConfig:
        """Read `directory/config.json`."""
        from nibblora.checkpoint import read_config  # the checkpoint reader imports torch; ModelConfig alone need not

        return cls.from_hf_dict(read_config(directory), source=str(Path(directory) / "config.json"))


def _check_attention_shape(n_heads: int, kv_heads: int, head_dim: int, where: str, error: type[Exception]) -> None:
    """Grouped-query attention needs whole groups, and RoPE rotates channels in pairs."""
    if n_heads % kv_heads:
        raise error(
            f"{where}: num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({kv_heads}) "
            "for grouped-query attention"
        )
    if head_dim < 2 or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise error(
            f"{where}: head_dim is {head_dim} (head_dim, or hidden_size // num_attention_heads); "
            f"expected an even number from 2 to {MAX_HEAD_DIM}, as rotary embeddings rotate channels in pairs"
        )


def _check_quantization_config(qc: dict | None, source: str) -> None:
    """The keys load_model reads from a bitsandbytes quantization_config; other methods are refused there."""
    if not qc:
        return
    check_fields(qc, {"quant_method": nullable(string)}, source, prefix="quantization_config.")
    if qc.get("quant_method") != "bitsandbytes":
        return  # load_model refuses other methods by name
    check_fields(qc, BNB_SCHEMA, source, prefix="quantization_config.")
    quant_type = qc.get("bnb_4bit_quant_type", "nf4")
    if quant_type not in BNB_QUANT_TYPES:
        raise UnsupportedModelError(
            f"{source}: quantization_config.bnb_4bit_quant_type {quant_type!r} is not supported; "
            f"expected one of {', '.join(BNB_QUANT_TYPES)}"
        )


def _read_rope(hf: Mapping[str, Any], source: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either spelling of the RoPE settings."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    check_fields(legacy, ROPE_SCHEMA, source, prefix="rope_scaling.")
    check_fields(params, ROPE_SCHEMA, source, prefix="rope_parameters.")
    merged = {**legacy, **params}
    theta = float(merged.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    # Old configs say "type" where new ones say "rope_type".
    legacy_type = merged.pop("type", "default")
    rope_type = merged.pop("rope_type", legacy_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: RoPE type {rope_type!r} is not supported; nibblora implements {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    where = "rope_parameters" if {"rope_type", "type"} & params.keys() else "rope_scaling"  # where the type was set
    for key in ROPE_REQUIRED[rope_type]:
        if key not in merged:
            raise CheckpointError(f"{source}: {where}.{key} is missing; RoPE type {rope_type!r} needs it")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        if merged["high_freq_factor"] == merged["low_freq_factor"]:
            raise CheckpointError(
                f"{source}: {where}.high_freq_factor equals low_freq_factor ({merged['low_freq_factor']}); "
                "llama3 RoPE scaling blends between them and needs them to differ"
            )
        merged.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    return theta, {"rope_type": rope_type, **merged}
