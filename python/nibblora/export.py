"""Moved: writing checkpoint folders lives in nibblora.checkpoint (shards, outdir, names), the CLI error printer in
nibblora.cli_errors. These names stay importable from here for existing callers; the torch-using ones load on
first use, so `from nibblora.export import run_tool` stays light."""

from nibblora.checkpoint.names import INDEX_FILE as INDEX_NAME  # noqa: F401
from nibblora.checkpoint.names import SINGLE_FILE as SINGLE_NAME  # noqa: F401
from nibblora.checkpoint.names import shard_names  # noqa: F401
from nibblora.checkpoint.outdir import atomic_output_dir  # noqa: F401
from nibblora.checkpoint.shards import parse_size  # noqa: F401  (torch-free)
from nibblora.cli_errors import run_tool  # noqa: F401
from nibblora.errors import ExportError, NibbloraError  # noqa: F401

_SHARDS_NAMES = ("copy_side_files", "release_freed_memory", "split_shards", "write_config", "write_index",
                 "write_shards")


def __getattr__(name: str) -> object:
    if name in _SHARDS_NAMES:
        from nibblora.checkpoint import shards

        return getattr(shards, name)
    raise AttributeError(f"module 'nibblora.export' has no attribute {name!r}")
