"""Read Hugging Face checkpoints: config.json and safetensors weights, one file or sharded, tensor by tensor.

    with open_checkpoint("path/to/model") as ckpt:
        config = ckpt.config                       # dict from config.json
        w = ckpt.get_tensor("model.norm.weight")   # read on demand from the file that holds it
        for name, tensor in ckpt.iter_tensors():   # file by file, in each file's storage order
            ...

Files are memory-mapped by `safetensors.safe_open`, so only the tensors you ask for are read. Every header is
checked when the checkpoint is opened (safetensors rejects a header whose offsets do not cover the file exactly),
so a truncated or corrupt file fails at once, naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from nibblora.errors import CheckpointError, CheckpointFileNotFoundError, MissingTensorError  # noqa: F401 (re-exported)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(directory: str | Path) -> dict:
    """The parsed config.json of a checkpoint directory (a dict), with errors that name the file."""
    directory = _existing_directory(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointFileNotFoundError(f"reading config: no {CONFIG_FILE} in {directory}")
    return read_json_object(path)


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding one object, as a dict; CheckpointError naming the file when it is missing, not valid
    JSON or not an object."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFileNotFoundError(f"reading config: {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"reading config: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"reading config: {path} holds a JSON {type(config).__name__}, expected an object")
    return config


def _existing_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointFileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass the folder that holds {CONFIG_FILE}")
    return directory


def weight_files(directory: str | Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files of a checkpoint, and for a sharded one the index's {tensor name: file} map.

    A single `model.safetensors` gives ([that file], None); `model.safetensors.index.json` gives its shards
    in first-mention order and its weight map. Every file named must exist.
    """
    directory = _existing_directory(directory)
    index_path = directory / INDEX_FILE
    single_path = directory / SINGLE_FILE
    if index_path.is_file():
        weight_map = _read_index(index_path)
        files = list(dict.fromkeys(weight_map.values()))
        for file in files:
            if not file.is_file():
                raise CheckpointFileNotFoundError(f"reading {index_path}: shard {file.name} does not exist")
        return files, weight_map
    if single_path.is_file():
        return [single_path], None
    present = sorted(p.name for p in directory.iterdir())
    hint = ""
    if any(name.endswith(".bin") or name.endswith(".pt") for name in present):
        hint = " (only PyTorch pickle weights are there; re-save the model with safe_serialization=True)"
    raise CheckpointFileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}; it holds: {', '.join(present) or 'nothing'}"
    )


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"reading {index_path}: not valid JSON ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"reading {index_path}: expected a 'weight_map' object of tensor name -> shard file")
    directory = index_path.parent
    out = {}
    for name, file in weight_map.items():
        # A shard name is a plain file name next to the index; refuse paths that would leave the directory.
        if Path(file).name != file:
            raise CheckpointError(f"reading {index_path}: shard name {file!r} (for {name!r}) is not a plain file name")
        out[name] = directory / file
    return out


class Checkpoint:
    """An open Hugging Face checkpoint directory: its config and its safetensors tensors, read on demand.

    Opening reads config.json (if present) and every safetensors header; tensors are read only when asked for.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, directory: str | Path, *, require_config: bool = True):
        self.directory = _existing_directory(directory)
        self.config: dict | None = read_config(self.directory) if require_config else None
        self.files, index = weight_files(self.directory)
        self._handles = {}
        self._location: dict[str, Path] = {}
        for file in self.files:
            handle = self._open(file)
            self._handles[file] = handle
            for name in handle.keys():
                self._location.setdefault(name, file)
        if index is not None:
            # The index is authoritative for which shard holds a tensor; it must agree with the shards.
            for name, file in index.items():
                if name not in self._handles[file].keys():
                    raise CheckpointError(
                        f"reading {self.directory / INDEX_FILE}: it places {name!r} in {file.name}, which lacks it"
                    )
                self._location[name] = file

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as err:  # SafetensorError is not importable as a stable public name
            raise CheckpointError(f"reading {file}: not a valid safetensors file, truncated or corrupt ({err})") from None

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint, in file order."""
        return list(self._location)

    def __contains__(self, name: object) -> bool:
        return name in self._location

    def __len__(self) -> int:
        return len(self._location)

    def file_of(self, name: str) -> Path:
        """The file that holds tensor `name` (MissingTensorError if none does)."""
        try:
            return self._location[name]
        except KeyError:
            raise MissingTensorError(f"checkpoint {self.directory} has no tensor {name!r}") from None

    def shape_of(self, name: str) -> list[int]:
        """Shape of tensor `name` from its header, without reading the data."""
        return list(self._handles[self.file_of(name)].get_slice(name).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read tensor `name` (a CPU tensor in its stored dtype). Errors name the key and the file."""
        file = self.file_of(name)
        try:
            return self._handles[file].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"reading {name!r} from {file}: {err}") from None

    def get_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.get_tensor(name) for name in names}

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, file by file, so at most one tensor is held here at once.

        `names` restricts (and checks) which tensors are read; by default every tensor in the checkpoint.
        """
        wanted = self.keys() if names is None else list(names)
        for name in wanted:
            self.file_of(name)  # fail before reading anything if a name is missing
        order = {file: i for i, file in enumerate(self.files)}
        for name in sorted(wanted, key=lambda n: order[self._location[n]]):
            yield name, self.get_tensor(name)

    def close(self) -> None:
        # safe_open handles release their memory map when dropped.
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.directory)!r}, files={len(self.files)}, tensors={len(self)})"


def open_checkpoint(directory: str | Path, *, require_config: bool = True) -> Checkpoint:
    """Open a checkpoint directory (config.json + model.safetensors, or sharded with model.safetensors.index.json)."""
    return Checkpoint(directory, require_config=require_config)
