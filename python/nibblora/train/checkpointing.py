"""Training checkpoints: written atomically, checksummed, read without pickle.

    <output_dir>/checkpoints/step-00000040/
        adapter/                          LoRA / QLoRA: peft's adapter_config.json + adapter_model.safetensors
                                          other methods (nibblora.methods): their folder + trainable.safetensors
        model.safetensors, config.json    full fine-tuning: every parameter, loadable as a HF checkpoint
        trainer_state.json + .safetensors step, data position, optimizer, scheduler, grad scaler (JSON + tensors)
        rng-rank<N>.json + .safetensors   each rank's random state (LoRA dropout masks)
        manifest.json                     size and sha256 of every file above; written last

Everything is written into `.tmp-step-...` first, the manifest last, then the folder is renamed: a kill at any
moment leaves either the old set of checkpoints or the old set plus one complete new one. On resume the newest
checkpoint whose files all match its manifest is used; damaged ones are skipped with a message saying why.
Nothing is ever unpickled: checkpoints of older versions (trainer_state.pt) are refused, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from nibblora.checkpoint.names import SINGLE_FILE
from nibblora.errors import CheckpointError, OutputError
from nibblora.lora import load_adapter, lora_modules, save_adapter
from nibblora.train.distributed import DistInfo, barrier
from nibblora.train.state_files import load_state, save_state, state_paths

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "nibblora-checkpoint/1"
TRAINER_STATE = "trainer_state"  # stem: trainer_state.json + trainer_state.safetensors
LEGACY_STATE = "trainer_state.pt"  # a pickle, written before manifests existed; never loaded
ADAPTER_DIR = "adapter"
FULL_WEIGHTS = SINGLE_FILE
TRAINABLE_WEIGHTS = "trainable.safetensors"
METHOD_MODES = ("dora", "ia3", "prompt", "prefix", "adapter")
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_HASH_CHUNK = 1 << 20
_LOADING_ADAPTER = "_nibblora_checkpoint"  # the name a checkpoint's adapter is loaded under before it is copied


class LegacyCheckpointError(CheckpointError):
    """A checkpoint written by an older nibblora holds a pickle (trainer_state.pt), which is never loaded."""


def rng_stem(rank: int) -> str:
    return f"rng-rank{rank}"


def step_dirs(output_dir: str | Path) -> list[Path]:
    """Every `step-NNNNNNNN` folder (complete, damaged or legacy), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Checkpoints written completely (they have a manifest), oldest first. Use `verify_checkpoint` to know
    whether one is still intact."""
    return [p for p in step_dirs(output_dir) if (p / MANIFEST).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def checkpoint_step(directory: Path) -> int:
    return int(_STEP_DIR.match(directory.name).group(1))


# ---- random state -------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's random state: torch CPU (and CUDA), Python's and NumPy's global generators."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "algorithm": algorithm,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Any, source: Path) -> None:
    """Restore what `rng_state` returned; CheckpointError naming `source` when it is not such a state."""
    try:
        numpy_state = state["numpy"]
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(
            (
                numpy_state["algorithm"],
                np.asarray(numpy_state["keys"], dtype=np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"reading random state: {source} does not hold a random state ({err}); the checkpoint is damaged"
        ) from None


# ---- weights ------------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, directory: Path, mode: str, base_model_path: str, for_resume: bool = True) -> None:
    """The trained weights into `directory`: the full model as a loadable HF checkpoint (model.safetensors +
    config.json), or, for LoRA / QLoRA, a peft adapter (adapter_config.json + adapter_model.safetensors); the other
    methods' folders (nibblora.methods), plus, when `for_resume` (checkpoints, not the final export),
    trainable.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    if mode == "full":
        # save_model (not save_file) drops the duplicate name of tied weights, as transformers does.
        save_safetensors_model(model, str(directory / FULL_WEIGHTS), metadata={"format": "pt"})
        config = Path(base_model_path) / "config.json"
        if config.is_file():
            shutil.copy2(config, directory / "config.json")
    elif mode in METHOD_MODES:
        from nibblora.methods import save_adapter as save_method
        from nibblora.methods import trainable_parameters

        save_method(model, directory, base_model_name_or_path=base_model_path)
        if not for_resume:
            return
        # Every trainable parameter by name, for resume: peft's file lacks some (prefix tuning's MLP).
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()},
            str(directory / TRAINABLE_WEIGHTS),
            metadata={"format": "pt"},
        )
    else:
        save_adapter(model, directory, base_model_name_or_path=base_model_path)


