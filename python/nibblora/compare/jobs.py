"""Running a batch of runs, one at a time or several in parallel processes, with a progress line per run.

    progress = Progress(total=34, log=print)
    outcomes, skipped = train_runs(specs, plan, ws, runs_dir, threads=1, reuse=True, jobs=2, progress=progress)

Every run trains in a fresh `spawn`ed process (so its measured memory does not depend on what ran before it in
the same process), `jobs` of them at once, each with `threads` CPU threads: on a machine with more cores than one
small run can use, or a shared one, several single-threaded runs finish sooner than one run at a time. Outcomes
come back in the order of `specs`, whatever order they finish in.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

from nibblora.compare.plan import Plan, RunSpec
from nibblora.compare.runner import run_training, saved_outcome
from nibblora.compare.workspace import Workspace
from nibblora.errors import ConfigError


def elapsed_text(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Progress:
    """Prints "run i/N row lr ...: result (elapsed)" as each run finishes."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.log, self.start = total, 0, log, time.perf_counter()

    def elapsed(self) -> str:
        return elapsed_text(time.perf_counter() - self.start)

    def finished(self, spec: RunSpec, outcome: dict) -> None:
        self.done += 1
        how = "reused" if outcome.get("reused") else f"trained in {outcome['train_seconds']:.0f} s"
        self.log(
            f"run {self.done}/{self.total} {spec.row} lr {spec.lr:.0e}: {how}, validation loss "
            f"{outcome['task_loss']:.4f}, exact match {100 * outcome['exact_match']:.1f}%, forgetting "
            f"{outcome['forgetting']:+.3f} ({self.elapsed()} elapsed)"
        )

    def skipped(self, spec: RunSpec, reason: str) -> None:
        self.done += 1
        self.log(f"run {self.done}/{self.total} {spec.row}: skipped, the trainer refused its config ({reason})")


def _refused_mitigation(spec: RunSpec, err: BaseException) -> bool:
    """A trainer without a mitigation's keys (data.general_fraction, train.l2sp, train.ewc) refuses its config
    before anything trains: that row is left out and reported, not the whole comparison failed."""
    return isinstance(err, ConfigError) and spec.group == "mitigation"


def train_runs(
    specs: Sequence[RunSpec],
    plan: Plan,
    ws: Workspace,
    runs_dir: Path,
    *,
    threads: int,
    reuse: bool,
    jobs: int,
    progress: Progress,
) -> tuple[list[dict], list[dict]]:
    """Train every spec; returns (outcomes in the order of specs, [{"row", "reason"}] of refused mitigations)."""
    outcomes: dict[str, dict] = {}
    skipped: list[dict] = []
    for spec in specs:  # finished runs of the same config are read here, not in a worker that imports torch
        saved = saved_outcome(spec, plan, ws, runs_dir, threads) if reuse else None
        if saved is not None:
            outcomes[spec.run_id] = saved
            progress.finished(spec, saved)
    specs_to_train = [s for s in specs if s.run_id not in outcomes]
    if not specs_to_train:
        return [outcomes[s.run_id] for s in specs], skipped
    progress.log(f"training {len(specs_to_train)} runs, {jobs} at a time ({progress.elapsed()} elapsed)")
    # spawn: no fork of a process whose torch threads already run. One run per process: the trainer's memory meter
    # (and the calculator's "framework" term it is checked against) assume a fresh process; a second run in the
    # same process would find PyTorch's one-time allocations already made and measure less.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(specs_to_train)), mp_context=context, max_tasks_per_child=1) as pool:
        futures: dict[Future, RunSpec] = {
            pool.submit(run_training, spec, plan, ws, runs_dir, threads, False): spec for spec in specs_to_train
        }
        try:
            for future in as_completed(futures):
                spec = futures[future]
                err = future.exception()
                if err is None:
                    outcomes[spec.run_id] = future.result()
                    progress.finished(spec, outcomes[spec.run_id])
                elif _refused_mitigation(spec, err):
                    progress.skipped(spec, str(err))
                    skipped.append({"row": spec.row, "reason": str(err)})
                else:
                    raise err
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [outcomes[s.run_id] for s in specs if s.run_id in outcomes], skipped
