"""Llama-family causal LMs (Llama 2/3, Mistral, Qwen2) loaded straight from Hugging Face checkpoints.

    model = load_model("path/to/checkpoint", dtype=torch.bfloat16, quantize="nf4", device="cuda")
    logits = model(input_ids)                                   # [batch, seq, vocab]
    out = generate(model, input_ids, max_new_tokens=32)         # or model.generate(...)

`ModelConfig` (config.json, validated) needs no torch; the model classes and `load_model` import it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nibblora._lazy import lazy_exports
from nibblora.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError

if TYPE_CHECKING:
    from nibblora.models.llama import (
        MLP,
        Attention,
        DecoderLayer,
        KVCache,
        LlamaForCausalLM,
        LlamaModel,
        RMSNorm,
        RotaryEmbedding,
        apply_rotary,
        build_attention_mask,
        filter_logits,
        generate,
        rope_inverse_frequencies,
    )
    from nibblora.models.loading import load_model

_LLAMA = (
    "MLP",
    "Attention",
    "DecoderLayer",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "build_attention_mask",
    "filter_logits",
    "generate",
    "rope_inverse_frequencies",
)
__getattr__, __dir__ = lazy_exports(
    __name__, globals(), {**dict.fromkeys(_LLAMA, "nibblora.models.llama"), "load_model": "nibblora.models.loading"}
)

__all__ = [
    "MLP",
    "SUPPORTED_MODEL_TYPES",
    "Attention",
    "DecoderLayer",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "UnsupportedModelError",
    "apply_rotary",
    "build_attention_mask",
    "filter_logits",
    "generate",
    "load_model",
    "rope_inverse_frequencies",
]
