"""Output folders that appear complete or not at all, and an --overwrite that never leaves the path empty.

Every tool writes its output into a hidden sibling folder, `.NAME.tmp-<pid>-<random>` (same file system, so the
final rename is atomic, and the writer's pid is in the name), and swaps it into place only once complete:

    with atomic_output_dir(out_dir) as tmp:      # the one helper the tools, prepare and the trainer use
        write everything under tmp               # an exception (Ctrl-C included) deletes tmp, out_dir untouched

Replacing an existing folder (`replace_output_dir`) exchanges the two folders in one step where the OS can
(Linux renameat2 RENAME_EXCHANGE): there is no moment without an output at the path. Elsewhere it renames the
finished folder to `.NAME.new-<pid>-*` (complete, by its name), moves the old one to `.NAME.old-<pid>-*`, then the
new one in; a kill between those steps is finished (or undone) by the next run through `recover_output_dir`,
which every entry point here calls first. It also deletes the temporary folders of writers that died (their
pid no longer runs), so killed runs do not pile up partial outputs.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from nibblora.errors import NibbloraError, OutputError

_log = logging.getLogger(__name__)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_out_dir(
    out_dir: Path, overwrite: bool, inputs: Sequence[Path] = (), error: type[Exception] = ValueError
) -> None:
    """Refuse an output folder that is an input, is a file, or is non-empty without `overwrite`. First finishes
    or undoes an --overwrite that a killed run left half done, and removes dead writers' temporary folders."""
    out_dir = Path(out_dir)
    recover_output_dir(out_dir)
    for source in inputs:
        if out_dir.resolve() == Path(source).resolve():
            raise error(f"{out_dir}: output folder is the input folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise error(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise error(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
            for source in inputs:
                if Path(source).resolve().is_relative_to(out_dir.resolve()):
                    raise error(f"{out_dir}: --overwrite would delete the input {source}")


def _sibling_pattern(out_dir: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|new|old)-(\d+)-[A-Za-z0-9_]+")


def temp_sibling(out_dir: Path) -> Path:
    """A fresh hidden folder `.NAME.tmp-<pid>-<random>` beside `out_dir`, with the permissions a plain mkdir
    would give (mkdtemp makes it private). Recovers what killed runs left first (see recover_output_dir)."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        recover_output_dir(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except NibbloraError:
        raise
    except OSError as err:
        raise output_error(out_dir, err) from None
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def recover_output_dir(out_dir: Path) -> list[str]:
    """Finish or undo an interrupted --overwrite of `out_dir`, and delete the temporary folders of writers that
    are no longer running. Returns what was done, one line each (empty when there was nothing to do).

    A complete `.NAME.new-*` replaces a missing `out_dir` (the swap is finished); otherwise a `.NAME.old-*`
    goes back to a missing `out_dir` (the swap is undone). Folders of live writers are never touched.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    pattern = _sibling_pattern(out_dir)
    stale: dict[str, list[Path]] = {"tmp": [], "new": [], "old": []}
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return []
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if match and (path.is_dir() or path.is_symlink()) and not _pid_alive(int(match.group(2))):
            stale[match.group(1)].append(path)
    done: list[str] = []
    try:
        for kind in ("new", "old"):
            if stale[kind] and not os.path.lexists(out_dir):
                newest = max(stale[kind], key=lambda p: p.stat().st_mtime)
                os.rename(newest, out_dir)
                stale[kind].remove(newest)
                verb = "finished replacing" if kind == "new" else "restored the previous"
                done.append(f"{verb} {out_dir} (a run was killed while swapping it in)")
    except OSError as err:
        raise output_error(out_dir, err) from None
    for path in stale["tmp"] + stale["new"] + stale["old"]:
        _remove(path)
        done.append(f"removed {path.name}, left by a writer that is no longer running")
    for line in done:
        _log.warning(line)  # without logging configured, Python prints warnings to stderr: the user sees it
    return done


@cache
def _renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None  # not Linux, or a libc older than glibc 2.28
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the OS or
    the file system cannot; OSError for any other failure."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _unique_sibling(out_dir: Path, kind: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def replace_output_dir(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder `tmp` (a sibling of `out_dir`) at `out_dir`, replacing what was there, so that
    the path always holds either the old output or the new one, never nothing, even if the process is killed.

    This is the one swap every writer of an output folder uses (quantize, merge, prepare, the trainer's final
    export). An empty or absent `out_dir` is a plain atomic rename.
    """
    tmp, out_dir = Path(tmp), Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir())):
        os.rename(tmp, out_dir)  # rename(2) replaces an empty folder atomically
        return
    if exchange_dirs(tmp, out_dir):
        _remove(tmp)  # tmp now holds the old output; a kill here leaves a stale tmp for the next run
        return
    # No exchange here: a recoverable three-step swap. The `.new-` name marks the folder as complete.
    new = _unique_sibling(out_dir, "new")
    os.rename(tmp, new)
    old = _unique_sibling(out_dir, "old")
    os.rename(out_dir, old)
    os.rename(new, out_dir)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a replaced output: a folder with its contents, or (an --out that was a symlink) only the link."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


# The name the tools and prepare used so far.
move_into_place = replace_output_dir


def output_error(out_dir: Path, err: OSError) -> OutputError:
    """An OutputError for a failed write under `out_dir`, saying in one line what filled up or was refused."""
    where = f" ({Path(err.filename).name})" if getattr(err, "filename", None) else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"the disk that holds {Path(out_dir).parent} is full"
        todo = "free space there or choose another output folder"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"no permission to write in {Path(out_dir).parent}"
        todo = "choose a folder you can write to"
    else:
        what = err.strerror or str(err)
        todo = "check the output folder"
    return OutputError(f"writing {out_dir}: {what}{where}; {todo}. Nothing was written")


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out_dir`; on success it replaces `out_dir` (replace_output_dir), on
    any exception (KeyboardInterrupt included) it is deleted and `out_dir` is left as it was. A failed write
    (disk full, permissions) is raised as OutputError naming the folder."""
    out_dir = Path(out_dir)
    tmp = temp_sibling(out_dir)
    try:
        yield tmp
        replace_output_dir(tmp, out_dir)
    except NibbloraError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(out_dir, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError
