"""Everything the step loop needs, built once: datasets, model, optimizer, schedule, scaler, and the resumed state.

    setup = setup_training(config, info, log)            # resumes from the newest intact checkpoint
    setup.model, setup.optimizer, setup.start_step, ...

Kept apart from the loop (torchtune's recipe shape): this file decides what trains and from where, loop.py only
steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nibblora.dtypes import compute_dtype
from nibblora.errors import CheckpointError, ConfigError
from nibblora.lora import inject_lora
from nibblora.memory import MemoryMeter
from nibblora.models import load_model
from nibblora.threads import apply_threads
from nibblora.train.checkpointing import (
    CHECKPOINTS,
    checkpoint_step,
    find_resume_checkpoint,
    load_checkpoint,
)
from nibblora.train.config import TrainConfig
from nibblora.train.data import MixedRows, TokenizedDataset, open_dataset
from nibblora.train.distributed import DistInfo, broadcast_int
from nibblora.train.forgetting import WeightAnchor, estimate_fisher
from nibblora.train.optim import PagedOptimizerStates, build_optimizer, build_scheduler

# log(message, level) -> None: the run's logger (rank 0 writes; other ranks' calls do nothing).
Log = Callable[..., None]
# event(kind, message, step, data) -> None: an event in the run store (rank 0 only).
Event = Callable[..., None]


@dataclass
class TrainingSetup:
    """The built pieces of one training run."""

    config: TrainConfig
    info: DistInfo
    model: nn.Module  # the plain model: checkpoints, eval and the export read it
    train_model: nn.Module  # what forward/backward runs through: `model`, or its DDP wrapper
    trainable_params: list[nn.Parameter]
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    paged: PagedOptimizerStates
    train_dataset: TokenizedDataset
    eval_datasets: dict[str, TokenizedDataset]
    meter: MemoryMeter
    start_step: int  # optimizer steps already done (0, or the resumed checkpoint's step)
    threads: int  # torch CPU threads in use
    general_dataset: TokenizedDataset | None = None  # data.general: mixed into steps, and the Fisher's rows
    anchor: WeightAnchor | None = None  # L2-SP / EWC: the starting weights and the penalty toward them

    @functools.cached_property
    def packed(self) -> bool:
        """The training rows are packed documents (they carry position_ids); read once, not every step."""
        return "position_ids" in self.train_dataset[0]

    @property
    def step_dataset(self) -> TokenizedDataset:
        """What step_micro_batches' indices point into: the task rows, then the general rows when mixed."""
        if self.general_dataset is not None and self.config.data.general_fraction > 0:
            return MixedRows(self.train_dataset, self.general_dataset)
        return self.train_dataset

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_params)

    def autocast(self) -> contextlib.AbstractContextManager:
        """CUDA autocast to the model dtype for 16-bit runs on a GPU; nothing otherwise."""
        return _autocast(self.config, self.info.device)()


