"""CPU threads for torch: `train.threads` in the trainer, and the same helper for every tool that runs torch.

    from nibblora.threads import apply_threads
    apply_threads(0)    # auto: OMP_NUM_THREADS if set, else this process's share of the CPUs idle now
    apply_threads(4)    # exactly 4

Why: torch's default is one thread per core, which oversubscribes a machine whose cores are shared (with other
jobs, or with the other ranks of a CPU torchrun job); on a shared 2-core machine an identical forward + backward
then took 3.5 to 38 s, against a steady ~5 s with one thread (issue 13, #19), and 3.1 to 7.0 s (median 4.4)
against 0.86 to 1.09 s (median 0.91) in our own measurement. See docs/training.md.
"""

from __future__ import annotations

import argparse
import os


def default_threads() -> int:
    """OMP_NUM_THREADS when it is set to a positive integer; else the CPUs this process may run on less the
    ones busy now (the 1-minute load average), divided among the processes torchrun started on this machine
    (LOCAL_WORLD_SIZE); at least 1. An idle 16-core machine gives 16, a 2-core machine another job keeps busy 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        busy = 0
    local_world = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    share = int(local_world) if local_world.isdigit() and int(local_world) > 0 else 1
    return max(1, min(cpus, cpus - busy) // share)


def apply_threads(threads: int = 0) -> int:
    """Set torch's intra-op CPU threads: `threads` > 0 exactly, 0 the default above. Returns the number set."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be 0 (auto) or a positive integer, got {threads!r}")
    import torch  # here: the CLIs add --threads before torch is loaded

    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads N` for a tool that runs torch on the CPU (0, the default: as `default_threads`)."""
    parser.add_argument(
        "--threads",
        type=_thread_count,
        default=0,
        metavar="N",
        help="CPU threads for torch (default 0: OMP_NUM_THREADS if set, else the idle CPUs); "
        "on a shared machine fewer threads are often faster",
    )


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (auto) or a positive integer, got {text!r}")
    return value
