"""Tiny transformers models of each supported family, saved as Hugging Face checkpoints for the model tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
# Llama 3.1's scaling with a short "original" context, so the tiny model's frequencies really are rescaled.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
MISTRAL_WINDOW = 8  # shorter than the test sequences, so the sliding window changes the logits

FAMILIES = ("llama", "llama3", "qwen2", "mistral", "llama_tied")


def hf_tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised transformers causal LM of `family` (see FAMILIES), in eval mode."""
    import transformers

    kwargs = dict(TINY)
    if family == "llama":
        cls, config_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
    elif family == "llama3":
        cls, config_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
        kwargs["rope_scaling"] = dict(LLAMA3_ROPE)
    elif family == "llama_tied":
        cls, config_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
        kwargs["tie_word_embeddings"] = True
    elif family == "qwen2":
        cls, config_cls = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
    elif family == "mistral":
        cls, config_cls = transformers.MistralForCausalLM, transformers.MistralConfig
        kwargs["sliding_window"] = MISTRAL_WINDOW
    else:
        raise ValueError(family)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = cls(config_cls(**kwargs)).eval()
    if family == "qwen2":
        # transformers zero-initialises biases; random ones make the parity test see them.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.5)
    return model


def save_hf(model, directory: Path, max_shard_size: str | None = None) -> Path:
    """save_pretrained as safetensors (sharded when max_shard_size is given); returns the directory."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


def hf_logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def random_ids(batch: int, seq: int, seed: int = 1, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)
