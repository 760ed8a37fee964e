"""File names of a Hugging Face checkpoint folder, defined once."""

from __future__ import annotations

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def shard_names(count: int) -> list[str]:
    """model.safetensors, or model-00001-of-0000N.safetensors ... as transformers names shards."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