def _load_trainable_in_place(model: nn.Module, adapter_dir: Path) -> None:
    """Copy trainable.safetensors back into the trainable parameters of the same (injected) model, by name."""
    from nibblora.methods import trainable_parameters

    path = adapter_dir / TRAINABLE_WEIGHTS
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"reading checkpoint {path}: {err}") from None
    params = trainable_parameters(model)
    if set(saved) != set(params):
        extra, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise CheckpointError(
            f"reading checkpoint {path}: it holds other parameters than this run trains (only in "
            f"the checkpoint: {extra[:3]}, only in the model: {missing[:3]}); did train.mode or "
            "its section change? Set it back, or start afresh with checkpoint.resume = false"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(
                    f"reading checkpoint {path}: {name} has shape {list(saved[name].shape)}, the "
                    f"model's is {list(p.shape)}; did the method's section change?"
                )
            p.copy_(saved[name])


def load_weights(model: nn.Module, directory: Path, mode: str) -> None:
    """Copy the weights `save_weights(model, directory / ...)` wrote for a checkpoint back into the same, already
    built (and injected) model, in place: the parameters stay the same objects, so an optimizer built over them
    stays valid. CheckpointError when they do not fit (the config changed since the checkpoint)."""
    if mode == "full":
        try:
            load_safetensors_model(model, str(directory / FULL_WEIGHTS))
        except (SafetensorError, RuntimeError, OSError) as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(
                f"reading checkpoint {directory}: {FULL_WEIGHTS} does not fit this model "
                f"({first_line}); did model.path change since the checkpoint?"
            ) from None
        return
    if mode in METHOD_MODES:
        _load_trainable_in_place(model, directory / ADAPTER_DIR)
        return
    _load_adapter_in_place(model, directory / ADAPTER_DIR)


def _load_adapter_in_place(model: nn.Module, adapter_dir: Path) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        # Loaded as a second adapter through nibblora.lora (the one reader of adapter files), then copied into the
        # adapter being trained and dropped.
        loaded = load_adapter(model, adapter_dir, adapter_name=_LOADING_ADAPTER, check_base_model=False)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"reading checkpoint adapter {adapter_dir}: {err}") from None
    try:
        current = {name: m for name, m in lora_modules(model).items() if m.active_adapter == _LOADING_ADAPTER}
        trained = {name: m for name, m in lora_modules(model).items() if "default" in m.adapters}
        if set(loaded) != set(trained):
            extra, missing = sorted(set(loaded) - set(trained)), sorted(set(trained) - set(loaded))
            raise CheckpointError(
                f"reading checkpoint adapter {adapter_dir}: it adapts other modules than lora.target_modules "
                f"selects (only in the checkpoint: {extra[:3]}, only in the config: {missing[:3]}); set "
                "lora.target_modules back, or start afresh with checkpoint.resume = false"
            )
        with torch.no_grad():
            for name, module in current.items():
                source, target = module.adapters[_LOADING_ADAPTER], module.adapters["default"]
                for attr in ("r", "alpha", "dropout", "rslora"):
                    if getattr(source, attr) != getattr(target, attr):
                        raise CheckpointError(
                            f"reading checkpoint adapter {adapter_dir}: {name} was trained with lora.{attr} = "
                            f"{getattr(source, attr)!r} but the config says {getattr(target, attr)!r}; set it back, "
                            "or start afresh with checkpoint.resume = false"
                        )
                target.lora_A.copy_(source.lora_A)
                target.lora_B.copy_(source.lora_B)
    finally:
        for module in lora_modules(model).values():
            if _LOADING_ADAPTER in module.adapters:
                del module.adapters[_LOADING_ADAPTER]
                module.set_adapter("default" if "default" in module.adapters else None)
        for p in trainable:  # loading froze every parameter
            p.requires_grad_(True)


