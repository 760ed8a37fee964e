"""Next-token loss straight from the hidden states, without ever holding [tokens, vocab] logits.

The plain path, `F.cross_entropy(lm_head(h).float(), labels)`, keeps the whole logits tensor (and its float32 copy)
alive from the forward to the backward: 4 x 2048 tokens at a 128k vocabulary is 4 GiB in bf16 plus 4 GiB in fp32,
usually the largest tensor of a QLoRA step. `linear_cross_entropy` walks the supervised tokens in chunks: for each
chunk it computes the logits in the compute dtype, the log-sum-exp in float32, the loss, and at once the gradient of
the loss with respect to the chunk's hidden states (and to the lm_head weight when that is trainable). Backward
then only scales what forward stored. Peak extra memory is one chunk of logits, not all of them.

Tokens labelled `ignore_index` (-100: prompt, padding) are dropped before the matmul. Finding them on the device
would be a host sync on CUDA; the trainer builds labels on the CPU, so `supervised_rows` can compute the row
indices there and hand them over (`rows=`), and the function then never waits for the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from nibblora.models.loss_chunks import loss_chunk_tokens

IGNORE_INDEX = -100


class TokenScores(NamedTuple):
    """What evaluation needs from one batch (see `LlamaForCausalLM.forward(..., score=True)`)."""

    loss_sum: torch.Tensor  # float32 scalar: next-token cross-entropy summed over the supervised tokens
    tokens: int  # how many supervised tokens
    exact: torch.Tensor  # bool [batch]: every supervised token of the sequence is the argmax of its logits
    scored: torch.Tensor  # bool [batch]: the sequence has a supervised token at all


def supervised_rows(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Flat indices (int64 [n]) of the tokens whose label is not `ignore_index`. Call it on CPU labels and move
    the result with `non_blocking=True` to keep the device free of host syncs."""
    return labels.reshape(-1).ne(ignore_index).nonzero().squeeze(1)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels [batch, seq] moved one left (position t is scored against token t+1), `ignore_index` at the end:
    the hidden states then pair with them row for row, with no copy of the hidden states."""
    tail = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], tail], dim=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over supervised rows of cross_entropy(hidden @ weight.T, labels), gradients computed in forward.

    Saves for backward: the gradient w.r.t. hidden ([tokens, hidden], compute dtype: the size of the input) and,
    when the weight is trainable, its float32 gradient ([vocab, hidden]). Never the logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, chunk_tokens):  # noqa: D102 (see class docstring)
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1).index_select(0, rows)
        picked = flat.index_select(0, rows)
        need_hidden_grad = ctx.needs_input_grad[0]
        need_weight_grad = ctx.needs_input_grad[1]

        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 when the input is
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_picked = torch.empty_like(picked) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else None
        for start in range(0, picked.shape[0], chunk_tokens):
            h = picked[start : start + chunk_tokens]
            y = targets[start : start + chunk_tokens]
            logits = (h @ weight.t()).to(acc)  # [chunk, vocab]: the only vocab-sized tensor alive
            # The log-sum-exp in place (torch.logsumexp would allocate a second [chunk, vocab] buffer):
            # lse = m + log(sum(exp(logits - m))), with the logits' buffer turned into exp(logits - m).
            picked_logit = logits.gather(1, y[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()
            total = exps.sum(dim=-1, keepdim=True)
            loss += (top.squeeze(1) + total.log().squeeze(1) - picked_logit).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, built in place in the same buffer.
            probs = exps.div_(total)
            probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            grad_logits = probs.to(h.dtype)
            if need_hidden_grad:
                grad_picked[start : start + chunk_tokens] = grad_logits @ weight
            if need_weight_grad:
                grad_weight.addmm_(grad_logits.t().to(acc), h.to(acc))
            # Drop this chunk's buffer before the next matmul allocates its own, or two would be alive at once.
            del logits, exps, probs, grad_logits

        grad_hidden = None
        if need_hidden_grad:
            grad_hidden = torch.zeros_like(flat).index_copy_(0, rows, grad_picked).view_as(hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """(sum of the cross-entropy over supervised tokens as a float32 scalar, number of those tokens).

    hidden [..., hidden] in the compute dtype; weight [vocab, hidden] (the lm_head's, frozen or trainable);
    labels [...] int64 aligned with hidden row for row (use `shift_labels` for next-token prediction).
    rows: `supervised_rows(labels)` computed ahead (on the CPU, to avoid a device sync); found here if None.
    chunk_tokens: tokens per chunk; default `loss_chunk_tokens` (float32 logits of a chunk no larger than the
        supervised rows' hidden states in float32).
    Equal to `F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index, reduction="sum")` to float
    rounding, with gradients for hidden and for weight when it requires them.
    """
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not pair row for row")
    if rows is None:
        rows = supervised_rows(labels, ignore_index)
    if chunk_tokens is None:
        chunk_tokens = loss_chunk_tokens(rows.shape[0], weight.shape[1], weight.shape[0])
    rows = rows.to(hidden.device, non_blocking=True)
    loss = _LinearCrossEntropy.apply(hidden, weight, labels, rows, chunk_tokens)
    return loss, rows.shape[0]


@torch.no_grad()
def score_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluation's twin of `linear_cross_entropy` (no autograd): (loss sum as a float32 scalar, the flat indices
    of the supervised tokens int64 [n], and for each of them whether the label is the argmax of its logits, bool
    [n]). Logits are computed chunk by chunk, as in training; ties go to the lowest id, as greedy decoding does."""
    if rows is None:
        rows = supervised_rows(labels, ignore_index)
    if chunk_tokens is None:
        chunk_tokens = loss_chunk_tokens(rows.shape[0], weight.shape[1], weight.shape[0])
    rows = rows.to(hidden.device, non_blocking=True)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    targets = labels.reshape(-1).index_select(0, rows)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    hits = torch.empty(rows.shape[0], dtype=torch.bool, device=hidden.device)
    for start in range(0, picked.shape[0], max(chunk_tokens, 1)):
        y = targets[start : start + chunk_tokens]
        logits = (picked[start : start + chunk_tokens] @ weight.t()).to(acc)
        loss += (torch.logsumexp(logits, dim=-1) - logits.gather(1, y[:, None]).squeeze(1)).sum()
        hits[start : start + chunk_tokens] = logits.argmax(dim=-1) == y
    return loss, rows, hits


def logits_scores(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`score_tokens` for a model that returns logits [batch, seq, vocab] (labels [batch, seq], aligned with the
    logits row for row, i.e. already shifted)."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = supervised_rows(labels, ignore_index).to(logits.device)
    targets = labels.reshape(-1).to(logits.device).index_select(0, rows)
    picked = flat.index_select(0, rows).float()
    loss = F.cross_entropy(picked, targets, reduction="sum")
    return loss, rows, picked.argmax(dim=-1) == targets


def exact_rows(rows: torch.Tensor, hits: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of a [batch, seq] batch: (every supervised token was the argmax, bool [batch]; the sequence has
    a supervised token at all, bool [batch]). `rows` are flat indices into [batch, seq], `hits` their results."""
    sequence = torch.div(rows, seq, rounding_mode="floor")
    misses = torch.zeros(batch, dtype=torch.int64, device=rows.device).index_add_(0, sequence, (~hits).long())
    scored = torch.bincount(sequence, minlength=batch)[:batch] > 0
    return (misses == 0) & scored, scored
