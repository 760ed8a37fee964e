"""A streaming safetensors writer (part of nibblora.checkpoint): the layout is planned up front, then each
tensor's bytes go straight to disk.

    specs = [TensorSpec("a", "BF16", (4096, 4096)), TensorSpec("b", "U8", (8388608, 1))]
    with SafetensorsWriter(path, specs, deferred=[DeferredSpec("meta", "U8", max_numel=256)]) as out:
        out.write("b", packed)          # any order, each tensor once, at its planned offset
        out.write("a", weight)
        out.write("meta", small)        # deferred tensors are kept (they must be small) and written at close

Nothing holds a whole file in memory: a planned tensor is written the moment it is handed over. The layout is
the one `safetensors.torch.save_file` produces (tensors sorted by dtype alignment, largest first, then by name;
the header padded with spaces to a multiple of 8), so every multi-byte tensor is aligned. Deferred tensors are
for the few whose length is only known once computed (bitsandbytes' JSON quant state holds a float): they go
at the end of the data, and the header is reserved for their largest size and padded with spaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from nibblora.dtypes import ITEMSIZE, dtype_itemsize, safetensors_dtype, torch_dtype

# Kept importable for callers of the old module: safetensors name -> (torch dtype, bytes per element).
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {}
for _name in ITEMSIZE:
    try:
        SAFETENSORS_DTYPES[_name] = (torch_dtype(_name), ITEMSIZE[_name])
    except ValueError:
        pass  # an old torch without this dtype


@dataclass(frozen=True)
class TensorSpec:
    """A tensor whose dtype (safetensors spelling, e.g. "BF16") and shape are known before it is computed."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * dtype_itemsize(self.dtype)


@dataclass(frozen=True)
class DeferredSpec:
    """A small 1-D tensor whose length (at most `max_numel`) is only known when it is written."""

    name: str
    dtype: str
    max_numel: int

    @property
    def max_nbytes(self) -> int:
        return self.max_numel * dtype_itemsize(self.dtype)


