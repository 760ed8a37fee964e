"""A peft LoRA adapter as the merge tool sees it: nibblora's one adapter reader (read_adapter_files), plus what
merging alone refuses. Every tensor is read once here, so NaN / infinity in an adapter is reported naming the
adapter file and tensor before anything is planned or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nibblora.errors import AdapterError, CheckpointError, ExportError
from nibblora.lora.adapter_files import AdapterFiles, AdapterModule, read_adapter_files


class MergeError(ExportError):
    """Bad merge input (files, keys, shapes, options): nothing is written; the CLI exits with code 2."""


class MergeAdapterError(MergeError, AdapterError):
    """An adapter given to merge is malformed or does not fit: both a MergeError and an AdapterError."""


LoRAModule = AdapterModule  # the merge tool's name for one adapted module


@dataclass
class AdapterSource:
    """An adapter folder checked for merging. `files` is what read_adapter_files found (typed config in
    `files.config`); `config` is the raw adapter_config.json dict (already validated by the schema); `shapes` maps
    each key to (safetensors dtype, shape)."""

    files: AdapterFiles
    config: dict = field(init=False)
    shapes: dict[str, tuple[str, tuple[int, ...]]] = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.files.config.raw
        self.shapes = {k: (t.dtype, t.shape) for k, t in self.files.tensors.items()}

    @property
    def directory(self) -> Path:
        return self.files.directory

    @property
    def weights_path(self) -> Path:
        return self.files.weights_path

    @property
    def modules(self) -> dict[str, AdapterModule]:
        return self.files.modules

    @property
    def replacements(self) -> dict[str, str]:
        return self.files.replacements

    @property
    def saved_base_layers(self) -> dict[str, str]:
        return self.files.saved_base_layers

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `key` in `dtype` (a copy); MergeAdapterError if it holds NaN or infinity."""
        try:
            return self.files.read(key, dtype)
        except AdapterError as err:
            raise MergeAdapterError(str(err)) from None


def read_adapter(directory: str | Path) -> AdapterSource:
    """Read and check an adapter folder for merging (see read_adapter_files: config schema, header, keys, dtypes,
    ranks, every value finite). Raises MergeAdapterError (a MergeError and an AdapterError) naming the file and key."""
    try:
        files = read_adapter_files(directory, check_values=True)
    except CheckpointError as err:  # AdapterError, or CheckpointFileNotFoundError for a missing file
        raise MergeAdapterError(str(err)) from None
    config = files.config
    if config.lora_bias:
        raise MergeAdapterError(
            f"merging adapter: {files.config_path}: lora_bias=true (a trained bias on lora_B) is not supported"
        )
    for name, entry in sorted(files.modules.items()):
        if entry.magnitude_key is not None and entry.transpose:
            raise MergeAdapterError(
                f"merging adapter: {files.weights_path}: DoRA on a transposed weight ({name!r}) is not supported"
            )
    return AdapterSource(files)
