"""Checkpoint I/O in one place: reading Hugging Face checkpoints, writing them, and atomic output folders.

- reader: config.json, the shard index and its agreement with the shards, tensors through the Rust reader
  (`open_checkpoint`, `read_config`, `read_json_object`, `Checkpoint`, `TensorEntry`).
- writer: the streaming safetensors writer (`SafetensorsWriter`, `TensorSpec`, `DeferredSpec`).
- shards: sharding, index, config and side files, read-back check (`write_shards`, `verify_written_checkpoint`).
- outdir: output folders that appear complete or not at all (`atomic_output_dir`, `replace_output_dir`,
  `recover_output_dir`, `check_out_dir`).
- names: the file names (`CONFIG_FILE`, `SINGLE_FILE`, `INDEX_FILE`, `shard_names`).
"""

from nibblora.checkpoint.names import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, shard_names
from nibblora.checkpoint.outdir import (
    atomic_output_dir,
    check_out_dir,
    human_bytes,
    recover_output_dir,
    replace_output_dir,
    temp_sibling,
)
from nibblora.checkpoint.reader import (
    Checkpoint,
    TensorEntry,
    open_checkpoint,
    open_safetensors,
    read_config,
    read_json_object,
    weight_files,
)
from nibblora.errors import CheckpointError, CheckpointFileNotFoundError, MissingTensorError

# The writer needs torch; reading, names and output folders do not (nibblora.data uses outdir), so the writer's
# names load on first use (PEP 562).
_WRITER_NAMES = ("DeferredSpec", "SafetensorsWriter", "TensorSpec")


def __getattr__(name: str) -> object:
    if name in _WRITER_NAMES:
        from nibblora.checkpoint import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'nibblora.checkpoint' has no attribute {name!r}")


__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFileNotFoundError",
    "DeferredSpec",
    "MissingTensorError",
    "SafetensorsWriter",
    "TensorEntry",
    "TensorSpec",
    "atomic_output_dir",
    "check_out_dir",
    "human_bytes",
    "open_checkpoint",
    "open_safetensors",
    "read_config",
    "read_json_object",
    "recover_output_dir",
    "replace_output_dir",
    "shard_names",
    "temp_sibling",
    "weight_files",
]
