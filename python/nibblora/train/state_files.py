"""Nested trainer state (optimizer, scheduler, scaler, random states) as a JSON file plus a safetensors file.

    save_state(state, directory / "trainer_state")      # writes trainer_state.json + trainer_state.safetensors
    state = load_state(directory / "trainer_state")

No pickle: the JSON file holds the structure, with every tensor replaced by {"$tensor": "<key>"} and the
tensors themselves in the safetensors file. Both are read by parsers that cannot run code, so a planted or
damaged file can at worst fail to load (CheckpointError naming the file), never execute anything.

Encoded values: dicts (string keys as JSON objects; other keys as {"$items": [[key, value], ...]}), lists,
tuples ({"$tuple": [...]}), str, int, bool, None, finite floats, non-finite floats ({"$float": "nan"}), and
torch tensors of any dtype safetensors stores. Anything else is refused when saving.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nibblora.errors import CheckpointError

JSON_SUFFIX = ".json"
TENSORS_SUFFIX = ".safetensors"
# Trainer state is a few levels deep (optimizer -> state -> param -> tensor); anything far deeper is not ours.
MAX_DEPTH = 32
_TAGS = ("$tensor", "$tuple", "$items", "$float")


def state_paths(stem: Path) -> tuple[Path, Path]:
    """(the JSON file, the safetensors file) of the state saved under `stem`."""
    return stem.with_name(stem.name + JSON_SUFFIX), stem.with_name(stem.name + TENSORS_SUFFIX)


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {
            "$items": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]
        }
    raise TypeError(
        f"saving trainer state: {where} is a {type(value).__name__}, which the checkpoint format "
        "(JSON + safetensors, no pickle) cannot hold"
    )


def save_state(state: Any, stem: Path) -> tuple[Path, Path]:
    """Write `state` as <stem>.json and <stem>.safetensors; returns both paths."""
    json_path, tensors_path = state_paths(stem)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, stem.name)
    save_file(tensors, str(tensors_path), metadata={"format": "pt"})
    json_path.write_text(json.dumps(encoded, allow_nan=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return json_path, tensors_path


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], path: Path):
        self.tensors, self.path, self.used = tensors, path, set()

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(
            f"reading trainer state: {self.path}: {message}; the checkpoint is damaged or was not written by nibblora"
        )

    def decode(self, value: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, list):
            return [self.decode(v, depth + 1) for v in value]
        if not isinstance(value, dict):
            return value  # json.loads gives only str, int, float, bool, None here
        if len(value) == 1 and next(iter(value)) in _TAGS:
            tag, body = next(iter(value.items()))
            if tag == "$tensor":
                if not isinstance(body, str) or body not in self.tensors:
                    raise self.fail(f"refers to tensor {body!r}, which its safetensors file does not hold")
                self.used.add(body)
                return self.tensors[body]
            if tag == "$float":
                if body not in ("nan", "inf", "-inf"):
                    raise self.fail(f"{body!r} is not a non-finite float")
                return float(body)
            if not isinstance(body, list):
                raise self.fail(f"{tag} must hold a list")
            if tag == "$tuple":
                return tuple(self.decode(v, depth + 1) for v in body)
            items = {}
            for pair in body:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise self.fail("$items must hold [key, value] pairs")
                key = self.decode(pair[0], depth + 1)
                if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
                    raise self.fail(f"dict key {key!r} is not hashable")
                items[key] = self.decode(pair[1], depth + 1)
            return items
        return {k: self.decode(v, depth + 1) for k, v in value.items()}


def _reject_constant(name: str) -> Any:
    raise ValueError(f'bare {name} (non-finite floats are written as {{"$float": ...}})')


def load_state(stem: Path) -> Any:
    """Read the state `save_state` wrote under `stem`. Raises CheckpointError naming the file for a missing,
    truncated or malformed file (never a traceback from the parsers, never code execution)."""
    json_path, tensors_path = state_paths(stem)
    for path in (json_path, tensors_path):
        if not path.is_file():
            raise CheckpointError(f"reading trainer state: {path} does not exist")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"reading trainer state: {tensors_path} is not a readable safetensors file ({err})"
        ) from None
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        message = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CheckpointError(f"reading trainer state: {json_path} is not valid JSON ({message})") from None
    decoder = _Decoder(tensors, json_path)
    state = decoder.decode(raw)
    unused = sorted(set(tensors) - decoder.used)
    if unused:
        raise decoder.fail(f"{tensors_path.name} holds tensors nothing refers to ({', '.join(unused[:5])})")
    return state
