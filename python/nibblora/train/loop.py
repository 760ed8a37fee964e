"""The training loop: explicit code you can read and change (torchtune's "no training framework").

    result = train(load_config("qlora.toml"))

train() holds the run folder's lock and the run store, builds everything once (nibblora.train.setup), then
steps (nibblora.train.step): log, evaluate, checkpoint, until max_steps or a stop request; the final weights go
to <output_dir>/adapter (or /model) through the same atomic-output helper the tools use.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibblora.checkpoint import atomic_output_dir
from nibblora.errors import NibbloraError
from nibblora.memory import estimate_memory
from nibblora.runs import RunWriter
from nibblora.train.checkpointing import (
    latest_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    save_weights,
)
from nibblora.train.config import TrainConfig
from nibblora.train.data import TokenizedDataset
from nibblora.train.distributed import DistInfo, any_rank, init_distributed, shutdown
from nibblora.train.lock import lock_run_folder
from nibblora.train.setup import TrainingSetup, build_model, setup_training
from nibblora.train.step import StepOutput, evaluate, token_loss_sum, train_step

ESTIMATED_MODES = ("full", "lora", "qlora")

__all__ = ["NonFiniteLossError", "TrainResult", "build_model", "evaluate", "token_loss_sum", "train"]


class NonFiniteLossError(NibbloraError):
    """The loss (or gradient norm) became NaN or infinite and train.nan_policy is "stop". The update was not
    applied; the checkpoints written before are kept. The CLI reports it in one line and exits 1."""


@dataclass
class TrainResult:
    output_dir: Path
    status: str  # finished | stopped
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # this process's steps only (after a resume: from there)
    eval: dict[str, float] = field(default_factory=dict)  # last eval_<set>_loss and eval_<set>_exact_match
    trainable_params: int = 0
    peak_memory_bytes: int = 0
    estimated_memory_bytes: int = 0
    tokens_per_s: float = 0.0
    weights_dir: Path | None = None  # output_dir/adapter or output_dir/model
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was skipped (nan_policy "skip")


class _Logger:
    """Log lines to the run store and the console (rank 0 only): info on stdout unless quiet, warnings and
    errors on stderr always."""

    def __init__(self, writer: RunWriter | None, quiet: bool):
        self.writer, self.quiet = writer, quiet

    def __call__(self, message: str, level: str = "info") -> None:
        if self.writer is None:
            return
        if level != "info":
            print(f"nibblora.train: {level}: {message}", file=sys.stderr, flush=True)
        elif not self.quiet:
            print(f"nibblora.train: {message}", flush=True)
        self.writer.log(message, level)

    def event(self, kind: str, message: str, step: int | None = None, data: dict | None = None) -> None:
        if self.writer is not None:
            self.writer.event(kind, message, step, data)


class _StopSignal:
    """SIGTERM / SIGINT ask for a graceful stop (checkpoint, then exit); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    config: TrainConfig,
    train_dataset: TokenizedDataset | None = None,
    eval_datasets: dict[str, TokenizedDataset] | None = None,
    *,
    general_dataset: TokenizedDataset | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Fine-tune as `config` says; datasets given here replace data.train / data.eval / data.general. Resumes from
    the newest intact checkpoint in output_dir when checkpoint.resume is on. Run under torchrun for DDP.

    Raises OutputDirInUseError when another trainer holds output_dir, RunStoreError for a damaged runs.sqlite,
    NonFiniteLossError when the loss becomes NaN under train.nan_policy "stop"."""
    info = init_distributed(config.train.device)
    output_dir = Path(config.output_dir)
    try:
        with contextlib.ExitStack() as held:
            writer = None
            if info.is_main:
                held.enter_context(lock_run_folder(output_dir))
                run_name = config.run_name or output_dir.name
                writer = RunWriter.open(
                    output_dir,
                    run_id=run_name,
                    name=run_name,
                    config=config.to_dict(),
                    total_steps=config.train.max_steps,
                )
            return _train_recorded(
                config, train_dataset, eval_datasets, general_dataset, writer, _Logger(writer, quiet), info
            )
    finally:
        shutdown(info)


def _train_recorded(
    config: TrainConfig,
    train_dataset: TokenizedDataset | None,
    eval_datasets: dict[str, TokenizedDataset] | None,
    general_dataset: TokenizedDataset | None,
    writer: RunWriter | None,
    log: _Logger,
    info: DistInfo,
) -> TrainResult:
    """Train, and end the run store's record as finished, stopped or failed whatever happens."""
    result = TrainResult(Path(config.output_dir), "finished", 0)
    try:
        if info.is_main:
            remove_partial_checkpoints(Path(config.output_dir))
            remove_stale_exports(Path(config.output_dir))
        with _StopSignal() as stop_signal:
            setup = setup_training(config, info, log, log.event, train_dataset, eval_datasets, general_dataset)
            result.step, result.trainable_params = setup.start_step, setup.trainable_count
            try:
                run_steps(setup, result, writer, log, stop_signal)
            finally:
                setup.meter.stop()  # its sampler thread polls every 2 ms; left running it slows the process
        if writer is not None:
            writer.finish(result.status, f"{result.status} at step {result.step}", result.step)
        return result
    except BaseException as err:
        if writer is not None:
            status = "stopped" if isinstance(err, KeyboardInterrupt) else "failed"
            message = str(err) if isinstance(err, NibbloraError) else f"{type(err).__name__}: {err}"
            writer.finish(status, message, result.step)
        raise


