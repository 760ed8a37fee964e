"""The training loop: explicit code you can read and change (torchtune's "no training framework").

    result = train(load_config("qlora.toml"))

One optimizer step:
    rows     = the step's micro-batches (a pure function of seed and step; see nibblora.train.data)
    n_tokens = supervised tokens (labels != -100 after the shift) over ALL micro-batches and ranks
    for each micro-batch: loss_sum = CE summed over its tokens; backward(loss_sum / n_tokens)
    clip, AdamW step, scheduler step
so the loss is the mean over every supervised token of the step, however the tokens fall into micro-batches,
devices and padding. A micro-batch with many supervised tokens weighs more than one with few, as it should.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nibblora.lora import inject_lora
from nibblora.memory import MemoryMeter, estimate_memory
from nibblora.models import load_model
from nibblora.runs import RunWriter
from nibblora.train.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    save_weights,
)
from nibblora.train.config import TrainConfig
from nibblora.train.data import (
    IGNORE_INDEX,
    TokenizedDataset,
    eval_batches,
    open_dataset,
    pad_collate,
    step_micro_batches,
)
from nibblora.train.distributed import DistInfo, all_reduce_sum, any_rank, init_distributed, shutdown
from nibblora.train.optim import PagedOptimizerStates, build_optimizer, build_scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    output_dir: Path
    status: str  # finished | stopped
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # this process's steps only (after a resume: from there)
    eval: dict[str, float] = field(default_factory=dict)  # last eval metrics
    trainable_params: int = 0
    peak_memory_bytes: int = 0
    estimated_memory_bytes: int = 0
    tokens_per_s: float = 0.0
    weights_dir: Path | None = None  # output_dir/adapter or output_dir/model


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over supervised positions, number of them).

    logits [batch, seq, vocab] predict the token after each position, so they meet labels shifted by one.
    The loss is taken in float32 whatever the logits' dtype.
    """
    shifted = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (shifted != IGNORE_INDEX).sum()


def build_model(config: TrainConfig, device: torch.device) -> tuple[nn.Module, int]:
    """The model to train (full: every parameter; lora / qlora: adapters injected, the base frozen).
    Returns (model, trainable parameter count)."""
    mode = config.train.mode
    dtype = DTYPES[config.model.dtype]
    quantize = config.model.quant_type if mode == "qlora" else None
    model = load_model(config.model.path, dtype=dtype, quantize=quantize, device=device,
                       double_quant=config.model.double_quant,
                       gradient_checkpointing=config.model.gradient_checkpointing)
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        targets = config.lora.target_modules
        inject_lora(model, targets if isinstance(targets, str) else list(targets), r=config.lora.r,
                    alpha=config.lora.alpha, dropout=config.lora.dropout, rslora=config.lora.rslora)
    model.train()
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Logger:
    """Log lines to stderr and to the run store (rank 0 only)."""

    def __init__(self, writer: RunWriter | None, quiet: bool):
        self.writer, self.quiet = writer, quiet

    def __call__(self, message: str, level: str = "info") -> None:
        if self.writer is None:
            return
        if not self.quiet:
            print(f"nibblora.train: {message}", flush=True)
        self.writer.log(message, level)


