"""One run of the comparison: build its training config, train in this process (nibblora.train.train), then
score what it wrote: exact match on the test split by free greedy generation, the general-text loss after, the
artifact's size, the curves from its run store. The outcome is saved beside the run (outcome.json) so a rerun of
the comparison with the same plan reuses it.

    outcome = run_training(spec, plan, ws, runs_dir)
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibblora.compare.plan import Plan, RunSpec
from nibblora.compare.workspace import Workspace
from nibblora.demo.evaluation import exact_match
from nibblora.models import load_model
from nibblora.runs import open_run
from nibblora.train import config_from_dict, train

OUTCOME_NAME = "outcome.json"
WARMUP_STEPS = 10
CURVES = ("loss", "eval_task_loss", "eval_general_loss")


def four_bit(spec: RunSpec) -> bool:
    return spec.mode == "qlora"


def training_config(spec: RunSpec, plan: Plan, ws: Workspace, run_dir: Path, threads: int) -> dict[str, Any]:
    """The config dict (TOML-shaped) of one run: the shared budget and schedule, then the spec's sections.
    threads: torch CPU threads, the same for every run so their speeds compare."""
    data: dict[str, Any] = {
        "train": str(ws.data["train"]),
        "eval": {"task": str(ws.data["task"]), "general": str(ws.data["general"])},
        "batch_size": plan.batch_size,
        "pad_token_id": ws.pad_id,
    }
    settings = {section: dict(values) for section, values in spec.settings.items()}
    if "general_fraction" in settings.get("data", {}) or settings.get("train", {}).get("ewc"):
        data["general"] = str(ws.data["general_train"])  # replayed rows, and EWC's Fisher estimate
    config: dict[str, Any] = {
        "output_dir": str(run_dir),
        "run_name": spec.run_id,
        "model": {"path": str(ws.base_dir), "dtype": "float32", "gradient_checkpointing": False},
        "data": data,
        "train": {
            "max_steps": plan.steps,
            "lr": spec.lr,
            "warmup_steps": WARMUP_STEPS,
            "grad_accum": 1,
            "max_grad_norm": 1.0,
            "log_every": plan.steps,
            "device": "cpu",
            "seed": 0,
            "threads": threads,
        },
        "eval": {"every": plan.eval_every},
        "checkpoint": {"every": 0, "keep_last": 1, "resume": False},
    }
    for section, values in settings.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def load_trained(spec: RunSpec, ws: Workspace, weights_dir: Path) -> nn.Module:
    """The fine-tuned model from the run's exported folder: the full model, or the base (4-bit for QLoRA) with
    the adapter loaded by nibblora.methods.load_adapter (any method, by its peft_type)."""
    if spec.mode == "full":
        return load_model(weights_dir, torch.float32).eval()
    from nibblora.methods import load_adapter

    model = load_model(ws.base_dir, torch.float32, quantize="nf4" if four_bit(spec) else None)
    load_adapter(model, weights_dir)
    return model.eval()


# The trainer also leaves this copy of every trainable parameter in the exported folder of nibblora.methods' modes
# (it is what a resume reads); loading the adapter does not need it, so it is not part of what is shipped.
RESUME_COPY = "trainable.safetensors"


def artifact_bytes(folder: Path) -> int:
    """Bytes on disk of what a user ships: every file of the exported folder but the trainer's RESUME_COPY."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name != RESUME_COPY)


def read_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    with open_run(run_dir) as store:
        return {name: [[step, value] for step, value in store.metric(name)] for name in CURVES}


def saved_outcome(spec: RunSpec, plan: Plan, ws: Workspace, runs_dir: Path, threads: int) -> dict[str, Any] | None:
    """The outcome a finished run of exactly this config left in its folder (marked "reused"), or None."""
    path = runs_dir / spec.run_id / OUTCOME_NAME
    if not path.is_file():
        return None
    try:
        outcome = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged outcome: train the run again
    config = training_config(spec, plan, ws, runs_dir / spec.run_id, threads)
    if not isinstance(outcome, dict) or outcome.get("config") != config:
        return None
    if outcome.get("test_rows") != len(ws.test_examples):
        return None
    return {**outcome, "reused": True}


def run_training(
    spec: RunSpec, plan: Plan, ws: Workspace, runs_dir: Path, threads: int, reuse: bool = True
) -> dict[str, Any]:
    """Train `spec` into runs_dir/<run_id> (reusing a finished outcome of the same config when `reuse`), score it,
    and return the outcome dict."""
    run_dir = runs_dir / spec.run_id
    config_dict = training_config(spec, plan, ws, run_dir, threads)
    saved = saved_outcome(spec, plan, ws, runs_dir, threads) if reuse else None
    if saved is not None:
        return saved
    shutil.rmtree(run_dir, ignore_errors=True)
    config = config_from_dict(config_dict)
    gc.collect()  # the memory meter measures from before the model loads: old garbage must not be freed inside
    start = time.perf_counter()
    result = train(config, quiet=True)
    seconds = time.perf_counter() - start
    if result.status != "finished":
        # SIGTERM or Ctrl-C: the trainer stopped gracefully (checkpoint written); the comparison stops too, and a
        # rerun retrains this run (its folder holds no outcome.json) and reuses the finished ones.
        raise KeyboardInterrupt(f"{spec.run_id} stopped at step {result.step}")
    weights_dir = result.weights_dir or run_dir / ("model" if spec.mode == "full" else "adapter")
    model = load_trained(spec, ws, weights_dir)
    before = ws.general_before["nf4" if four_bit(spec) else "dense"]
    after = result.eval["eval_general_loss"]
    outcome = {
        "run_id": spec.run_id,
        "row": spec.row,
        "method": spec.method,
        "mode": spec.mode,
        "group": spec.group,
        "lr": spec.lr,
        "config": config_dict,
        "run_dir": str(run_dir),
        "weights_dir": str(weights_dir),
        "status": result.status,
        "steps": result.step,
        "train_seconds": seconds,
        "trainable_params": result.trainable_params,
        "peak_memory_bytes": result.peak_memory_bytes,
        "estimated_memory_bytes": result.estimated_memory_bytes or None,
        "artifact_bytes": artifact_bytes(weights_dir),
        "task_loss": result.eval["eval_task_loss"],
        "task_exact_match_teacher_forced": result.eval.get("eval_task_exact_match"),
        "exact_match": exact_match(model, ws.tokenizer, ws.test_examples),
        "test_rows": len(ws.test_examples),
        "general_loss_before": before,
        "general_loss_after": after,
        "forgetting": after - before,
        "curves": read_curves(run_dir),
        "reused": False,
    }
    (run_dir / OUTCOME_NAME).write_text(json.dumps(outcome, indent=1) + "\n")
    del model
    gc.collect()
    return outcome
