"""`compare_methods`: train every method on the demo's tiny base and tasks, measure each, write the table.

    summary = compare_methods("build/compare", quick=True)
    summary.report["rows"], summary.report["claims"]; print(summary.format())

Phase 1 trains each method at each of its learning rates (nibblora.compare.plan) and keeps, per method, the run
with the lowest validation task loss. Phase 2 trains, at those rates, LoRA at every rank of the sweep and full
fine-tuning with each forgetting mitigation. Every run records itself in <out>/runs/<run>/runs.sqlite (watch them
with `qlora-tui <out>/runs`). Then each row's inference speed is timed, the calculator's figures added, the
claims judged, and compare.json, compare.md and compare.png written to <out>.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nibblora.compare import estimates
from nibblora.compare.claims import judge_claims
from nibblora.compare.inference import measure_inference
from nibblora.compare.jobs import Progress, train_runs
from nibblora.compare.plan import LORA_RECIPE, Plan, RunSpec
from nibblora.compare.plot import plot_report
from nibblora.compare.report import console_table, write_json, write_markdown
from nibblora.compare.runner import artifact_bytes
from nibblora.compare.workspace import Workspace, prepare_workspace
from nibblora.errors import ExportError
from nibblora.threads import apply_threads, default_threads

# What the trainer's MemoryMeter reports on a CPU (nibblora/memory/measure.py).
MEMORY_METHOD = "peak bytes in live malloc allocations, sampled every 2 ms, from before the model loads"

NOTES = """\
- Exact match is scored by free greedy generation (up to `<|im_end|>`, 16 tokens at most) on test prompts none of
  which is in the training or validation split (except the 100-prompt addition table, which any training set of
  this size holds). Its 95% sampling noise is about +-{noise:.0f} points for a method near 50%.
- The learning rate of every row comes from validation task loss, not from the test exact match reported.
- Rank sweep: LoRA with alpha = 2 r (scaling 2 at every rank), at the lora row's learning rate; r 16 is the lora row.
- Mitigations: full fine-tuning at its own best learning rate, plus `data.general_fraction` (that share of every
  step's rows is replayed pretraining text, so fewer task rows are seen), `train.l2sp` or `train.ewc` (EWC's Fisher
  estimated on the same pretraining text, normalized to mean 1).
- Memory: the measured peak is the trainer's own meter (on a CPU: malloc's live bytes, sampled every 2 ms, from
  before the model is loaded). The calculator's 7B figure uses `nibblora.memory`: exact for full / LoRA / QLoRA's
  components; for DoRA, IA3, prompt, prefix and adapters the trainable parameters and their optimizer states are
  exact and the activations approximated (python/nibblora/memory/methods.py). Calculator on the tiny base, as
  trained, against the measured peak: {tiny_check}.
- Inference: tokens per CPU-second of greedy generation ({prompts} prompts x {new_tokens} new tokens, KV cache,
  {threads} thread(s)) in this process's CPU time, over {rounds} interleaved rounds; each slowdown is the median of
  the per-round ratios to the base timed in the same round, the noise an A/A comparison (the base timed twice).
  On a 1.1 M-parameter model per-layer overhead dominates, so these are per-step overheads, not a 7B GPU's."""


@dataclass
class CompareSummary:
    out: Path
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    def format(self) -> str:
        claims = "\n".join(f"  {c['verdict']:<14} {c['claim']}: {c['evidence']}" for c in self.report["claims"])
        written = ", ".join(str(p) for p in self.files.values())
        minutes = self.report["timing"]["total_seconds"] / 60
        return (
            f"\n{console_table(self.report['rows'])}\n\nclaims:\n{claims}\n\n"
            f"{self.report['settings']['runs']} runs in {minutes:.1f} min; wrote {written}; "
            f"run stores under {self.out / 'runs'} (qlora-tui {self.out / 'runs'})"
        )


def best_by_task_loss(outcomes: list[dict]) -> dict[str, dict]:
    """Per method, the phase-1 outcome with the lowest validation task loss (non-finite losses never win)."""
    best: dict[str, dict] = {}
    for o in outcomes:
        loss = o["task_loss"]
        if not math.isfinite(loss):
            continue
        if o["method"] not in best or loss < best[o["method"]]["task_loss"]:
            best[o["method"]] = o
    return best