def _autocast(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if device.type == "cuda" and config.model.dtype != "float32":
        return lambda: torch.autocast("cuda", dtype=compute_dtype(config.model.dtype))
    return contextlib.nullcontext


def build_model(config: TrainConfig, device: torch.device) -> tuple[nn.Module, int]:
    """The model to train (full: every parameter; lora / qlora / dora / ia3 / prompt / prefix / adapter: that
    method injected, the base frozen; 4-bit base for qlora, or any adapter mode with model.load_in_4bit).
    Returns (model, trainable parameter count)."""
    mode = config.train.mode
    dtype = compute_dtype(config.model.dtype)
    four_bit = mode == "qlora" or (mode != "full" and config.model.load_in_4bit)
    quantize = config.model.quant_type if four_bit else None
    model = load_model(
        config.model.path,
        dtype=dtype,
        quantize=quantize,
        device=device,
        double_quant=config.model.double_quant,
        gradient_checkpointing=config.model.gradient_checkpointing,
    )
    model.model.keep_mlp_layers = config.model.keep_mlp_layers
    model.model.offload_activations = config.model.offload_activations
    model.model.separate_documents = config.data.packed_attention == "document"
    model.loss_chunk_tokens = config.model.loss_chunk_tokens or None  # None: the per-batch rule
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode in ("lora", "qlora"):
        targets = config.lora.target_modules
        inject_lora(
            model,
            targets if isinstance(targets, str) else list(targets),
            r=config.lora.r,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            rslora=config.lora.rslora,
        )
    else:
        inject_method(model, config)
    model.train()
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def inject_method(model: nn.Module, config: TrainConfig) -> None:
    """Inject the nibblora.methods method train.mode names, configured by its section."""
    from nibblora import methods

    mode = config.train.mode
    listed = lambda v: v if isinstance(v, str) else list(v)  # noqa: E731
    seed = config.train.seed
    if mode == "dora":
        methods.inject_dora(
            model,
            listed(config.lora.target_modules),
            r=config.lora.r,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            rslora=config.lora.rslora,
        )
    elif mode == "ia3":
        methods.inject_ia3(model, listed(config.ia3.target_modules), listed(config.ia3.feedforward_modules))
    elif mode == "prompt":
        p = config.prompt
        methods.inject_prompt_tuning(
            model, p.num_virtual_tokens, init=p.init, init_token_ids=p.init_token_ids or None, seed=seed
        )
    elif mode == "prefix":
        methods.inject_prefix_tuning(
            model,
            config.prefix.num_virtual_tokens,
            projection_hidden=config.prefix.projection_hidden or None,
            seed=seed,
        )
    elif mode == "adapter":
        a = config.adapter
        methods.inject_bottleneck(model, a.variant, a.bottleneck_size, a.non_linearity)
    else:
        raise ConfigError(f"train.mode: {mode!r} is not a method nibblora can inject")


def load_datasets(
    config: TrainConfig,
    train_dataset: TokenizedDataset | None,
    eval_datasets: dict[str, TokenizedDataset] | None,
    general_dataset: TokenizedDataset | None = None,
) -> tuple[TokenizedDataset, dict[str, TokenizedDataset], TokenizedDataset | None]:
    """The datasets passed in, or the ones data.train / data.eval / data.general name. The general rows are
    loaded only when something uses them (data.general_fraction or train.ewc)."""
    if train_dataset is None:
        if not config.data.train:
            raise ConfigError(
                "data.train is required: a PreparedDataset folder or a .jsonl of tokenized rows "
                "(or pass train_dataset to train())"
            )
        train_dataset = open_dataset(config.data.train, config.data.max_length)
    if eval_datasets is None:
        eval_datasets = {name: open_dataset(path, config.data.max_length) for name, path in config.data.eval.items()}
    if len(train_dataset) == 0:
        raise ValueError("the training set is empty")
    needs_general = config.data.general_fraction > 0 or config.train.ewc > 0
    if general_dataset is None and needs_general:
        if not config.data.general:
            key = "data.general_fraction" if config.data.general_fraction > 0 else "train.ewc"
            raise ConfigError(
                f"{key} needs general-domain rows: set data.general to a dataset (a prepared folder or a .jsonl of "
                "tokenized rows), or pass general_dataset to train()"
            )
        general_dataset = open_dataset(config.data.general, config.data.max_length)
    if general_dataset is not None and needs_general and len(general_dataset) == 0:
        raise ConfigError(f"data.general: the general-domain set {config.data.general or '(passed in)'} is empty")
    return train_dataset, eval_datasets, general_dataset if needs_general else None


def build_anchor(
    config: TrainConfig,
    model: nn.Module,
    params: list[nn.Parameter],
    general: TokenizedDataset | None,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    log: Log,
) -> WeightAnchor | None:
    """L2-SP / EWC at the model's current (starting) weights; the Fisher from the first train.ewc_samples rows of
    a seeded shuffle of data.general. None when neither is on."""
    tc = config.train
    if tc.l2sp <= 0 and tc.ewc <= 0:
        return None
    fisher = None
    if tc.ewc > 0:
        from nibblora.train.step import model_loss_sum

        assert general is not None  # load_datasets required it
        order = torch.randperm(len(general), generator=torch.Generator().manual_seed(tc.seed + 2))
        rows = [general[i] for i in order[: tc.ewc_samples].tolist()]
        fisher = estimate_fisher(
            model, params, rows, lambda m, b: model_loss_sum(m, b, b["labels"].cpu()), device, autocast
        )
        log(f"EWC: diagonal Fisher estimated on {len(rows)} general rows")
    anchor = WeightAnchor.build(params, tc.l2sp, tc.ewc, fisher)
    if anchor is not None:
        log(f"anchored to the starting weights (l2sp {tc.l2sp}, ewc {tc.ewc}): {anchor.bytes / 2**20:.1f} MiB held")
    return anchor


def find_resume_step(config: TrainConfig, info: DistInfo, log: Log, event: Event) -> int | None:
    """The step of the checkpoint to resume from (None: start afresh). Rank 0 checks the checksums and tells the
    other ranks; damaged checkpoints are skipped, each with a warning and a `checkpoint_damaged` event."""
    found = -1
    if config.checkpoint.resume and info.is_main:
        point = find_resume_checkpoint(Path(config.output_dir), config.train.mode)
        for path, reason in point.skipped:
            log(f"checkpoint {path} is damaged ({reason}); skipped it", "warning")
            event(
                "checkpoint_damaged",
                f"skipped damaged checkpoint {path.name}: {reason}",
                checkpoint_step(path),
                {"checkpoint": str(path), "reason": reason},
            )
        if point.directory is not None:
            found = checkpoint_step(point.directory)
        elif point.skipped:
            log("no intact checkpoint left; training from step 0", "warning")
    found = broadcast_int(found, info)
    return None if found < 0 else found


def _fits(saved: Any, fresh: dict, what: str, directory: Path, required: tuple[str, ...] = ()) -> None:
    """`saved` may hold only keys `fresh` has (a newer torch may add some; loading sets them as attributes, so a
    foreign key is refused), with values of the same kind, and must hold `required`."""

    def same_kind(a: Any, b: Any) -> bool:
        numbers = (int, float)
        if a is None or b is None or type(a) is type(b):
            return True
        return isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool)

    if (
        not isinstance(saved, dict)
        or not set(saved) <= set(fresh)
        or not set(required) <= set(saved)
        or not all(same_kind(saved[k], fresh[k]) for k in saved)
    ):
        raise CheckpointError(
            f"reading checkpoint {directory}: its {what} state does not fit this run's {what}; "
            "the checkpoint is damaged or from another config"
        )