class _StopSignal:
    """SIGTERM / SIGINT ask for a graceful stop (checkpoint, then exit); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

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


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TokenizedDataset, batch_size: int, max_batches: int, pad_token_id: int,
             info: DistInfo, autocast) -> tuple[float, int]:
    """(mean next-token loss over the set's supervised tokens, their number), over all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    count = torch.zeros((), dtype=torch.int64, device=info.device)
    for indices in eval_batches(dataset, batch_size, max_batches, info.rank, info.world_size):
        batch = {k: v.to(info.device) for k, v in pad_collate([dataset[i] for i in indices], pad_token_id).items()}
        with autocast():
            logits = model(batch["input_ids"], position_ids=batch.get("position_ids"))
        loss_sum, n = token_loss_sum(logits, batch["labels"])
        total += loss_sum.double()
        count += n
    model.train(was_training)
    total, count = all_reduce_sum(total, info), all_reduce_sum(count, info)
    return (total / count.clamp(min=1)).item(), int(count.item())


def train(config: TrainConfig, train_dataset: TokenizedDataset | None = None,
          eval_datasets: dict[str, TokenizedDataset] | None = None, *, quiet: bool = False) -> TrainResult:
    """Fine-tune as `config` says; datasets given here replace data.train / data.eval. Resumes from the newest
    checkpoint in output_dir when checkpoint.resume is on. Run under torchrun for DDP."""
    info = init_distributed(config.train.device)
    output_dir = Path(config.output_dir)
    writer = None
    if info.is_main:
        run_name = config.run_name or output_dir.name
        writer = RunWriter.open(output_dir, run_id=run_name, name=run_name, config=config.to_dict(),
                                total_steps=config.train.max_steps)
    log = _Logger(writer, quiet)
    step = 0
    try:
        with _StopSignal() as stop_signal:
            result = _train(config, train_dataset, eval_datasets, info, writer, log, stop_signal)
            step = result.step
        if writer is not None:
            writer.finish(result.status, f"{result.status} at step {result.step}", result.step)
        return result
    except BaseException as err:
        if writer is not None:
            status = "stopped" if isinstance(err, KeyboardInterrupt) else "failed"
            writer.finish(status, f"{type(err).__name__}: {err}", step)
        raise
    finally:
        shutdown(info)


def _train(config: TrainConfig, train_dataset, eval_datasets, info: DistInfo, writer: RunWriter | None, log,
           stop_signal: _StopSignal) -> TrainResult:
    tc, device = config.train, info.device
    output_dir = Path(config.output_dir)
    if info.is_main:
        remove_partial_checkpoints(output_dir)
    if device.type == "cpu" and config.model.dtype == "float16":
        raise ValueError("model.dtype float16 needs CUDA; on a CPU use float32 or bfloat16")
    if train_dataset is None:
        train_dataset = open_dataset(config.data.train, config.data.max_length)
    if eval_datasets is None:
        eval_datasets = {name: open_dataset(path, config.data.max_length) for name, path in config.data.eval.items()}
    if len(train_dataset) == 0:
        raise ValueError("the training set is empty")

    meter = MemoryMeter(device)
    torch.manual_seed(tc.seed)  # the same adapter init on every rank
    model, trainable = build_model(config, device)
    log(f"{tc.mode} on {device} (world size {info.world_size}): {trainable:,} trainable parameters")
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.betas[0], tc.betas[1]), tc.eps)
    warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * tc.max_steps)
    scheduler = build_scheduler(optimizer, tc.max_steps, warmup, tc.schedule, tc.min_lr_ratio)
    paged = PagedOptimizerStates(optimizer, device)
    if tc.paged_optimizer and not paged.active:
        log("paged_optimizer has no effect on a CPU: the optimizer states already live in host memory")
    paged.active = paged.active and tc.paged_optimizer
    use_cuda_amp = device.type == "cuda" and config.model.dtype != "float32"
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.model.dtype == "float16")

    def autocast():
        if use_cuda_amp:
            return torch.autocast("cuda", dtype=DTYPES[config.model.dtype])
        return contextlib.nullcontext()

    start_step = 0
    resume_from = latest_checkpoint(output_dir) if config.checkpoint.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, tc.mode, info)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        log(f"resumed from {resume_from} at step {start_step}")
        if writer is not None:
            writer.event("resumed", f"resumed from step {start_step}", start_step, {"checkpoint": str(resume_from)})
    elif writer is not None:
        writer.event("started", f"{tc.mode} training started", 0)

    train_model: nn.Module = model
    if info.enabled:
        # Every rank built the same model from the same seed, so nothing needs broadcasting. broadcast_buffers is
        # deprecated in favour of forward_sync_buffers, which still syncs at init; we want no sync at all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)

    result = TrainResult(output_dir, "finished", start_step, trainable_params=trainable)
    longest_seen = 0
    estimate_args = dict(r=config.lora.r, target_modules=config.lora.target_modules, dtype=config.model.dtype,
                         gradient_checkpointing=config.model.gradient_checkpointing, mixed_precision=False,
                         paged_optimizer=paged.active, double_quant=config.model.double_quant)
    eval_every = config.eval.every
    eval_batch = config.eval.batch_size or config.data.batch_size
    step = start_step
    while step < tc.max_steps:
        if any_rank(stop_signal.requested or (writer is not None and writer.stop_requested()), info):
            result.status = "stopped"
            break
        t0 = time.perf_counter()
        micro = step_micro_batches(train_dataset, step, config.data.batch_size, tc.grad_accum, info.world_size,
                                   info.rank, tc.seed)
        batches = [pad_collate([train_dataset[i] for i in idx], config.data.pad_token_id) for idx in micro]
        n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_tokens = int(all_reduce_sum(torch.tensor(n_local, device=device), info).item())
        tokens_local = sum(int((b["input_ids"] != config.data.pad_token_id).sum()) for b in batches)
        longest_seen = max([longest_seen] + [b["input_ids"].shape[1] for b in batches])
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for j, cpu_batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            last = j == len(batches) - 1
            # DDP all-reduces gradients on the last micro-batch only; it averages over ranks, hence * world_size.
            sync = train_model.no_sync() if info.enabled and not last else contextlib.nullcontext()
            with sync:
                with autocast():
                    logits = train_model(batch["input_ids"], position_ids=batch.get("position_ids"))
                loss_sum, _ = token_loss_sum(logits, batch["labels"])
                scaler.scale(loss_sum * info.world_size / max(n_tokens, 1)).backward()
            loss_total += loss_sum.detach().double()
            del logits, loss_sum
        scaler.unscale_(optimizer)
        max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, max_norm)
        lr = scheduler.get_last_lr()[0]
        if paged.active:
            paged.page_in()
        scaler.step(optimizer)
        if paged.active:
            paged.page_out()
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss = (all_reduce_sum(loss_total, info) / max(n_tokens, 1)).item()
        tokens = int(all_reduce_sum(torch.tensor(tokens_local, device=device), info).item())
        seconds = time.perf_counter() - t0
        result.losses[step] = loss
        result.step = step
        metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / seconds,
                   "supervised_tokens": n_tokens, **meter.read()}
        estimate = estimate_memory(model.config, tc.mode, batch_size=config.data.batch_size, seq_len=longest_seen,
                                   **estimate_args)
        metrics["mem_estimate_bytes"] = estimate.total_bytes
        result.peak_memory_bytes = max(result.peak_memory_bytes, metrics["mem_peak_bytes"])
        result.estimated_memory_bytes = estimate.total_bytes
        result.tokens_per_s = metrics["tokens_per_s"]
        final_step = step == tc.max_steps
        if eval_datasets and ((eval_every and step % eval_every == 0) or final_step):
            for name, dataset in eval_datasets.items():
                eval_loss, eval_tokens = evaluate(model, dataset, eval_batch, config.eval.max_batches,
                                                  config.data.pad_token_id, info, autocast)
                metrics[f"eval_{name}_loss"] = eval_loss
                metrics[f"eval_{name}_tokens"] = eval_tokens
                result.eval[f"eval_{name}_loss"] = eval_loss
        if writer is not None:
            writer.log_metrics(step, metrics)
            if step % tc.log_every == 0 or final_step:
                evals = "".join(f" {k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_") and k.endswith("_loss"))
                log(f"step {step}/{tc.max_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {float(grad_norm):.3f} "
                    f"{metrics['tokens_per_s']:.0f} tok/s{evals}")
        every = config.checkpoint.every
        if (every and step % every == 0) or final_step:
            _checkpoint(config, step, model, optimizer, scheduler, scaler, info, writer)

    if result.status == "stopped":
        _checkpoint(config, step, model, optimizer, scheduler, scaler, info, writer)
        log(f"stopped at step {step} on request; checkpoint written, resume by running the same command")
    if info.is_main:
        result.weights_dir = _export_weights(config, model)
    return result


def _checkpoint(config, step, model, optimizer, scheduler, scaler, info, writer) -> None:
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "world_size": info.world_size}
    path = save_checkpoint(Path(config.output_dir), step, model, state, config.train.mode, config.model.path, info,
                           config.checkpoint.keep_last)
    if writer is not None:
        writer.event("checkpoint", f"checkpoint at step {step}", step, {"path": str(path)})


def _export_weights(config: TrainConfig, model: nn.Module) -> Path:
    """The final weights at output_dir/adapter (LoRA, QLoRA) or output_dir/model (full), replaced atomically."""
    from nibblora.outdir import move_into_place

    output_dir = Path(config.output_dir)
    name = "model" if config.train.mode == "full" else "adapter"
    tmp = output_dir / f".tmp-{name}"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp, config.train.mode, config.model.path)
    source = tmp / "adapter" if config.train.mode != "full" else tmp
    final = output_dir / name
    move_into_place(source, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final
