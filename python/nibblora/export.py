"""Moved: writing checkpoint folders lives in nibblora.checkpoint (shards, outdir, names), the CLI error printer in
nibblora.cli_errors. These names stay importable from here for existing callers."""

from nibblora.checkpoint.names import INDEX_FILE as INDEX_NAME  # noqa: F401
from nibblora.checkpoint.names import SINGLE_FILE as SINGLE_NAME  # noqa: F401
from nibblora.checkpoint.names import shard_names  # noqa: F401
from nibblora.checkpoint.outdir import atomic_output_dir  # noqa: F401
from nibblora.checkpoint.shards import (  # noqa: F401
    copy_side_files,
    parse_size,
    release_freed_memory,
    split_shards,
    write_config,
    write_index,
    write_shards,
)
from nibblora.cli_errors import run_tool  # noqa: F401
from nibblora.errors import ExportError, NibbloraError  # noqa: F401
