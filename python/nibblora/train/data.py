"""What the trainer needs from a dataset, and how it batches one.

The contract (nibblora.data.PreparedDataset meets it, and so does any torch Dataset): `len(ds)` rows, and
`ds[i]` is a dict of 1-D int64 tensors with at least `input_ids` and `labels` (-100 where the loss must not look),
plus `position_ids` when rows are packed documents. Rows may differ in length; `pad_collate` right-pads them.

Which rows form which batch is a pure function of (seed, step), so a resumed run and a torchrun job see exactly
the rows an uninterrupted single-process run would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from nibblora.data import PreparedDataset, collate_padded
from nibblora.data.encoder import IGNORE_INDEX
from nibblora.errors import DataError, DataFileNotFoundError


class TokenizedDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


class TokenizedRows(torch.utils.data.Dataset):
    """Rows held in memory: a list of {"input_ids": [...], "labels": [...], "position_ids": [...]?} dicts.

    `labels` defaults to `input_ids` (every token trained); rows longer than `max_length` (> 0) are truncated.
    """

    def __init__(self, rows: Sequence[dict], max_length: int = 0, *, names: Sequence[str] | None = None):
        """`names[i]` says where row i came from in errors (from_jsonl passes "file:line"); default "row i"."""
        self.rows = []
        for i, row in enumerate(rows):
            self.rows.append(_row_tensors(row, names[i] if names is not None else f"row {i}", max_length))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]

    @classmethod
    def from_jsonl(cls, path: str | Path, max_length: int = 0) -> TokenizedRows:
        rows, names = [], []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except (json.JSONDecodeError, RecursionError) as err:
                        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
                        raise DataError(f"{path}:{line_no}: not JSON ({reason})") from None
                    names.append(f"{path}:{line_no}")
        return cls(rows, max_length, names=names)

    def to_jsonl(self, path: str | Path) -> Path:
        with open(path, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps({k: v.tolist() for k, v in row.items()}) + "\n")
        return Path(path)


_ROW_KEYS = ("input_ids", "labels", "position_ids")
_INT64 = (-(2**63), 2**63 - 1)


def _ids(value: object, key: str, where: str) -> torch.Tensor:
    """A 1-D int64 tensor from a list / tuple of ints, or a 1-D integer tensor or numpy array."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        if value.ndim != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise DataError(
                f"{where}: {key} must be a 1-D integer tensor, got {value.dtype} of shape {list(value.shape)}"
            )
        return value.to(torch.long)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: {key} must be a list of integers")
    if value and not (_INT64[0] <= min(value) and max(value) <= _INT64[1]):
        raise DataError(f"{where}: {key} holds a number outside int64")
    return torch.tensor(value, dtype=torch.long)


def _row_tensors(row: object, where: str, max_length: int) -> dict[str, torch.Tensor]:
    """One row as 1-D int64 tensors (input_ids, labels, position_ids when given); DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object with input_ids (and labels), got {type(row).__name__}")
    if "input_ids" not in row:
        raise DataError(f"{where}: the row has no input_ids")
    item = {k: _ids(row[k], k, where) for k in _ROW_KEYS if k in row}
    item.setdefault("labels", item["input_ids"].clone())
    for key in ("labels", "position_ids"):
        if key in item and item[key].shape != item["input_ids"].shape:
            raise DataError(f"{where}: {key} and input_ids differ in length")
    if max_length > 0:
        item = {k: v[:max_length] for k, v in item.items()}
    return item


def open_dataset(path: str | Path, max_length: int = 0) -> TokenizedDataset:
    """A .jsonl file of tokenized rows, or a folder written by nibblora's data preparation (PreparedDataset)."""
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError(f"dataset {path} does not exist")
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


