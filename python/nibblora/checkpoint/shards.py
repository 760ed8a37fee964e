"""Writing a checkpoint folder's contents, shared by the offline tools (`nibblora.quantize`, `nibblora.merge`).

Tensors are split greedily into shards of at most a given size, named as transformers names them, with a
`model.safetensors.index.json` when there is more than one. Tokenizer files, generation_config.json, chat
templates and the like are copied from the input folder. Before the folder is moved into place,
`verify_written_checkpoint` reads it back through the same Rust reader every tool reads with, so a file no
reader accepts is never published.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from nibblora.checkpoint.names import CONFIG_FILE, INDEX_FILE
from nibblora.checkpoint.reader import open_checkpoint
from nibblora.errors import CheckpointError, ExportError

if TYPE_CHECKING:  # the writer imports torch; parse_size and friends do not need it
    from nibblora.checkpoint.writer import DeferredSpec, SafetensorsWriter, TensorSpec

# Weight formats next to the safetensors that would be stale in the output folder.
_STALE_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def parse_size(size: int | str) -> int:
    """Bytes from 2000000000, "2GB" (10**9) or "2GiB" (2**30), as transformers' max_shard_size reads them."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if not match:
            raise ExportError(f"cannot read size {size!r}: use bytes or a number with KB, MB, GB, GiB, ...")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()
        powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        powers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        value = int(number * powers[unit])
    if value <= 0:
        raise ExportError(f"max shard size must be positive, got {size!r}")
    return value


class Sized(Protocol):
    @property
    def planned_bytes(self) -> int: ...


ItemT = TypeVar("ItemT", bound=Sized)


def split_shards(items: Sequence[ItemT], max_shard_bytes: int) -> list[list[ItemT]]:
    """Greedy, in reading order; an item's tensors stay together; an oversized item gets its own shard."""
    shards: list[list[ItemT]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.planned_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.planned_bytes
    return shards


def write_index(folder: Path, shard_tensors: dict[str, list[str]], total_size: int, total_parameters: int) -> None:
    """model.safetensors.index.json for more than one shard (nothing for a single file)."""
    if len(shard_tensors) <= 1:
        return
    weight_map = {name: file for file, names in shard_tensors.items() for name in names}
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_config(folder: Path, config: dict[str, object]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_side_files(model_dir: Path, folder: Path) -> None:
    """Tokenizer files, generation_config.json, chat templates, README...: every plain file but the weights."""
    for path in sorted(model_dir.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name == CONFIG_FILE:
            continue
        if name.endswith(_STALE_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        shutil.copy2(path, folder / name)


def verify_written_checkpoint(folder: Path, expected: Mapping[str, tuple[str, Sequence[int]]]) -> None:
    """Read a freshly written checkpoint folder back through the Rust reader (config.json, index, every shard's
    header) and check it holds exactly the `expected` {name: (dtype, shape)} tensors. An ExportError here is a
    bug in the writer, caught before the folder is moved into place."""
    try:
        with open_checkpoint(folder) as ckpt:
            got = {name: (e.dtype, tuple(e.shape)) for name, e in ckpt.entries.items()}
    except CheckpointError as err:
        raise ExportError(f"checking the written output: {err} (a nibblora bug: please report it)") from None
    want = {name: (dtype, tuple(shape)) for name, (dtype, shape) in expected.items()}
    if got != want:
        wrong = sorted(set(got) ^ set(want)) or sorted(n for n in got if got[n] != want[n])
        raise ExportError(
            f"checking the written output: {len(wrong)} tensors differ from the plan, e.g. {wrong[:3]} "
            "(a nibblora bug: please report it)"
        )


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None  # not glibc


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Without it, glibc's adaptive mmap threshold puts tensors
    of tens of MB on the heap once one such tensor has been freed, and the heap only grows: a 0.8B model then
    peaks 700 MB higher. With it, the peak stays near the largest tensor."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ShardItem(Protocol):
    """What `write_shards` needs of an item: its output tensors and its input size (for the progress bar)."""

    specs: list[TensorSpec]
    deferred: list[DeferredSpec]

    @property
    def source(self) -> Any: ...  # anything with .nbytes


@dataclass
class WrittenShards:
    shard_tensors: dict[str, list[str]] = field(default_factory=dict)  # shard file -> tensor names
    nbytes: int = 0  # tensor bytes written, headers excluded
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)


def write_shards(
    folder: Path,
    shards: Sequence[Sequence[ShardItem]],
    names: Sequence[str],
    prepare: Callable[[Any], Callable[[SafetensorsWriter], None]],
    *,
    desc: str,
    progress: bool,
) -> WrittenShards:
    """Write every shard. `prepare(item)` does the item's reading and computing now and returns what is left:
    writing it. Writing runs on one background thread, one item behind, so the disk works while the next item
    is computed; at most one finished item waits in memory. A progress bar (tqdm, stderr) counts input bytes."""
    from tqdm.auto import tqdm

    from nibblora.checkpoint.writer import SafetensorsWriter

    written = WrittenShards()
    total = sum(i.source.nbytes for shard in shards for i in shard)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="nibblora-write") as pool:
        for items, name in zip(shards, names, strict=True):
            specs = [s for i in items for s in i.specs]
            deferred = [d for i in items for d in i.deferred]
            with SafetensorsWriter(folder / name, specs, deferred=deferred, metadata={"format": "pt"}) as writer:
                pending: Future[None] | None = None
                try:
                    for item in items:
                        job = prepare(item)
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(job, writer)
                        bar.update(item.source.nbytes)
                finally:
                    if pending is not None:
                        pending.result()
            written.shard_tensors[name] = writer.names
            written.nbytes += sum(s.nbytes for s in specs) + writer.deferred_nbytes
            written.tensors.update(writer.final_shapes())
    return written
