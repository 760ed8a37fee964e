"""One optimizer step, and evaluation: the arithmetic of training.

One optimizer step:
    rows     = the step's micro-batches (a pure function of seed and step; see nibblora.train.data)
    n_tokens = supervised tokens (labels != -100 after the shift) over ALL micro-batches and ranks
    for each micro-batch: loss_sum = CE summed over its tokens; backward(loss_sum / n_tokens)
    clip; if the loss (and, without a grad scaler, the gradient norm) is finite: AdamW step; scheduler step
so the loss is the mean over every supervised token of the step, however the tokens fall into micro-batches,
devices and padding. A micro-batch with many supervised tokens weighs more than one with few, as it should.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nibblora.data.encoder import IGNORE_INDEX
from nibblora.models.llama import LlamaForCausalLM
from nibblora.models.loss import TokenScores, exact_rows, logits_scores, shift_labels, supervised_rows
from nibblora.train.data import (
    MixedRows,
    TokenizedDataset,
    check_token_ids,
    eval_batches,
    pad_collate,
    step_micro_batches,
)
from nibblora.train.distributed import DistInfo, all_reduce_sum
from nibblora.train.setup import TrainingSetup


@dataclass
class StepOutput:
    """What one optimizer step measured. `applied` is False when the update was not made (a non-finite loss or
    gradient norm): the weights and optimizer state are those from before the step."""

    loss: float  # mean next-token loss over the step's supervised tokens, all ranks
    lr: float  # the learning rate the step used
    grad_norm: float  # global gradient norm before clipping
    supervised_tokens: int  # over all ranks
    tokens: int  # non-pad tokens over all ranks
    longest: int  # longest padded micro-batch of this rank
    applied: bool
    penalty: float = 0.0  # the L2-SP / EWC penalty at the step's starting weights (not part of `loss`)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over supervised positions, number of them).

    logits [batch, seq, vocab] predict the token after each position, so they meet labels shifted by one.
    The loss is taken in float32 whatever the logits' dtype.
    """
    shifted = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (shifted != IGNORE_INDEX).sum()


def model_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], cpu_labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's supervised positions (float32 scalar). nibblora's own
    models take the labels and compute it in chunks from the hidden states (no [tokens, vocab] logits kept); any
    other module returns logits and the loss is taken from them. The supervised rows are found on the CPU labels,
    so a CUDA device never waits for the host."""
    inner = model.module if hasattr(model, "module") else model  # DDP wraps the model
    if isinstance(inner, LlamaForCausalLM):
        loss_sum, _ = model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            labels=batch["labels"],
            loss_rows=supervised_rows(shift_labels(cpu_labels)),
        )
        return loss_sum
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"))
    return token_loss_sum(logits, batch["labels"])[0]


def train_step(setup: TrainingSetup, step: int, skip_non_finite: bool) -> StepOutput:
    """Optimizer step `step` (0-based): forward and backward over this rank's micro-batches, clip, then the AdamW
    and scheduler steps. A non-finite loss (or, without a grad scaler, gradient norm) leaves the weights alone;
    the scheduler still advances when `skip_non_finite` (the step is skipped, not retried)."""
    config, info, tc = setup.config, setup.info, setup.config.train
    device = info.device
    rows = setup.step_dataset  # the task rows, then the general rows when data.general_fraction mixes them in
    mixed = isinstance(rows, MixedRows)
    micro = step_micro_batches(
        setup.train_dataset,
        step,
        config.data.batch_size,
        tc.grad_accum,
        info.world_size,
        info.rank,
        tc.seed,
        general_rows=len(rows.general) if mixed else 0,
        general_fraction=config.data.general_fraction,
    )
    batches = [pad_collate([rows[i] for i in idx], config.data.pad_token_id) for idx in micro]
    for idx, batch in zip(micro, batches):
        check_token_ids(batch, setup.vocab_size, [rows.describe(i) for i in idx] if mixed else idx)
    n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    n_tokens = int(all_reduce_sum(torch.tensor(n_local, device=device), info).item())
    tokens_local = sum(int((b["input_ids"] != config.data.pad_token_id).sum()) for b in batches)
    longest = max(b["input_ids"].shape[1] for b in batches)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    for j, cpu_batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        last = j == len(batches) - 1
        # DDP all-reduces gradients on the last micro-batch only; it averages over ranks, hence * world_size.
        sync = setup.train_model.no_sync() if info.enabled and not last else contextlib.nullcontext()
        with sync:
            with setup.autocast():
                loss_sum = model_loss_sum(setup.train_model, batch, cpu_batch["labels"])
            setup.scaler.scale(loss_sum * info.world_size / max(n_tokens, 1)).backward()
        loss_total += loss_sum.detach().double()
        del loss_sum
    setup.scaler.unscale_(setup.optimizer)
    # L2-SP / EWC: their gradients join the loss's before clipping, as a loss term's would.
    penalty = setup.anchor.add_gradients() if setup.anchor is not None else 0.0
    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.trainable_params, max_norm))
    lr = setup.scheduler.get_last_lr()[0]
    loss = (all_reduce_sum(loss_total, info) / max(n_tokens, 1)).item()
    # With a grad scaler (float16), an infinite gradient is the scaler's business: it skips the update and lowers
    # its scale. Without one, a non-finite gradient would write NaN into the weights.
    finite = math.isfinite(loss) and (setup.scaler.is_enabled() or math.isfinite(grad_norm))
    if finite:
        if setup.paged.active:
            setup.paged.page_in()
        setup.scaler.step(setup.optimizer)
        if setup.paged.active:
            setup.paged.page_out()
    if finite or skip_non_finite:
        setup.scaler.update()
        with warnings.catch_warnings():
            # A skipped first step calls scheduler.step() before any optimizer.step(); LambdaLR computes each lr
            # from the step count, so torch's warning about a lost first lr value does not apply.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    tokens = int(all_reduce_sum(torch.tensor(tokens_local, device=device), info).item())
    return StepOutput(loss, lr, grad_norm, n_tokens, tokens, longest, finite, penalty)


class EvalScores(NamedTuple):
    """One eval set's results (over all ranks)."""

    loss: float  # mean next-token loss over the supervised tokens
    tokens: int  # supervised tokens
    exact_match: float  # share of scored rows whose every supervised token is the greedy (argmax) choice
    rows: int  # rows with at least one supervised token


