"""The run store: every training run records itself in `<output_dir>/runs.sqlite` (SQLite, WAL mode).

    from nibblora.runs import open_run, list_runs, request_stop
    with open_run("out/my-run") as store:
        info = store.run()                      # RunInfo: status ('failed' if its process died), config, ...
        losses = store.metric("loss")           # [(step, value)]
        store.metrics(since_step=100)           # {step: {name: value}}
        store.events(), store.logs()
    request_stop("out/my-run")                  # the trainer checkpoints, then exits as 'stopped'
    scan = scan_runs("out")                     # .runs, and .unreadable: damaged stores with the reason

A damaged runs.sqlite raises RunStoreError (an InputError) naming the file and saying what is wrong with it.

Metric names are stable and flat: loss, lr, grad_norm, tokens_per_s, mem_allocated_bytes, mem_reserved_bytes,
mem_peak_bytes, mem_estimate_bytes, penalty (L2-SP / EWC runs), eval_<set>_loss, eval_<set>_tokens,
eval_<set>_exact_match.
"""

from nibblora.runs.read import (
    UNREADABLE,
    RunInfo,
    RunScan,
    RunStore,
    RunStoreError,
    UnreadableStore,
    effective_status,
    list_runs,
    open_run,
    request_stop,
    scan_runs,
)
from nibblora.runs.store import DB_NAME, STATUSES, RunWriter

__all__ = [
    "DB_NAME",
    "STATUSES",
    "UNREADABLE",
    "RunInfo",
    "RunScan",
    "RunStore",
    "RunStoreError",
    "RunWriter",
    "UnreadableStore",
    "effective_status",
    "list_runs",
    "open_run",
    "request_stop",
    "scan_runs",
]
