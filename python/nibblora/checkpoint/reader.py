"""Read Hugging Face checkpoints: config.json and safetensors weights, one file or sharded, tensor by tensor.

    with open_checkpoint("path/to/model") as ckpt:
        config = ckpt.config                       # dict from config.json
        w = ckpt.get_tensor("model.norm.weight")   # read on demand from the file that holds it
        for name, tensor in ckpt.iter_tensors():   # file by file, in each file's storage order
            ...

Every safetensors file goes through one reader, the Rust core's (`nibblora._native.SafetensorsFile`): its header
is checked when the checkpoint is opened (dtype names, integer shapes and offsets that tile the file exactly, a
size cap, valid UTF-8 names, string metadata), so a truncated, corrupt or hostile file fails at once, naming the
file. The file is then memory-mapped; a tensor is copied out into its own memory and its pages are dropped
again, so a pass over a large checkpoint keeps about one tensor resident.

The index (`model.safetensors.index.json`) and the shards are checked against each other here, once: every
tensor the index places must be in that shard, and no tensor may appear in two shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from nibblora._native import SafetensorsFile
from nibblora.checkpoint.names import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from nibblora.dtypes import torch_dtype
from nibblora.errors import CheckpointError, CheckpointFileNotFoundError, MissingTensorError

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint, from its checked header: where its bytes are, and what they are."""

    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path  # the shard that holds it
    offset: int  # absolute byte offset in `path`
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def read_config(directory: str | Path) -> dict:
    """The parsed config.json of a checkpoint directory (a dict), with errors that name the file."""
    directory = _existing_directory(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointFileNotFoundError(f"reading config: no {CONFIG_FILE} in {directory}")
    return read_json_object(path)


def read_json_object(path: str | Path, phase: str = "reading config") -> dict:
    """A JSON file holding one object, as a dict; CheckpointError naming the file when it is missing, not valid
    JSON, nested too deeply to parse, or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointFileNotFoundError(f"{phase}: {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{phase}: {path} is a folder, expected a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{phase}: {path} is not valid JSON ({err})") from None
    except RecursionError:
        # Python's parser recurses once per nesting level; no config nests more than a few levels.
        raise CheckpointError(f"{phase}: {path} is nested too deeply to be a config (corrupt or hostile)") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{phase}: {path} holds a JSON {type(value).__name__}, expected an object")
    return value


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
                raise CheckpointFileNotFoundError(
                    f"reading {index_path}: shard {file.name} does not exist; the checkpoint is incomplete "
                    "(download or copy it again)"
                )
        return files, weight_map
    if single_path.is_file():
        return [single_path], None
    present = sorted(p.name for p in directory.iterdir())
    hint = ""
    if any(name.endswith(".safetensors") for name in present):
        hint = f" (there are safetensors files, but without {INDEX_FILE} their roles are unknown)"
    elif any(name.endswith((".bin", ".pt")) for name in present):
        hint = " (only PyTorch pickle weights are there; re-save the model with safe_serialization=True)"
    shown = ", ".join(present[:20]) + (f" and {len(present) - 20} more" if len(present) > 20 else "")
    raise CheckpointFileNotFoundError(
        f"no {SINGLE_FILE} and no {INDEX_FILE} in {directory}{hint}; it holds: {shown or 'nothing'}"
    )


def _read_index(index_path: Path) -> dict[str, Path]:
    index = read_json_object(index_path, phase="reading shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"reading {index_path}: expected a 'weight_map' object of tensor name -> shard file")
    directory = index_path.parent
    out = {}
    for name, file in weight_map.items():
        # A shard is a plain .safetensors file name next to the index; anything else (a path that would leave
        # the folder, a name the file system cannot hold) is refused before it reaches the file system.
        plain = Path(file).name == file and file.endswith(".safetensors") and "\0" not in file
        if plain:
            try:
                file.encode("utf-8")
            except UnicodeEncodeError:
                plain = False
        if not plain:
            raise CheckpointError(
                f"reading {index_path}: shard name {file!r} (for {name!r}) is not a plain file name"[:400]
            )
        out[name] = directory / file
    return out


def open_safetensors(path: Path) -> SafetensorsFile:
    """Open one safetensors file through the Rust reader; CheckpointError (or CheckpointFileNotFoundError) naming
    the file when it is missing, unreadable, truncated, corrupt or hostile."""
    try:
        return SafetensorsFile(path)
    except FileNotFoundError:
        raise CheckpointFileNotFoundError(f"reading {path}: the file does not exist") from None
    except CheckpointError as err:  # what the binding raises for an unreadable, corrupt or hostile file
        # The Rust reader's message is "<phase>: <path>: <what is wrong>"; keep what is wrong.
        detail = str(err).split(f"{path}: ", 1)[-1]
        raise CheckpointError(
            f"reading {path}: not a valid safetensors file, truncated or corrupt ({detail}); re-download or re-save it"
        ) from None


class Checkpoint:
    """An open Hugging Face checkpoint directory: its config and its safetensors tensors, read on demand.

    Opening reads config.json (if `require_config`) and every safetensors header; tensors are read only when asked
    for. `entries` maps every tensor name to its TensorEntry, shard by shard, each shard in storage order. Use as a
    context manager, or call `close()`.
    """

    def __init__(self, directory: str | Path, *, require_config: bool = True):
        self.directory = _existing_directory(directory)
        self.config: dict | None = read_config(self.directory) if require_config else None
        self.files, index = weight_files(self.directory)
        self._handles: dict[Path, SafetensorsFile] = {}
        self.entries: dict[str, TensorEntry] = {}
        for file in self.files:
            handle = open_safetensors(file)
            self._handles[file] = handle
            for name, dtype, shape, offset, nbytes in handle.tensors():
                if name in self.entries:
                    raise CheckpointError(
                        f"reading {file}: tensor {name!r} also appears in {self.entries[name].path.name}; "
                        "a checkpoint holds each tensor once"
                    )
                self.entries[name] = TensorEntry(name, dtype, tuple(shape), file, offset, nbytes)
        if index is not None:
            # The index is authoritative for which shard holds a tensor; it must agree with the shards.
            for name, file in index.items():
                entry = self.entries.get(name)
                if entry is None or entry.path != file:
                    raise CheckpointError(
                        f"reading {self.directory / INDEX_FILE}: it places {name!r} in {file.name}, which lacks it"
                        + (f" (it is in {entry.path.name})" if entry is not None else "")
                    )

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint, in file order."""
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, name: str) -> TensorEntry:
        """Tensor `name`'s header entry (MissingTensorError if no file holds it)."""
        try:
            return self.entries[name]
        except KeyError:
            raise MissingTensorError(f"checkpoint {self.directory} has no tensor {name!r}") from None

    def file_of(self, name: str) -> Path:
        """The file that holds tensor `name` (MissingTensorError if none does)."""
        return self.entry(name).path

    def shape_of(self, name: str) -> list[int]:
        """Shape of tensor `name` from its header, without reading the data."""
        return list(self.entry(name).shape)

    def handle_of(self, name: str) -> SafetensorsFile:
        """The open Rust reader of the file holding `name` (for kernels that work on the mapped bytes)."""
        return self._handles[self.entry(name).path]

    def read_bytes(self, name: str) -> np.ndarray:
        """A copy of tensor `name`'s raw little-endian bytes (numpy uint8 [nbytes])."""
        entry = self.entry(name)
        try:
            return self._handles[entry.path].read(name)
        except CheckpointError as err:  # the file changed or went away under us
            raise CheckpointError(f"reading {name!r} from {entry.path}: {err}") from None

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read tensor `name` (a CPU tensor in its stored dtype and shape, in its own memory). Errors name the
        key and the file."""
        import torch

        entry = self.entry(name)
        raw = torch.from_numpy(self.read_bytes(name))
        try:
            dtype = torch_dtype(entry.dtype)
        except ValueError as err:
            raise CheckpointError(f"reading {name!r} from {entry.path}: {err}") from None
        return raw.view(dtype).reshape(entry.shape)

    def get_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.get_tensor(name) for name in names}

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, file by file, so at most one tensor is held here at once.

        `names` restricts (and checks) which tensors are read; by default every tensor in the checkpoint.
        """
        wanted = self.keys() if names is None else list(names)
        for name in wanted:
            self.entry(name)  # fail before reading anything if a name is missing
        order = {file: i for i, file in enumerate(self.files)}
        for name in sorted(wanted, key=lambda n: order[self.entries[n].path]):
            yield name, self.get_tensor(name)

    def close(self) -> None:
        # The Rust readers unmap their files when dropped.
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.directory)!r}, files={len(self.files)}, tensors={len(self)})"


def open_checkpoint(directory: str | Path, *, require_config: bool = True) -> Checkpoint:
    """Open a checkpoint directory (config.json + model.safetensors, or sharded with model.safetensors.index.json)."""
    return Checkpoint(directory, require_config=require_config)
