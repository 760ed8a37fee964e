"""ModelConfig: the few numbers a Llama-family decoder needs, read from a Hugging Face config.json.

Llama, Mistral and Qwen2 share one architecture; they differ only in these fields:
- Qwen2 puts a bias on q/k/v (never on o_proj or the MLP); Llama has `attention_bias` / `mlp_bias` flags.
- Mistral (and Qwen2 with use_sliding_window) limit attention to the last `sliding_window` keys. That only changes
  anything once a sequence is longer than the window (4096 for Mistral 7B); we apply it in the mask, exactly.
- RoPE: "default", "linear" or Llama-3.1's "llama3" frequency scaling. Older config files spell it
  `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters`. Both are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nibblora.checkpoint import CheckpointError, read_config
from nibblora.errors import UnsupportedModelError

# model_type -> the causal-LM architecture name transformers writes in config.json.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _supported_list() -> str:
    return ", ".join(f"{t} ({a})" for t, a in SUPPORTED_MODEL_TYPES.items())


@dataclass
class ModelConfig:
    """Shape and options of a Llama-family decoder. Field names follow transformers' config.json."""

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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if not self.layer_uses_sliding_window:
            self.layer_uses_sliding_window = [self.sliding_window is not None] * self.num_hidden_layers
        if len(self.layer_uses_sliding_window) != self.num_hidden_layers:
            raise ValueError("layer_uses_sliding_window needs one entry per layer")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported; nibblora implements {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @classmethod
    def from_hf_dict(cls, hf: dict, *, source: str = "config.json") -> ModelConfig:
        """Read a transformers config dict. Raises UnsupportedModelError naming what was found."""
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
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu', SwiGLU)")

        try:
            n_layers = int(hf["num_hidden_layers"])
            required = {k: int(hf[k]) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")}
        except KeyError as err:
            raise CheckpointError(f"{source}: missing required field {err.args[0]!r}") from None

        rope_theta, rope_scaling = _read_rope(hf)

        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
            window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
            layer_types = hf.get("layer_types")
            if window is None:
                sliding = [False] * n_layers
            elif layer_types:
                sliding = [t == "sliding_attention" for t in layer_types]
            else:
                sliding = [i >= hf.get("max_window_layers", 28) for i in range(n_layers)]
        else:
            bias = bool(hf.get("attention_bias", False))
            qkv_bias, o_bias, mlp_bias = bias, bias, bool(hf.get("mlp_bias", False))
            window = hf.get("sliding_window") if model_type == "mistral" else None
            sliding = [window is not None] * n_layers

        return cls(
            **required,
            num_hidden_layers=n_layers,
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            model_type=model_type,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
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
        return cls.from_hf_dict(read_config(directory), source=str(Path(directory) / "config.json"))


def _read_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either spelling of the RoPE settings."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = float(merged.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    # Old configs say "type" where new ones say "rope_type".
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    merged.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    return theta, {"rope_type": rope_type, **merged}