def run_steps(
    setup: TrainingSetup, result: TrainResult, writer: RunWriter | None, log: _Logger, stop_signal: _StopSignal
) -> None:
    """The step loop, from setup.start_step to train.max_steps (or a stop request), filling `result` as it goes;
    then the final export."""
    config, info, tc = setup.config, setup.info, setup.config.train
    longest_seen = 0
    step = setup.start_step
    while step < tc.max_steps:
        if any_rank(stop_signal.requested or (writer is not None and writer.stop_requested()), info):
            result.status = "stopped"
            break
        t0 = time.perf_counter()
        out = train_step(setup, step, skip_non_finite=tc.nan_policy == "skip")
        step += 1
        longest_seen = max(longest_seen, out.longest)
        metrics = _step_metrics(setup, out, time.perf_counter() - t0, longest_seen)
        result.losses[step] = out.loss
        result.step = step
        result.peak_memory_bytes = max(result.peak_memory_bytes, metrics["mem_peak_bytes"])
        result.estimated_memory_bytes = int(metrics.get("mem_estimate_bytes", 0))  # 0: no estimate for the mode
        result.tokens_per_s = metrics["tokens_per_s"]
        if not out.applied:
            _non_finite(setup, out, step, metrics, writer, log, result)  # raises under nan_policy "stop"
        final_step = step == tc.max_steps
        if setup.eval_datasets and ((config.eval.every and step % config.eval.every == 0) or final_step):
            metrics.update(run_evals(setup))
            result.eval.update(
                {k: v for k, v in metrics.items() if k.startswith("eval_") and not k.endswith("_tokens")}
            )
        if writer is not None:
            writer.log_metrics(step, metrics)
            if step % tc.log_every == 0 or final_step:
                log(_step_line(step, tc.max_steps, out, metrics))
        every = config.checkpoint.every
        if (every and step % every == 0) or final_step:
            write_checkpoint(setup, step, writer)

    if result.status == "stopped":
        write_checkpoint(setup, step, writer)
        log(f"stopped at step {step} on request; checkpoint written, resume by running the same command")
    if info.is_main:
        result.weights_dir = export_weights(config, setup.model)


def _step_metrics(setup: TrainingSetup, out: StepOutput, seconds: float, longest_seen: int) -> dict[str, float]:
    config = setup.config
    metrics: dict[str, float] = {
        "loss": out.loss,
        "lr": out.lr,
        "grad_norm": out.grad_norm,
        "tokens_per_s": out.tokens / seconds,
        "supervised_tokens": out.supervised_tokens,
        **setup.meter.read(),
    }
    if setup.anchor is not None:
        metrics["penalty"] = out.penalty
    if config.train.mode not in ESTIMATED_MODES:
        return metrics  # the memory calculator models full, LoRA and QLoRA only
    estimate = estimate_memory(
        setup.model.config,
        config.train.mode,
        batch_size=config.data.batch_size,
        seq_len=longest_seen,
        r=config.lora.r,
        target_modules=config.lora.target_modules,
        dtype=config.model.dtype,
        gradient_checkpointing=config.model.gradient_checkpointing,
        keep_mlp_layers=config.model.keep_mlp_layers,
        offload_activations=config.model.offload_activations,
        document_mask=setup.packed and config.data.packed_attention == "document",
        loss_chunk_tokens=config.model.loss_chunk_tokens or None,
        mixed_precision=False,
        paged_optimizer=setup.paged.active,
        double_quant=config.model.double_quant,
        device="cuda" if setup.info.device.type == "cuda" else "cpu",
    )
    # The L2-SP / EWC copies (w0, F) are not in the calculator's model of a run; they are known exactly.
    metrics["mem_estimate_bytes"] = estimate.total_bytes + (setup.anchor.bytes if setup.anchor is not None else 0)
    return metrics


