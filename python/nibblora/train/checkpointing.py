"""Training checkpoints, written atomically: a folder is complete once it has its final name.

    <output_dir>/checkpoints/step-00000040/
        adapter/                 LoRA / QLoRA: peft's adapter_config.json + adapter_model.safetensors
        model.safetensors        full fine-tuning: every parameter (config.json copied beside it)
        trainer_state.pt         step, optimizer, scheduler, grad scaler
        rng-rank<N>.pt           each rank's random state (LoRA dropout masks)

Everything is written into `.tmp-step-...` first, then renamed; a kill at any moment leaves either the old
set of checkpoints or the old set plus one complete new one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from nibblora.lora import lora_modules, save_adapter
from nibblora.lora.adapters import KEY_PREFIX, WEIGHTS_NAME
from nibblora.train.distributed import DistInfo, barrier

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(model: nn.Module, directory: Path, mode: str, base_model_path: str) -> None:
    """The trained weights: a peft adapter (LoRA, QLoRA) or the full model as a loadable HF checkpoint."""
    if mode == "full":
        directory.mkdir(parents=True, exist_ok=True)
        # save_model (not save_file) drops the duplicate name of tied weights, as transformers does.
        save_safetensors_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config = Path(base_model_path) / "config.json"
        if config.is_file():
            shutil.copy2(config, directory / "config.json")
    else:
        save_adapter(model, directory / "adapter", base_model_name_or_path=base_model_path)


def load_weights(model: nn.Module, directory: Path, mode: str) -> None:
    """Copy the weights `save_weights` wrote back into an already built (and injected) model."""
    if mode == "full":
        load_safetensors_model(model, str(directory / "model.safetensors"))
        return
    tensors = load_file(str(directory / "adapter" / WEIGHTS_NAME))
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            adapter = module.adapter
            adapter.lora_A.copy_(tensors[f"{KEY_PREFIX}{name}.lora_A.weight"])
            adapter.lora_B.copy_(tensors[f"{KEY_PREFIX}{name}.lora_B.weight"])


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, trainer_state: dict, mode: str,
                    base_model_path: str, info: DistInfo, keep_last: int) -> Path:
    """Write checkpoint `step` atomically (every rank calls this: each adds its random state). Returns its path."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        save_weights(model, tmp, mode, base_model_path)
        torch.save(trainer_state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved before a crash and now again
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete `.tmp-step-*` folders a killed run left behind."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(directory: Path, model: nn.Module, mode: str, info: DistInfo) -> dict:
    """Load weights and this rank's random state; return the trainer state (optimizer, scheduler, step...)."""
    load_weights(model, directory, mode)
    rng_file = directory / f"rng-rank{info.rank}.pt"
    if not rng_file.is_file():
        rng_file = directory / "rng-rank0.pt"  # resumed with more ranks than saved: share rank 0's
    set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(directory / STATE_FILE, weights_only=False, map_location="cpu")