# ---- manifest -----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> Path:
    """manifest.json: the size and sha256 of every file under `directory` (paths relative, '/'-separated)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def verify_checkpoint(directory: Path, mode: str) -> None:
    """Raise CheckpointError saying what is wrong unless every file the manifest lists is there with its size
    and sha256, and the files resume needs are among them. LegacyCheckpointError for an old pickle checkpoint."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        if (directory / LEGACY_STATE).exists():
            raise LegacyCheckpointError(
                f"checkpoint {directory} was written by an older nibblora: its {LEGACY_STATE} is a pickle, which "
                "could run code when loaded, so it is not loaded; move the checkpoints folder away (or delete it) "
                "to train from the start, or set checkpoint.resume = false"
            )
        raise CheckpointError(f"{MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as err:
        raise CheckpointError(f"{MANIFEST} is unreadable ({type(err).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("step") != checkpoint_step(directory):
        raise CheckpointError(f"{MANIFEST} does not describe step {checkpoint_step(directory)}")
    required = [p.name for p in state_paths(Path(TRAINER_STATE))] + [p.name for p in state_paths(Path(rng_stem(0)))]
    required += [FULL_WEIGHTS] if mode == "full" else []
    for name in required:
        if name not in files:
            raise CheckpointError(f"{MANIFEST} does not list {name}")
    if mode != "full" and not any(name.startswith(f"{ADAPTER_DIR}/") for name in files):
        raise CheckpointError(f"{MANIFEST} lists no {ADAPTER_DIR}/ files (was it written by a full fine-tuning run?)")
    root = directory.resolve()
    for name, entry in sorted(files.items()):
        path = (directory / name).resolve()
        if not path.is_relative_to(root) or not isinstance(entry, dict):
            raise CheckpointError(f"{MANIFEST} has a bad entry {name!r}")
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{name} has {size} bytes where {entry.get('size')} were written (truncated?)")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{name} does not match its sha256 checksum (the file changed after it was written)")


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and the damaged newer ones skipped on the way (path, reason)."""

    directory: Path | None
    skipped: list[tuple[Path, str]]


def find_resume_checkpoint(output_dir: Path, mode: str) -> ResumePoint:
    """The newest intact checkpoint in output_dir (None when there is none), newer damaged ones skipped.
    Raises LegacyCheckpointError when an old pickle checkpoint comes before any intact one."""
    skipped: list[tuple[Path, str]] = []
    for directory in reversed(step_dirs(output_dir)):
        try:
            verify_checkpoint(directory, mode)
        except LegacyCheckpointError:
            raise
        except CheckpointError as err:
            skipped.append((directory, str(err)))
            continue
        return ResumePoint(directory, skipped)
    return ResumePoint(None, skipped)


# ---- writing and reading ------------------------------------------------------------------------------------


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


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: nn.Module,
    trainer_state: dict,
    mode: str,
    base_model_path: str,
    info: DistInfo,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically (every rank calls this: each adds its random state). Returns its path."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    save_state(rng_state(), tmp / rng_stem(info.rank))
    barrier(info)
    if info.is_main:
        try:
            save_weights(model, tmp if mode == "full" else tmp / ADAPTER_DIR, mode, base_model_path)
            save_state(trainer_state, tmp / TRAINER_STATE)
            write_manifest(tmp, step)
            _fsync_tree(tmp)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(
                f"writing checkpoint {final}: {err.strerror or err}; the earlier checkpoints are "
                "kept (free some space, then run the same command to resume)"
            ) from None
        if final.exists():  # the same step saved before a crash (or found damaged) and now again
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete `.tmp-step-*` folders a killed run left behind (call it only while holding the run folder lock)."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (step, optimizer, scheduler, scaler, ...) as saved; CheckpointError when
    it is unreadable or not a dict with an integer step."""
    state = load_state(directory / TRAINER_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state["step"], bool):
        raise CheckpointError(f"reading trainer state: {directory / TRAINER_STATE}.json has no integer step")
    return state


def load_checkpoint(directory: Path, model: nn.Module, mode: str, info: DistInfo) -> dict[str, Any]:
    """Load weights and this rank's random state; return the trainer state (optimizer, scheduler, step...).
    Every file is read and checked before anything is changed but the weights."""
    state = read_trainer_state(directory)
    stem = directory / rng_stem(info.rank)
    if not state_paths(stem)[0].is_file():
        stem = directory / rng_stem(0)  # resumed with more ranks than saved: share rank 0's
    rng = load_state(stem)
    load_weights(model, directory, mode)
    set_rng_state(rng, state_paths(stem)[0])
    return state