def _header_bytes(
    entries: Iterable[tuple[str, str, Sequence[int], int, int]], metadata: Mapping[str, str] | None
) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def _pad8(n: int) -> int:
    return n + (-n % 8)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors were all declared at construction.

    `write(name, tensor)` puts a tensor's bytes at its planned offset; `copy_from(name, source, offset)` copies
    them from an open file without loading them. `close()` checks that every tensor arrived, then writes the
    deferred tensors and the final header. Leaving the `with` block on an exception deletes the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tensors: Sequence[TensorSpec],
        *,
        deferred: Sequence[DeferredSpec] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        names = [t.name for t in tensors] + [d.name for d in deferred]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"tensor names repeat: {dup[:5]}")
        if "__metadata__" in names:
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        for name in names:
            # The header must be valid UTF-8 JSON that every reader accepts: a lone surrogate would be written
            # as an escape that safetensors (and nibblora's own reader) refuse.
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"tensor name {name!r} is not valid Unicode (a lone surrogate)") from None
        for spec in tensors:
            dtype_itemsize(spec.dtype)
            if any(d < 0 for d in spec.shape):
                raise ValueError(f"{spec.name}: negative dimension in shape {spec.shape}")
        if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata maps strings to strings")
        self.path = Path(path)
        self._metadata = dict(metadata) if metadata else None
        # safetensors' own order: alignment descending, then name; deferred tensors go last.
        ordered = sorted(tensors, key=lambda t: (-dtype_itemsize(t.dtype), t.name))
        self._specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        cursor = 0
        for spec in ordered:
            self._specs[spec.name] = spec
            self._offsets[spec.name] = (cursor, cursor + spec.nbytes)
            cursor += spec.nbytes
        self._fixed_end = cursor
        self._deferred = {d.name: d for d in sorted(deferred, key=lambda d: d.name)}
        self._deferred_values: dict[str, torch.Tensor] = {}
        # Reserve the header for the largest deferred sizes: every number in the final header is at most the
        # reserved one, so the final header (padded with spaces) always fits in the reserved length.
        reserved = _header_bytes(self._entries(final=False), self._metadata)
        self._header_len = _pad8(len(reserved))
        self._data_start = 8 + self._header_len
        self._written: set[str] = set()
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()/abort()

    def _entries(self, final: bool) -> list[tuple[str, str, Sequence[int], int, int]]:
        entries = [(s.name, s.dtype, s.shape, *self._offsets[s.name]) for s in self._specs.values()]
        cursor = self._fixed_end
        for d in self._deferred.values():
            numel = self._deferred_values[d.name].numel() if final else d.max_numel
            nbytes = numel * dtype_itemsize(d.dtype)
            entries.append((d.name, d.dtype, (numel,), cursor, cursor + nbytes))
            cursor += nbytes
        return entries

    @property
    def names(self) -> list[str]:
        return list(self._specs) + list(self._deferred)

    def final_shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{name: (dtype, shape)} of every tensor as the finished file's header states it (after close)."""
        shapes = {s.name: (s.dtype, tuple(s.shape)) for s in self._specs.values()}
        for name, d in self._deferred.items():
            if name in self._deferred_values:
                shapes[name] = (d.dtype, (self._deferred_values[name].numel(),))
        return shapes

    @property
    def deferred_nbytes(self) -> int:
        """Bytes of the deferred tensors written so far."""
        return sum(t.numel() * t.element_size() for t in self._deferred_values.values())

    @property
    def pending(self) -> list[str]:
        """Names not yet written."""
        return [n for n in self._specs if n not in self._written] + [
            n for n in self._deferred if n not in self._deferred_values
        ]

    def _claim(self, name: str) -> TensorSpec:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if name in self._written or name in self._deferred_values:
            raise ValueError(f"{name}: written twice")
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"{name}: not planned for {self.path.name}")
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` (CPU; dtype and shape exactly as planned) at its place in the file."""
        if name in self._deferred:
            self._write_deferred(name, tensor)
            return
        spec = self._claim(name)
        dtype = safetensors_dtype(tensor.dtype)
        if dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
            raise ValueError(f"{name}: planned {spec.dtype} {list(spec.shape)}, got {dtype} {list(tensor.shape)}")
        assert self._file is not None
        self._file.seek(self._data_start + self._offsets[name][0])
        if spec.nbytes:
            # A byte view of the tensor's memory: no copy for a contiguous tensor.
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.write(memoryview(raw))
        self._written.add(name)

    def copy_from(self, name: str, source: BinaryIO, offset: int, chunk_bytes: int = 64 << 20) -> None:
        """Copy tensor `name`'s bytes from `source` starting at byte `offset`, without loading the tensor:
        in the kernel (copy_file_range) where it can, else in chunks of `chunk_bytes`.

        The caller vouches that those bytes hold a tensor of the planned dtype and shape.
        """
        spec = self._claim(name)
        assert self._file is not None
        self._file.flush()
        src, dst = offset, self._data_start + self._offsets[name][0]
        remaining = spec.nbytes
        if hasattr(os, "copy_file_range"):
            try:
                while remaining:
                    done = os.copy_file_range(source.fileno(), self._file.fileno(), remaining, src, dst)
                    if done == 0:
                        raise ValueError(f"{name}: source ended {remaining} bytes early")
                    src, dst, remaining = src + done, dst + done, remaining - done
            except OSError:
                pass  # not supported between these files: fall back to reading and writing
        self._file.seek(dst)
        source.seek(src)
        while remaining:
            chunk = source.read(min(chunk_bytes, remaining))
            if not chunk:
                raise ValueError(f"{name}: source ended {remaining} bytes early")
            self._file.write(chunk)
            remaining -= len(chunk)
        self._written.add(name)

    def _write_deferred(self, name: str, tensor: torch.Tensor) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if name in self._deferred_values:
            raise ValueError(f"{name}: written twice")
        spec = self._deferred[name]
        dtype = safetensors_dtype(tensor.dtype)
        if dtype != spec.dtype or tensor.dim() != 1 or tensor.numel() > spec.max_numel:
            raise ValueError(
                f"{name}: planned 1-D {spec.dtype} of at most {spec.max_numel} elements, "
                f"got {dtype} {list(tensor.shape)}"
            )
        self._deferred_values[name] = tensor.detach().cpu().contiguous().clone()

    def close(self) -> None:
        """Finish the file: deferred tensors, then the header. Raises if a planned tensor was never written."""
        if self._file is None:
            return
        missing = self.pending
        if missing:
            self.abort()
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{self.path.name}: closed before {len(missing)} planned tensors were written: {shown}")
        f = self._file
        f.seek(self._data_start + self._fixed_end)
        for name in self._deferred:
            f.write(memoryview(self._deferred_values[name].view(torch.uint8).numpy()))
        f.truncate()
        header = _header_bytes(self._entries(final=True), self._metadata)
        assert len(header) <= self._header_len
        f.seek(0)
        f.write(self._header_len.to_bytes(8, "little"))
        f.write(header + b" " * (self._header_len - len(header)))
        f.close()
        self._file = None

    def abort(self) -> None:
        """Close and delete the partial file."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # flushing what is buffered fails again on a full disk; the file is deleted anyway
            self._file = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
