"""Moved to nibblora.checkpoint.outdir; these names stay importable from here."""

from nibblora.checkpoint.outdir import (  # noqa: F401
    atomic_output_dir,
    check_out_dir,
    human_bytes,
    move_into_place,
    recover_output_dir,
    replace_output_dir,
    temp_sibling,
)
