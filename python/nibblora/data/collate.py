"""Collate functions for torch DataLoaders over PreparedDataset items."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nibblora.data.encoder import IGNORE_INDEX


def collate_padded(
    items: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest (rounded up to pad_to_multiple_of): input_ids, labels (-100 on padding),
    attention_mask, and position_ids (0..n-1, or the packed rows' own) — all int64 [batch, length]."""
    if not items:
        raise ValueError("collate_padded: empty batch")
    length = max(len(x["input_ids"]) for x in items)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(items)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.int64)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((batch, length), dtype=torch.int64)
    position_ids = torch.zeros((batch, length), dtype=torch.int64)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
        position_ids[row, :n] = item.get("position_ids", torch.arange(n))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def collate_packed(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate rows into one sequence with no padding, for attention that stays inside documents
    (flash-attention varlen / transformers' packed position_ids): input_ids, labels, position_ids int64
    [1, total]; cu_seqlens int32 [documents + 1]; max_seqlen int. Each document's first label is -100."""
    if not items:
        raise ValueError("collate_packed: empty batch")
    input_ids = torch.cat([x["input_ids"] for x in items])
    labels = torch.cat([x["labels"] for x in items])
    lengths = torch.cat([x.get("document_lengths", torch.tensor([len(x["input_ids"])])) for x in items])
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    position_ids = torch.arange(len(input_ids), dtype=torch.int64) - starts
    labels[torch.cumsum(lengths, 0)[:-1]] = IGNORE_INDEX  # every document's first token: nothing precedes it
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "position_ids": position_ids[None],
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(lengths.max()),
    }