def apply_trainer_state(
    state: dict,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    directory: Path,
) -> None:
    """Load the optimizer, scheduler and scaler states of a checkpoint, each checked against the object it goes
    into first (so a state from another config fails with a CheckpointError, not deep inside a later step)."""
    saved = state.get("optimizer")
    fresh = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise CheckpointError(f"reading checkpoint {directory}: its optimizer state is malformed")
    groups, per_param = saved["param_groups"], saved["state"]
    if not isinstance(groups, list) or not isinstance(per_param, dict) or len(groups) != len(fresh["param_groups"]):
        raise CheckpointError(
            f"reading checkpoint {directory}: its optimizer holds other parameter groups than "
            "this run (did train.mode change?)"
        )
    for group, fresh_group in zip(groups, fresh["param_groups"]):
        _fits(group, fresh_group, "optimizer", directory, required=("params", "lr", "betas", "eps", "weight_decay"))
        if not isinstance(group["params"], list) or len(group["params"]) != len(fresh_group["params"]):
            raise CheckpointError(
                f"reading checkpoint {directory}: its optimizer holds other parameters than this "
                "run trains (did train.mode or lora.target_modules change?)"
            )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = [i for g in groups for i in g["params"]]
    for i, p in zip(index, params):
        entry = per_param.get(i, {})
        if not isinstance(entry, dict):
            raise CheckpointError(f"reading checkpoint {directory}: optimizer state of parameter {i} is malformed")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or (value.ndim > 0 and value.shape != p.shape):
                raise CheckpointError(
                    f"reading checkpoint {directory}: optimizer state {key} of parameter {i} does "
                    f"not fit the parameter's shape {list(p.shape)} (did lora.r change?)"
                )
    _fits(state.get("scheduler"), scheduler.state_dict(), "scheduler", directory, required=("last_epoch", "base_lrs"))
    _fits(state.get("scaler"), scaler.state_dict(), "grad scaler", directory)
    try:
        optimizer.load_state_dict(saved)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"reading checkpoint {directory}: its trainer state does not fit this run ({err})"
        ) from None