def _step_line(step: int, max_steps: int, out: StepOutput, metrics: dict[str, float]) -> str:
    evals = "".join(
        f" {k} {v:.4f}" if k.endswith("_loss") else f" {k} {v:.1%}"
        for k, v in metrics.items()
        if k.startswith("eval_") and k.endswith(("_loss", "_exact_match"))
    )
    return (
        f"step {step}/{max_steps} loss {out.loss:.4f} lr {out.lr:.2e} grad_norm {out.grad_norm:.3f} "
        f"{metrics['tokens_per_s']:.0f} tok/s{evals}"
    )


def _non_finite(
    setup: TrainingSetup,
    out: StepOutput,
    step: int,
    metrics: dict[str, float],
    writer: RunWriter | None,
    log: _Logger,
    result: TrainResult,
) -> None:
    """A step whose loss or gradient norm was NaN / inf: recorded, then skipped or the run stopped (nan_policy)."""
    what = (
        f"loss became {_show(out.loss)}"
        if not math.isfinite(out.loss)
        else f"the gradient norm became {_show(out.grad_norm)}"
    )
    if setup.config.train.nan_policy == "skip":
        result.skipped_steps.append(step)
        log(
            f'{what} at step {step}; skipped the step (train.nan_policy = "skip"): the weights are unchanged', "warning"
        )
        log.event("skipped_step", f"{what} at step {step}; update skipped", step, None)
        return
    if writer is not None:
        writer.log_metrics(step, metrics)
    last = latest_checkpoint(setup.config.output_dir)
    kept = f"the last checkpoint, {last.name}, is kept" if last is not None else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"{what} at step {step}; stopped without applying that update ({kept}); lower train.lr, "
        'check the data, or set train.nan_policy = "skip" to skip such steps'
    )


def _show(value: float) -> str:
    return "NaN" if math.isnan(value) else repr(value)


def run_evals(setup: TrainingSetup) -> dict[str, float]:
    """eval_<name>_loss, eval_<name>_tokens and eval_<name>_exact_match (share of rows whose every supervised
    token is the greedy choice) of every eval set."""
    config = setup.config
    batch_size = config.eval.batch_size or config.data.batch_size
    metrics: dict[str, float] = {}
    for name, dataset in setup.eval_datasets.items():
        scores = evaluate(
            setup.model,
            dataset,
            batch_size,
            config.eval.max_batches,
            config.data.pad_token_id,
            setup.info,
            setup.autocast,
        )
        metrics[f"eval_{name}_loss"] = scores.loss
        metrics[f"eval_{name}_tokens"] = scores.tokens
        metrics[f"eval_{name}_exact_match"] = scores.exact_match
    return metrics


def write_checkpoint(setup: TrainingSetup, step: int, writer: RunWriter | None) -> Path:
    """Checkpoint `step`: weights, the trainer state (JSON + safetensors) and every rank's random state."""
    config, info = setup.config, setup.info
    global_batch = config.data.batch_size * config.train.grad_accum * info.world_size
    state = {
        "step": step,
        "world_size": info.world_size,
        "global_batch": global_batch,
        "samples_seen": step * global_batch,
        "seed": config.train.seed,
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "scaler": setup.scaler.state_dict(),
    }
    path = save_checkpoint(
        Path(config.output_dir),
        step,
        setup.model,
        state,
        config.train.mode,
        config.model.path,
        info,
        config.checkpoint.keep_last,
    )
    if writer is not None:
        writer.event("checkpoint", f"checkpoint at step {step}", step, {"path": str(path)})
    return path


def remove_stale_exports(output_dir: Path) -> None:
    """Temp folders of a final export a killed run left behind (only call it while holding the run folder lock)."""
    if not output_dir.is_dir():
        return
    for name in ("adapter", "model"):
        for path in [*output_dir.glob(f".{name}.tmp-*"), output_dir / f".tmp-{name}"]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def export_weights(config: TrainConfig, model: nn.Module) -> Path:
    """The final weights at output_dir/adapter (LoRA, QLoRA) or output_dir/model (full), written through the
    tools' atomic output folder (nibblora.checkpoint.atomic_output_dir): the path holds a complete export or the
    old one, and a write failure is one OutputError naming the folder (the last checkpoint is kept)."""
    final = Path(config.output_dir) / ("model" if config.train.mode == "full" else "adapter")
    with atomic_output_dir(final) as tmp, torch.no_grad():
        save_weights(model, tmp, config.train.mode, config.model.path, for_resume=False)
    return final