def model_scores(model: nn.Module, batch: dict[str, torch.Tensor], cpu_labels: torch.Tensor) -> TokenScores:
    """Evaluation's `model_loss_sum`: the loss sum and, per row, whether every supervised token is the model's
    greedy choice given the tokens before it (teacher forcing). That is exactly "greedy decoding reproduces the
    answer": if every step's argmax is the label, free-running greedy decoding emits the same tokens; at the
    first miss it diverges."""
    inner = model.module if hasattr(model, "module") else model
    if isinstance(inner, LlamaForCausalLM):
        return model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            labels=batch["labels"],
            loss_rows=supervised_rows(shift_labels(cpu_labels)),
            score=True,
        )
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"))
    targets = batch["labels"][:, 1:]
    loss, rows, hits = logits_scores(logits[:, :-1], targets)
    exact, scored = exact_rows(rows, hits, *targets.shape)
    return TokenScores(loss, rows.shape[0], exact, scored)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenizedDataset,
    batch_size: int,
    max_batches: int,
    pad_token_id: int,
    info: DistInfo,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> EvalScores:
    """Loss and exact match of the set (see EvalScores), over all ranks."""
    was_training = model.training
    model.eval()
    # float64 loss, then three counts: supervised tokens, exactly-matched rows, scored rows
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    counts = torch.zeros(3, dtype=torch.int64, device=info.device)
    for indices in eval_batches(dataset, batch_size, max_batches, info.rank, info.world_size):
        cpu_batch = pad_collate([dataset[i] for i in indices], pad_token_id)
        check_token_ids(cpu_batch, model.config.vocab_size, indices, what="eval row")
        batch = {k: v.to(info.device) for k, v in cpu_batch.items()}
        with autocast():
            scores = model_scores(model, batch, cpu_batch["labels"])
        total += scores.loss_sum.double()
        counts += torch.stack(
            [torch.tensor(scores.tokens, device=info.device), scores.exact.sum(), scores.scored.sum()]
        ).to(info.device)
    model.train(was_training)
    total, counts = all_reduce_sum(total, info), all_reduce_sum(counts, info)
    tokens, exact, rows = (int(c) for c in counts.tolist())
    return EvalScores((total / max(tokens, 1)).item(), tokens, exact / rows if rows else 0.0, rows)