def setup_training(
    config: TrainConfig,
    info: DistInfo,
    log: Log,
    event: Event,
    train_dataset: TokenizedDataset | None = None,
    eval_datasets: dict[str, TokenizedDataset] | None = None,
    general_dataset: TokenizedDataset | None = None,
) -> TrainingSetup:
    """Build the run: datasets, model (adapters injected), optimizer, schedule, scaler; then load the newest intact
    checkpoint when checkpoint.resume is on, and wrap the model in DDP under torchrun."""
    tc, device = config.train, info.device
    if device.type == "cpu" and config.model.dtype == "float16":
        raise ConfigError("model.dtype float16 needs CUDA; on a CPU use float32 or bfloat16")
    threads = apply_threads(tc.threads)
    train_dataset, eval_datasets, general_dataset = load_datasets(config, train_dataset, eval_datasets, general_dataset)

    meter = MemoryMeter(device)
    torch.manual_seed(tc.seed)  # the same adapter init on every rank
    model, trainable = build_model(config, device)
    vocab_size = model.config.vocab_size
    if config.data.pad_token_id >= vocab_size:
        raise ConfigError(
            f"data.pad_token_id {config.data.pad_token_id} is not in the model's vocabulary "
            f"(vocab_size {vocab_size}); use the tokenizer's pad id"
        )
    log(
        f"{tc.mode} on {device} (world size {info.world_size}, {threads} CPU threads): "
        f"{trainable:,} trainable parameters"
    )
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    # Before any checkpoint is loaded: the anchor holds the starting weights, on resume too.
    anchor = build_anchor(config, model, trainable_params, general_dataset, device, _autocast(config, device), log)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.betas[0], tc.betas[1]), tc.eps)
    warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * tc.max_steps)
    scheduler = build_scheduler(optimizer, tc.max_steps, warmup, tc.schedule, tc.min_lr_ratio)
    paged = PagedOptimizerStates(optimizer, device)
    if tc.paged_optimizer and not paged.active:
        log("paged_optimizer has no effect on a CPU: the optimizer states already live in host memory")
    paged.active = paged.active and tc.paged_optimizer
    if config.model.offload_activations and device.type == "cpu":
        log(
            "offload_activations saves no memory on a CPU: the layer inputs are copied within host memory "
            "(it keeps that path tested; it pays off on CUDA)"
        )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.model.dtype == "float16")

    start_step = 0
    resume_step = find_resume_step(config, info, log, event)
    if resume_step is not None:
        directory = Path(config.output_dir) / CHECKPOINTS / f"step-{resume_step:08d}"
        state = load_checkpoint(directory, model, tc.mode, info)
        apply_trainer_state(state, optimizer, scheduler, scaler, directory)
        start_step = state["step"]
        global_batch = config.data.batch_size * tc.grad_accum * info.world_size
        if state.get("global_batch", global_batch) != global_batch:
            log(
                f"the checkpoint was trained with {state['global_batch']} rows per step, this run takes "
                f"{global_batch}: the data order after step {start_step} differs from an uninterrupted run",
                "warning",
            )
        log(f"resumed from {directory} at step {start_step}")
        event("resumed", f"resumed from step {start_step}", start_step, {"checkpoint": str(directory)})
    else:
        event("started", f"{tc.mode} training started", 0, None)

    train_model: nn.Module = model
    if info.enabled:
        # Every rank built the same model from the same seed, so nothing needs broadcasting. broadcast_buffers is
        # deprecated in favour of forward_sync_buffers, which still syncs at init; we want no sync at all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
    return TrainingSetup(
        config,
        info,
        model,
        train_model,
        trainable_params,
        optimizer,
        scheduler,
        scaler,
        paged,
        train_dataset,
        eval_datasets,
        meter,
        start_step,
        threads,
        general_dataset,
        anchor,
    )
