"""One trainer per output folder: an advisory lock (fcntl.flock) on <output_dir>/trainer.lock, held for the run's
life, with the holder's pid written in the file.

    with lock_run_folder(output_dir):
        ...  # train

flock locks belong to the open file: the kernel releases them when the process ends, however it ends (kill -9
included), so a stale lock never blocks the next run. The file itself stays; its content is only informative.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nibblora.errors import InputError

LOCK_NAME = "trainer.lock"


class OutputDirInUseError(InputError):
    """Another process holds the output folder's lock; the message names its pid."""


@contextmanager
def lock_run_folder(output_dir: str | Path) -> Iterator[Path]:
    """Hold the output folder's lock for the `with` block; OutputDirInUseError (one line naming the other
    trainer's pid) when another process holds it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            holder = holder or "unknown: it has not written it yet"
            raise OutputDirInUseError(
                f"output_dir {output_dir} is in use by another trainer (pid {holder}); wait for it to finish, stop "
                "it (nibblora.runs.request_stop), or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
