"""Activation offloading: with gradient checkpointing, each decoder layer's checkpointed input waits in host memory
between its forward and its backward instead of on the device.

    model.gradient_checkpointing_enable()
    model.model.offload_activations = True           # the trainer: model.offload_activations = true

Checkpointing keeps one tensor per layer, its input x [batch, seq, hidden]; the rest is recomputed in backward.
LlamaModel.forward runs each checkpoint call inside `layer_input(x, i)`, a saved_tensors_hooks context that sees
what checkpoint saves for the recomputation (x, RoPE's cos and sin, the mask) and takes x alone: cos, sin and the
mask are shared by every layer, parameters are never saved there, and what the layer itself saves is held by
checkpoint's own, inner hooks (only the innermost hooks run). The last layer is not checkpointed (its backward
comes first, right after the loss), so it keeps its activations on the device.

On CUDA, copies run on a side stream so the compute stream never waits for them:
- forward: the side stream waits for the compute stream (x is written there), copies x into a pinned buffer, and
  x.record_stream(side) keeps x's device memory from being reused before that copy ends;
- backward: when a layer's input is unpacked (its recomputation starts), the input of the layer before it is
  prefetched on the side stream into memory allocated on the compute stream, so it arrives while this layer's
  backward runs; the compute stream waits on the copy's event before using it, and record_stream(side) keeps the
  block from being reused before the copy ends if it is never used. The gradient reaching the last layer's output
  (its backward starting) prefetches the first offloaded one. About two inputs are on the device at a time: the
  one in use and the next.
- pool: pinned buffers are allocated when first needed and reused by every later step; a buffer returns to the
  pool when autograd frees what it saved (after that layer's backward), and the pool grows only when a longer
  batch needs more bytes than any free buffer holds. Every access to a pinned buffer is a copy on the one side
  stream, so stream order keeps a reused buffer from being overwritten before its last copy has run.

On a CPU the same steps run as plain synchronous copies into a pool of ordinary host buffers (no streams, events or
pinning). That saves nothing (host memory is the device memory there) and costs a copy each way; it exists so the
CPU tests exercise what the CUDA path does: which tensors move, prefetch order, pool reuse and growth, and
bit-identical gradients.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch


class HostBufferPool:
    """Host byte buffers (uint8, pinned for CUDA copies) reused across steps.

    acquire(n) hands out the smallest free buffer of at least n bytes. When none is big enough a new one is
    allocated, replacing the largest free (too small) buffer if there is one, so the pool grows only with the batch
    and never holds more buffers than were ever in use at once. Buffers come back through release(), from
    whichever thread autograd frees them on (hence the lock).
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.buffers = 0  # held now, free or handed out
        self.capacity_bytes = 0  # their bytes
        self.allocations = 0  # buffers ever allocated: a step that only reuses the pool adds none

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes` bytes, to be given back with release()."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
            if self._free:
                # Grow: a free buffer too small for this batch is swapped for a bigger one.
                dropped = self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].numel()))
                self.buffers -= 1
                self.capacity_bytes -= dropped.numel()
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self.buffers += 1
            self.capacity_bytes += nbytes
            self.allocations += 1
            return buffer

    def release(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)

    @property
    def in_use(self) -> int:
        """Buffers handed out and not yet released (offloaded inputs whose backward has not run)."""
        with self._lock:
            return self.buffers - len(self._free)


class ActivationOffloader:
    """A model's offloading state, kept across steps: the host buffer pool, the side stream per CUDA device, and
    counts of what was moved (`offloaded`: inputs copied to the host, `prefetched`: brought back ahead of their
    backward), which the tests read."""

    def __init__(self) -> None:
        self.pool: HostBufferPool | None = None
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.offloaded = 0
        self.prefetched = 0

    def forward_pass(self, num_layers: int) -> OffloadedForward:
        """The hooks for one forward through `num_layers` checkpointed layers."""
        return OffloadedForward(self, num_layers)

    def pool_for(self, device: torch.device) -> HostBufferPool:
        pin = device.type == "cuda"
        if self.pool is None or self.pool.pin != pin:
            self.pool = HostBufferPool(pin)
        return self.pool

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]


class NoOffload:
    """What LlamaModel.forward uses when offloading is off: every layer_input() does nothing."""

    def layer_input(self, x: torch.Tensor, index: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def last_layer_output(self, y: torch.Tensor) -> None:
        pass


NO_OFFLOAD = NoOffload()


class OffloadedForward:
    """One forward pass: the most recently offloaded input (the next to prefetch)."""

    def __init__(self, offloader: ActivationOffloader, num_layers: int) -> None:
        self.offloader = offloader
        self._latest: weakref.ref[OffloadedInput] | None = None

    @contextlib.contextmanager
    def layer_input(self, x: torch.Tensor, index: int) -> Iterator[None]:
        """Around `checkpoint(layer, x, ...)` for layer `index` (never the last, which is not checkpointed): x, when
        checkpoint saves it, is offloaded; any other saved tensor is kept as it is."""
        # Autograd keeps the hooks as long as the graph: a strong reference to x here would keep x on the device.
        layer_input = weakref.ref(x)
        del x

        def pack(saved: torch.Tensor) -> object:
            x = layer_input()
            if x is None or not _same_tensor(saved, x):
                return saved  # cos, sin, the mask
            offloaded = OffloadedInput(self.offloader, saved, self._latest)
            self._latest = weakref.ref(offloaded)
            return offloaded

        def unpack(packed: object) -> torch.Tensor:
            return packed.unpack() if isinstance(packed, OffloadedInput) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def last_layer_output(self, y: torch.Tensor) -> None:
        """The last layer keeps its activations (it is not checkpointed). When its gradient arrives, its backward
        starts: prefetch the input offloaded last, so it is back by the time that layer's recomputation needs it."""
        if y.requires_grad:
            latest = self._latest
            y.register_hook(lambda grad: _prefetch(latest))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.data_ptr() == b.data_ptr()
    )


def _prefetch(ref: weakref.ref[OffloadedInput] | None) -> None:
    offloaded = ref() if ref is not None else None
    if offloaded is not None and offloaded.fetch():
        offloaded.offloader.prefetched += 1


class OffloadedInput:
    """What autograd keeps for one offloaded layer input: its host copy (a view of a pool buffer, returned to the
    pool when autograd drops this object) and, once fetched, the device tensor coming back and its copy's event."""

    def __init__(
        self, offloader: ActivationOffloader, x: torch.Tensor, previous: weakref.ref[OffloadedInput] | None
    ) -> None:
        self.offloader, self.previous = offloader, previous
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        nbytes = x.numel() * x.element_size()
        pool = offloader.pool_for(x.device)
        buffer = pool.acquire(nbytes)
        weakref.finalize(self, pool.release, buffer)
        self.host = buffer[:nbytes].view(x.dtype).view(x.shape)
        self._fetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        x = x.detach()  # a copy, not an op autograd should record
        if x.is_cuda:
            compute, side = torch.cuda.current_stream(x.device), offloader.side_stream(x.device)
            side.wait_stream(compute)  # x is written by work queued on the compute stream
            with torch.cuda.stream(side):
                self.host.copy_(x, non_blocking=True)
            x.record_stream(side)  # x's memory is not reused before the copy has read it
        else:
            self.host.copy_(x)
        offloader.offloaded += 1

    def fetch(self) -> bool:
        """Start bringing the input back to its device (a no-op if already started). True if this call started it."""
        if self._fetched is not None:
            return False
        if self.device.type == "cuda":
            compute, side = torch.cuda.current_stream(self.device), self.offloader.side_stream(self.device)
            tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # from the compute stream's pool
            side.wait_stream(compute)  # the block's previous users, queued on the compute stream, are done first
            with torch.cuda.stream(side):
                tensor.copy_(self.host, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            tensor.record_stream(side)  # freed unused (graph dropped): not reused before the copy lands
            self._fetched = (tensor, copied)
        else:
            self._fetched = (self.host.clone(), None)
        return True

    def unpack(self) -> torch.Tensor:
        self.fetch()
        tensor, copied = self._fetched
        # Handed over: a second backward through this graph (retain_graph) fetches again from the host copy.
        self._fetched = None
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        _prefetch(self.previous)  # the next layer back: its copy overlaps this layer's backward
        return tensor