def build_row(
    name: str, group: str, spec: RunSpec, outcome: dict, ws: Workspace, plan: Plan, scratch: Path
) -> dict[str, Any]:
    """One table row: the run's outcome, its inference timing and the calculator's figures."""
    timing = measure_inference(spec, ws, Path(outcome["weights_dir"]), scratch, plan.timing_rounds)
    as_trained = outcome["estimated_memory_bytes"] or estimates.as_trained_bytes(
        spec, ws.base_config, plan.batch_size, ws.longest_train_row
    )
    return {
        "name": name,
        "group": group,
        "method": spec.method,
        "mode": spec.mode,
        "lr": spec.lr,
        "trainable_params": outcome["trainable_params"],
        "trainable_pct": 100 * outcome["trainable_params"] / ws.base_params,
        "peak_memory_bytes": outcome["peak_memory_bytes"],
        "estimated_memory_bytes": as_trained,
        "memory_7b_bytes": estimates.seven_b_bytes(spec),
        "artifact_bytes": artifact_bytes(Path(outcome["weights_dir"])),
        "base_tokens_per_s": timing["base_tokens_per_s"],
        "inference": timing["variants"],
        "inference_note": timing["note"],
        "exact_match": outcome["exact_match"],
        "test_rows": outcome["test_rows"],
        "task_loss": outcome["task_loss"],
        "quality_vs_full": None,  # filled once the full row is known
        "general_loss_before": outcome["general_loss_before"],
        "general_loss_after": outcome["general_loss_after"],
        "forgetting": outcome["forgetting"],
        "train_seconds": outcome["train_seconds"],
        "run_id": outcome["run_id"],
        "run_dir": outcome["run_dir"],
    }


