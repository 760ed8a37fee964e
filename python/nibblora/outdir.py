"""Output folders written atomically: work in a hidden sibling folder, rename it into place when complete.

Shared by the tools (`nibblora.quantize`, `nibblora.prepare`, ...), so an interrupted or failed run never leaves
a half-written output behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path


def check_out_dir(
    out_dir: Path, overwrite: bool, inputs: Sequence[Path] = (), error: type[Exception] = ValueError
) -> None:
    """Refuse an output folder that is an input, is a file, or is non-empty without `overwrite`."""
    for source in inputs:
        if out_dir.resolve() == source.resolve():
            raise error(f"{out_dir}: output folder is the input folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise error(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise error(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
            for source in inputs:
                if source.resolve().is_relative_to(out_dir.resolve()):
                    raise error(f"{out_dir}: --overwrite would delete the input {source}")


def temp_sibling(out_dir: Path) -> Path:
    """A fresh hidden folder beside `out_dir` (same file system, so the final rename is atomic), with the
    permissions a plain mkdir would give (mkdtemp makes it private)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` folder to `out_dir`, replacing what was there."""
    if out_dir.exists() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out_dir.exists():
        out_dir.rmdir()
    os.rename(tmp, out_dir)


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError
