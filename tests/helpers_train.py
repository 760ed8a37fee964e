"""A tiny Llama checkpoint and tokenized rows for the training tests."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers_models import hf_tiny_model, save_hf

from nibblora.train import TokenizedRows, config_from_dict

VOCAB = 128


def tiny_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    return save_hf(hf_tiny_model("llama", seed=seed, **overrides), directory)


def tiny_rows(n: int = 32, seed: int = 0, min_len: int = 6, max_len: int = 20) -> TokenizedRows:
    """Rows of varying length: a prompt (labels -100) and an answer that repeats the prompt backwards."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(min_len // 2, max_len // 2 + 1, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (k,), generator=g)
        ids = torch.cat([prompt, prompt.flip(0)])
        labels = ids.clone()
        labels[:k] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return TokenizedRows(rows)


def tiny_config(model_dir: Path, output_dir: Path, **sections) -> object:
    data = {
        "output_dir": str(output_dir),
        "model": {"path": str(model_dir), "dtype": "float32", "gradient_checkpointing": False},
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
        "data": {"batch_size": 4},
        "train": {
            "mode": "lora",
            "max_steps": 4,
            "lr": 1e-2,
            "grad_accum": 1,
            "warmup_steps": 1,
            "device": "cpu",
            "max_grad_norm": 1.0,
        },
        "checkpoint": {"every": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return config_from_dict(data)