def check_token_ids(
    batch: dict[str, torch.Tensor], vocab_size: int, rows: Sequence[int], what: str = "training row"
) -> None:
    """DataError naming the row when an id is outside the vocabulary (the embedding lookup would fail, on a GPU
    with a device-side assert that ends the process): input_ids in [0, vocab_size), labels there or -100."""
    ids, labels = batch["input_ids"], batch["labels"]
    bad_ids = (ids < 0) | (ids >= vocab_size)
    bad_labels = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab_size)
    for name, bad, values in (("input_ids", bad_ids, ids), ("labels", bad_labels, labels)):
        if bool(bad.any()):
            i, j = (int(x) for x in bad.nonzero()[0])
            raise DataError(
                f"{what} {rows[i]}: {name} holds {int(values[i, j])} at position {j}, outside the "
                f"model's vocabulary (vocab_size {vocab_size}); was the data tokenized for another model?"
            )


def index_stream(num_rows: int, seed: int, start: int) -> Iterator[int]:
    """Row indices from position `start` of an endless stream: epoch after epoch, each a fresh permutation
    drawn from (seed, epoch) alone."""
    epoch, offset = divmod(start, num_rows)
    while True:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        yield from order[offset:]
        epoch, offset = epoch + 1, 0


def step_micro_batches(
    dataset: TokenizedDataset,
    step: int,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    rank: int,
    seed: int,
    general_rows: int = 0,
    general_fraction: float = 0.0,
) -> list[list[int]]:
    """Row indices of this rank's micro-batches for optimizer step `step` (0-based).

    A step consumes global_batch = batch_size * grad_accum * world_size consecutive stream positions; micro-batch
    j of rank r takes the slice starting at (j * world_size + r) * batch_size. So one process with
    batch_size * world_size rows per micro-batch sees the same rows as world_size processes together.
    With `general_rows` > 0 and `general_fraction` > 0 some of those positions hold general-domain rows instead
    (see step_rows); their indices are len(dataset) + i for general row i.
    """
    global_batch = batch_size * grad_accum * world_size
    positions = step_rows(len(dataset), step, global_batch, seed, general_rows, general_fraction)
    micro = []
    for j in range(grad_accum):
        begin = (j * world_size + rank) * batch_size
        micro.append(positions[begin : begin + batch_size])
    return micro


def step_rows(
    num_rows: int, step: int, global_batch: int, seed: int, general_rows: int = 0, general_fraction: float = 0.0
) -> list[int]:
    """The global batch of optimizer step `step`: `global_batch` row indices, a pure function of its arguments.

    Without general rows: the next positions of the task stream. With them, steps 0 .. s-1 have drawn exactly
    floor(s * global_batch * general_fraction) general rows in all (so every step takes its share, rounded so the
    total never drifts), each source from its own endless stream (task rows where the task stream left off,
    general rows from a stream seeded apart), and the general rows sit at positions of the batch drawn from
    (seed, step). General row i is returned as num_rows + i.
    """
    if general_rows <= 0 or general_fraction <= 0:
        stream = index_stream(num_rows, seed, step * global_batch)
        return [next(stream) for _ in range(global_batch)]
    general_before = math.floor(step * global_batch * general_fraction)
    general_now = math.floor((step + 1) * global_batch * general_fraction) - general_before
    task_stream = index_stream(num_rows, seed, step * global_batch - general_before)
    general_stream = index_stream(general_rows, seed + 1, general_before)
    slots = torch.randperm(global_batch, generator=torch.Generator().manual_seed(seed * 7919 + step))
    general_slots = set(slots[:general_now].tolist())
    return [num_rows + next(general_stream) if i in general_slots else next(task_stream) for i in range(global_batch)]


class MixedRows:
    """The task rows followed by the general rows, as one dataset (what step_rows' indices point into)."""

    def __init__(self, task: TokenizedDataset, general: TokenizedDataset):
        self.task, self.general = task, general

    def __len__(self) -> int:
        return len(self.task) + len(self.general)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.task)
        return self.task[index] if index < n else self.general[index - n]

    def describe(self, index: int) -> str:
        """How an error names row `index`."""
        n = len(self.task)
        return str(index) if index < n else f"{index - n} of data.general"


def eval_batches(
    dataset: TokenizedDataset, batch_size: int, max_batches: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """Row indices of the eval batches this rank computes, in order (rows split round-robin across ranks)."""
    indices = list(range(rank, len(dataset), world_size))
    count = 0
    for begin in range(0, len(indices), batch_size):
        if max_batches and count >= max_batches:
            return
        yield indices[begin : begin + batch_size]
        count += 1
