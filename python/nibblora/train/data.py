"""What the trainer needs from a dataset, and how it batches one.

The contract (nibblora.data.PreparedDataset meets it, and so does any torch Dataset): `len(ds)` rows, and
`ds[i]` is a dict of 1-D int64 tensors with at least `input_ids` and `labels` (-100 where the loss must not look),
plus `position_ids` when rows are packed documents. Rows may differ in length; `pad_collate` right-pads them.

Which rows form which batch is a pure function of (seed, step), so a resumed run and a torchrun job see exactly
the rows an uninterrupted single-process run would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from nibblora.data import PreparedDataset, collate_padded


class TokenizedDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


class TokenizedRows(torch.utils.data.Dataset):
    """Rows held in memory: a list of {"input_ids": [...], "labels": [...], "position_ids": [...]?} dicts.

    `labels` defaults to `input_ids` (every token trained); rows longer than `max_length` (> 0) are truncated.
    """

    def __init__(self, rows: Sequence[dict], max_length: int = 0):
        self.rows = []
        for i, row in enumerate(rows):
            if "input_ids" not in row:
                raise ValueError(f"row {i} has no input_ids")
            item = {k: torch.as_tensor(v, dtype=torch.long) for k, v in row.items()
                    if k in ("input_ids", "labels", "position_ids")}
            item.setdefault("labels", item["input_ids"].clone())
            if item["labels"].shape != item["input_ids"].shape:
                raise ValueError(f"row {i}: labels and input_ids differ in length")
            if max_length > 0:
                item = {k: v[:max_length] for k, v in item.items()}
            self.rows.append(item)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]

    @classmethod
    def from_jsonl(cls, path: str | Path, max_length: int = 0) -> TokenizedRows:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: not JSON ({err})") from None
        return cls(rows, max_length)

    def to_jsonl(self, path: str | Path) -> Path:
        with open(path, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps({k: v.tolist() for k, v in row.items()}) + "\n")
        return Path(path)


def open_dataset(path: str | Path, max_length: int = 0) -> TokenizedDataset:
    """A .jsonl file of tokenized rows, or a folder written by nibblora's data preparation (PreparedDataset)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return TokenizedRows.from_jsonl(path, max_length)
    return PreparedDataset(path)


def pad_collate(rows: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """nibblora.data.collate_padded without the attention mask: with right padding and causal attention no real
    token ever sees a pad, and leaving the mask out keeps attention on its fast path. position_ids only for
    packed rows (the model's default 0..n-1 serves the rest). int64 tensors [batch, longest]."""
    batch = collate_padded(rows, pad_token_id)
    del batch["attention_mask"]
    if not any("position_ids" in r for r in rows):
        del batch["position_ids"]
    return batch


def index_stream(num_rows: int, seed: int, start: int) -> Iterator[int]:
    """Row indices from position `start` of an endless stream: epoch after epoch, each a fresh permutation
    drawn from (seed, epoch) alone."""
    epoch, offset = divmod(start, num_rows)
    while True:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        yield from order[offset:]
        epoch, offset = epoch + 1, 0


def step_micro_batches(dataset: TokenizedDataset, step: int, batch_size: int, grad_accum: int, world_size: int,
                       rank: int, seed: int) -> list[list[int]]:
    """Row indices of this rank's micro-batches for optimizer step `step` (0-based).

    A step consumes global_batch = batch_size * grad_accum * world_size consecutive stream positions; micro-batch
    j of rank r takes the slice starting at (j * world_size + r) * batch_size. So one process with
    batch_size * world_size rows per micro-batch sees the same rows as world_size processes together.
    """
    global_batch = batch_size * grad_accum * world_size
    stream = index_stream(len(dataset), seed, step * global_batch)
    positions = [next(stream) for _ in range(global_batch)]
    micro = []
    for j in range(grad_accum):
        begin = (j * world_size + rank) * batch_size
        micro.append(positions[begin:begin + batch_size])
    return micro


def eval_batches(dataset: TokenizedDataset, batch_size: int, max_batches: int = 0,
                 rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
    """Row indices of the eval batches this rank computes, in order (rows split round-robin across ranks)."""
    indices = list(range(rank, len(dataset), world_size))
    count = 0
    for begin in range(0, len(indices), batch_size):
        if max_batches and count >= max_batches:
            return
        yield indices[begin:begin + batch_size]
        count += 1