def compare_methods(
    out: str | Path = "build/compare",
    *,
    quick: bool = False,
    base: str | Path | None = None,
    pretrain_steps: int = 1200,
    test_rows: int = 300,
    plan: Plan | None = None,
    reuse: bool = True,
    threads: int = 0,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> CompareSummary:
    """Train and measure every method (see the module docstring); returns the summary and writes compare.json,
    compare.md and compare.png into `out`.

    quick: Plan.quick() (fewer steps, rates and sweep points) instead of Plan.full(); `plan` overrides both.
    base: a tiny base nibblora.demo pretrained (default: out/base or build/demo/base when valid, else pretrain
    one for `pretrain_steps` steps). test_rows: held-out prompts scored by generation. reuse: keep the outcome of
    a run whose folder already holds one for the same config (a rerun after an interruption continues).
    threads: torch CPU threads for every run and timing (0: nibblora.threads' default divided by jobs, resolved
    once). jobs: runs trained at once, each in its own process (nibblora.compare.jobs).
    Raises ExportError for a bad --base or a missing matplotlib, the trainer's errors for a failed run, and
    KeyboardInterrupt when a run was stopped (SIGTERM, Ctrl-C): finished runs are kept for the next call."""
    start, load_before = time.perf_counter(), _load_average()
    out = Path(out)
    plan = plan or (Plan.quick() if quick else Plan.full())
    if test_rows < 1:
        raise ExportError(f"test_rows must be >= 1, got {test_rows}")
    if jobs < 1:
        raise ExportError(f"jobs must be >= 1, got {jobs}")
    # Every run (and the inference timing) uses the same thread count, so their speeds compare; parallel runs
    # share the default between them.
    threads = apply_threads(threads or max(1, default_threads() // jobs))
    out.mkdir(parents=True, exist_ok=True)
    runs_dir, scratch = out / "runs", out / "scratch"
    scratch.mkdir(exist_ok=True)
    ws = prepare_workspace(out, Path(base) if base is not None else None, pretrain_steps, test_rows, log)
    progress = Progress(plan.run_count(), log)
    batch = dict(threads=threads, reuse=reuse, jobs=jobs, progress=progress)
    sweep = plan.sweep()
    specs = {s.run_id: s for s in sweep}
    phase1, _ = train_runs(sweep, plan, ws, runs_dir, **batch)  # only mitigations are ever skipped
    best = best_by_task_loss(phase1)
    if "full" in plan.methods and "full" not in best:
        raise ExportError("full fine-tuning failed at every learning rate; nothing to compare against")
    follow = plan.follow_ups({m: o["lr"] for m, o in best.items()})
    specs.update({s.run_id: s for s in follow})
    phase2, skipped = train_runs(follow, plan, ws, runs_dir, **batch)
    train_seconds = time.perf_counter() - start

    log(f"timing inference and adding the calculator's figures ({progress.elapsed()} elapsed)")
    row_of = lambda name, group, o: build_row(name, group, specs[o["run_id"]], o, ws, plan, scratch)  # noqa: E731
    rows = [row_of(method, "method", best[method]) for method in plan.methods if method in best]
    by_rank = {o["config"]["lora"]["r"]: o for o in phase2 if o["group"] == "rank"}
    for r in sorted(by_rank | ({LORA_RECIPE["r"]: None} if "lora" in best else {})):
        if r == LORA_RECIPE["r"]:  # the lora row itself, measured once
            rows.append({**next(row for row in rows if row["name"] == "lora"), "name": f"lora r{r}", "group": "rank"})
        else:
            rows.append(row_of(f"lora r{r}", "rank", by_rank[r]))
    rows += [row_of(o["row"], "mitigation", o) for o in phase2 if o["group"] == "mitigation"]
    full_em = best["full"]["exact_match"] if "full" in best else None
    for row in rows:
        row["quality_vs_full"] = row["exact_match"] / full_em if full_em else None
    verdicts = judge_claims({r["name"]: r for r in rows if r["group"] == "method"})

    total = time.perf_counter() - start
    report: dict[str, Any] = {
        "settings": {
            "quick": quick,
            "steps": plan.steps,
            "batch_size": plan.batch_size,
            "lr_count": plan.lr_count,
            "methods": list(plan.methods),
            "ranks": list(plan.ranks),
            "mitigations": list(plan.mitigations),
            "runs": len(phase1) + len(phase2),
            "device": "cpu",
            "threads": threads,
            "jobs": jobs,
            "timing_rounds": plan.timing_rounds,
            "base_dir": str(ws.base_dir),
            "base_params": ws.base_params,
            "test_rows": len(ws.test_examples),
            "base_exact_match": ws.base_exact_match["dense"],
            "general_loss_before": ws.general_before["dense"],
            "general_loss_before_nf4": ws.general_before["nf4"],
            "memory_method": MEMORY_METHOD,
        },
        # The machine's 1-minute load average at the start and the end: other work slows every run alike.
        "timing": {
            "train_seconds": train_seconds,
            # Each run's own training time, summed; runs reused from an earlier invocation keep theirs.
            "runs_train_seconds": sum(o["train_seconds"] for o in (*phase1, *phase2)),
            "runs_reused": sum(bool(o.get("reused")) for o in (*phase1, *phase2)),
            "total_seconds": total,
            "load_average": [load_before, _load_average()],
        },
        "rows": rows,
        "lr_sweep": [
            {
                "method": o["method"],
                "lr": o["lr"],
                "task_loss": o["task_loss"],
                "exact_match": o["exact_match"],
                "forgetting": o["forgetting"],
                "chosen": best.get(o["method"], {}).get("run_id") == o["run_id"],
                "run_id": o["run_id"],
            }
            for o in phase1
        ],
        "claims": [v.to_dict() for v in verdicts],
        "skipped": skipped,
        "curves": {o["run_id"]: o["curves"] for o in (*phase1, *phase2)},
    }
    report["notes"] = notes(report, rows)
    files = {
        "json": write_json(report, out / "compare.json"),
        "markdown": write_markdown(report, out / "compare.md"),
        "png": plot_report(report, out / "compare.png"),
    }
    return CompareSummary(out, report, files)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def notes(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from nibblora.compare.claims import noise_points
    from nibblora.compare.inference import NEW_TOKENS, PROMPTS

    n = report["settings"]["test_rows"]
    tiny = ", ".join(
        f"{r['name']} {r['estimated_memory_bytes'] / r['peak_memory_bytes']:.2f}x"
        for r in rows
        if r["group"] == "method" and r["peak_memory_bytes"] > 0
    )
    return NOTES.format(
        noise=noise_points(0.5, 0.5, n, n),
        tiny_check=tiny,
        prompts=PROMPTS,
        new_tokens=NEW_TOKENS,
        rounds=report["settings"]["timing_rounds"],
        threads=report["settings"]["threads"],
    )
