"""PreparedDataset: the folder prepare_dataset writes, memory-mapped, as a torch Dataset.

Arrays (1-D .npy, so numpy maps them without reading): input_ids uint32, loss_mask uint8 (1 where the loss
looks), row_offsets uint64 (rows + 1), and for packed datasets doc_offsets uint64 (document boundaries in
the token stream). Labels and position ids are derived per item.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nibblora.checkpoint.outdir import check_out_dir, move_into_place, temp_sibling
from nibblora.data.encoder import IGNORE_INDEX
from nibblora.data.prepare import FORMAT_NAME, METADATA
from nibblora.errors import DataError, DataFileNotFoundError

_ARRAYS = ("input_ids", "loss_mask", "row_offsets")
_CHUNK = 1 << 24


class PreparedDataset(Dataset):
    """A prepared-dataset folder. `ds[i]` is a dict of int64 tensors: input_ids [n], labels [n] (-100 where
    the loss must not look) and, when packed, position_ids [n] (restarting at each document) and
    document_lengths [d]. Items are copies (int64); the memory-mapped arrays themselves are `ds.input_ids`,
    `ds.loss_mask`, `ds.row_offsets` (and `ds.doc_offsets`), and `ds.arrays(i)` gives views of one row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / METADATA
        if not meta_path.is_file():
            raise DataFileNotFoundError(f"{self.path}: not a prepared dataset (no {METADATA})")
        self.metadata: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.metadata.get("format") != FORMAT_NAME:
            raise DataError(f"{meta_path}: format is {self.metadata.get('format')!r}, not {FORMAT_NAME!r}")
        self.packed: bool = bool(self.metadata["packed"])
        names = _ARRAYS + (("doc_offsets",) if self.packed else ())
        loaded = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in names}
        self.input_ids: np.ndarray = loaded["input_ids"]
        self.loss_mask: np.ndarray = loaded["loss_mask"]
        self.row_offsets: np.ndarray = loaded["row_offsets"]
        self.doc_offsets: np.ndarray | None = loaded.get("doc_offsets")
        if len(self.input_ids) != len(self.loss_mask) or int(self.row_offsets[-1]) != len(self.input_ids):
            raise DataError(f"{self.path}: arrays disagree in length (a damaged or partial copy?)")

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def row_length(self, i: int) -> int:
        return int(self.row_offsets[i + 1] - self.row_offsets[i])

    def document_lengths(self, i: int) -> np.ndarray:
        """Lengths of the documents in row i (one entry when not packed)."""
        start, end = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        if self.doc_offsets is None:
            return np.array([end - start], dtype=np.int64)
        lo = int(np.searchsorted(self.doc_offsets, start, side="left"))
        hi = int(np.searchsorted(self.doc_offsets, end, side="left"))
        return np.diff(self.doc_offsets[lo : hi + 1]).astype(np.int64)

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """Views (no copy) of row i: input_ids uint32, loss_mask uint8."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        i %= len(self)
        start, end = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        return {"input_ids": self.input_ids[start:end], "loss_mask": self.loss_mask[start:end]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        views = self.arrays(i)
        input_ids = torch.from_numpy(views["input_ids"].astype(np.int64))
        keep = torch.from_numpy(views["loss_mask"].astype(bool))
        item = {"input_ids": input_ids, "labels": torch.where(keep, input_ids, IGNORE_INDEX)}
        if self.packed:
            lengths = self.document_lengths(i % len(self))
            item["position_ids"] = position_ids_for(torch.from_numpy(lengths))
            item["document_lengths"] = torch.from_numpy(lengths)
        return item

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def torch_views(self) -> dict[str, torch.Tensor]:
        """The whole arrays as torch tensors over the memory map (no copy; uint32 ids as int32 bit patterns
        would be wrong past 2^31, so ids come as torch.uint32)."""
        return {
            "input_ids": torch.from_numpy(np.asarray(self.input_ids)),
            "loss_mask": torch.from_numpy(np.asarray(self.loss_mask)),
            "row_offsets": torch.from_numpy(np.asarray(self.row_offsets)),
        }


def position_ids_for(document_lengths: torch.Tensor) -> torch.Tensor:
    """0..len-1 for each document, concatenated: int64 [sum(lengths)]."""
    total = int(document_lengths.sum())
    starts = torch.repeat_interleave(torch.cumsum(document_lengths, 0) - document_lengths, document_lengths)
    return torch.arange(total, dtype=torch.int64) - starts


def combine_shards(shards: Sequence[str | Path], output: str | Path, *, overwrite: bool = False) -> PreparedDataset:
    """Concatenate prepared shards (same tokenizer, template and policies) into one dataset, in the order
    given. Arrays are streamed in chunks; the output is written atomically."""
    if not shards:
        raise DataError("no shards to combine")
    parts = [PreparedDataset(s) for s in shards]
    first = parts[0].metadata
    same = ("packed", "max_length", "tokenizer", "template", "policies")
    for part in parts[1:]:
        for key in same:
            if key == "tokenizer":
                differs = part.metadata[key]["sha256"] != first[key]["sha256"]
            elif key == "template":
                differs = part.metadata[key]["sha256"] != first[key]["sha256"]
            else:
                differs = part.metadata[key] != first[key]
            if differs:
                raise DataError(f"{part.path}: {key} differs from {parts[0].path}; shards must be prepared alike")
    out_dir = Path(output)
    check_out_dir(out_dir, overwrite, [p.path for p in parts], DataError)
    tmp = temp_sibling(out_dir)
    try:
        names = _ARRAYS + (("doc_offsets",) if parts[0].packed else ())
        for name in names:
            arrays = [getattr(p, name) for p in parts]
            _concat_npy(tmp / f"{name}.npy", arrays, offsets=name.endswith("_offsets"))
        counts: dict[str, int] = {}
        for part in parts:
            for k, v in part.metadata.get("counts", {}).items():
                counts[k] = counts.get(k, 0) + int(v)
        metadata = dict(first)
        for key in ("rows", "documents", "tokens", "supervised_tokens"):
            metadata[key] = sum(int(p.metadata[key]) for p in parts)
        metadata["counts"] = counts
        metadata["shard"] = [0, 1]
        metadata["combined_from"] = [str(p.path) for p in parts]
        metadata["inputs"] = sorted({i for p in parts for i in p.metadata.get("inputs", [])})
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedDataset(out_dir)


def _concat_npy(dest: Path, arrays: list[np.ndarray], offsets: bool) -> None:
    """Concatenate 1-D arrays into one .npy; offset arrays (starting at 0) are shifted and de-duplicated."""
    if offsets:
        total = 1 + sum(len(a) - 1 for a in arrays)
    else:
        total = sum(len(a) for a in arrays)
    out = np.lib.format.open_memmap(dest, mode="w+", dtype=arrays[0].dtype, shape=(total,))
    at, base = 0, 0
    if offsets:
        out[0] = 0
        at = 1
    for a in arrays:
        src = a[1:] if offsets else a
        for lo in range(0, len(src), _CHUNK):
            chunk = np.asarray(src[lo : lo + _CHUNK])
            out[at : at + len(chunk)] = chunk + base if offsets else chunk
            at += len(chunk)
        if offsets:
            base += int(a[-1])
    out.flush()
    del out
