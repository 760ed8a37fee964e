"""Batched heterogeneous LoRA: the base projection once for the whole batch, each token's own adapter on top.

Two ways to add the low-rank terms of a batch whose tokens belong to different adapters (and some to none):

- segment (Punica's SGMV): the tokens are laid out sorted by adapter slot, so each adapter owns one contiguous
  segment; per segment, `y[s:e] += scaling * (x[s:e] @ A[:r].T) @ B[:r]` at that adapter's OWN rank r. No FLOP
  is spent on padding; the cost is one pair of small matmuls (and a Python iteration) per segment.
- gathered (Punica's BGMV): each token row gathers its own adapter's A and B (padded only to the largest rank
  among the adapters of THIS batch, not to the slot size) and one batched matmul pair does every row at once.
  The cost is one gather + two bmm per module whatever the number of adapters: it can win for decode steps
  (one row per sequence, many distinct adapters), where per-segment overhead dominates.

- native (CPU, float32): the segment layout done by one Rust call per module (`nibblora._native.
  add_lora_segments`, GIL released): every segment at its own rank, tokens four at a time, AVX2/FMA where the CPU
  has it. Its cost does not grow with the number of segments the way a Python loop of small matmuls does, which
  is what made CPU throughput fall as a batch held more distinct adapters.

Which is cheaper depends on the shape (tokens, segments) and the machine, so `KernelChooser` times the candidates
on the real slot tensors the first time a shape bucket is seen and keeps the winner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

KERNELS = ("auto", "segment", "gathered", "native")
_NUMPY_DTYPES = (torch.float32, torch.float64)  # numpy has no bfloat16


def _native_kernel():
    """The Rust batched-LoRA function, or None when the built extension predates it."""
    from nibblora import _native

    return getattr(_native, "add_lora_segments", None)


@dataclass
class LoRASlots:
    """Device-resident adapters of one linear module, in `num_slots` slots padded to `max_rank`.

    lora_A: [S, r_max, in]; lora_Bt: [S, r_max, out] (B transposed, so a slot's first r rows are B.T);
    rows past a slot's rank are always zero. ranks: the true rank per slot (0: the adapter does not adapt this
    module), as a list and as int64 [S] (`rank_tensor`). scaling: float [S] on the device (0 where rank is 0), plus
    the same values as Python floats.
    """

    lora_A: torch.Tensor
    lora_Bt: torch.Tensor
    scaling: torch.Tensor
    ranks: list[int] = field(default_factory=list)
    scaling_list: list[float] = field(default_factory=list)
    # Per slot: (A[:r].T [in, r], B.T [r, out], scaling) views for the segment path, made on first use.
    views: list[tuple[torch.Tensor, torch.Tensor, float] | None] = field(default_factory=list)
    rank_tensor: torch.Tensor | None = None
    # CPU: flat numpy views of (lora_A, lora_Bt, rank_tensor, scaling) for the native kernel (no copy).
    _flat: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def empty(
        cls,
        num_slots: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> LoRASlots:
        return cls(
            torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device),
            torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device),
            torch.zeros(num_slots, dtype=dtype, device=device),
            [0] * num_slots,
            [0.0] * num_slots,
            [None] * num_slots,
            torch.zeros(num_slots, dtype=torch.long, device=device),
        )

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    def native_ok(self) -> bool:
        """Whether the Rust kernel can run on these slots (CPU, float32, and an extension that has it)."""
        return self.lora_A.device.type == "cpu" and self.lora_A.dtype == torch.float32 and _native_kernel() is not None

    def flat_views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(lora_A, lora_Bt, ranks, scaling) as 1-D numpy views of the slot tensors (CPU only; made once)."""
        if self._flat is None:
            assert self.rank_tensor is not None
            self._flat = (
                self.lora_A.view(-1).numpy(),
                self.lora_Bt.view(-1).numpy(),
                self.rank_tensor.numpy(),
                self.scaling.numpy(),
            )
        return self._flat

    def write(self, slot: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float) -> None:
        """Put one adapter's A [r, in] / B [out, r] (host tensors; B ideally the transposed view of a contiguous
        [r, out] tensor, as adapter_files stores it) into `slot`; None clears the slot.

        Only the rows that change are touched: the new adapter's r rows, and the rows between r and the old
        rank, which are zeroed (rows past every rank are zero already). A slot write is on the path of every
        request whose adapter is not resident, so with many adapters it is paid all the time: on the CPU it goes
        through numpy views of the slot memory (a few microseconds per module, against ~60 through torch's
        indexing and copy_ calls, which made slot writes 4% of a run with 256 adapters)."""
        r = 0 if lora_A is None or lora_B is None else lora_A.shape[0]
        numpy_ok = self._numpy_slots() and (
            r == 0 or (lora_A.dtype in _NUMPY_DTYPES and lora_B.dtype in _NUMPY_DTYPES)  # type: ignore[union-attr]
        )
        if numpy_ok:
            self._write_numpy(slot, lora_A, lora_B, r)
        else:
            self._write_torch(slot, lora_A, lora_B, r)
        value = float(scaling) if r else 0.0
        self.ranks[slot], self.scaling_list[slot] = r, value
        self.views[slot] = None  # made again on first use (segment path)
        self._set_scalars(slot, r, value)

    def view(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A[:r].T [in, r], B.T [r, out], scaling) of a slot, None when it does not adapt this module; made on
        first use after a write and kept."""
        view = self.views[slot]
        r = self.ranks[slot]
        if view is None and r > 0:
            view = (self.lora_A[slot, :r].t(), self.lora_Bt[slot, :r], self.scaling_list[slot])
            self.views[slot] = view
        return view

    def _numpy_slots(self) -> bool:
        return self.lora_A.device.type == "cpu" and self.lora_A.dtype in _NUMPY_DTYPES and self.rank_tensor is not None

    def _write_numpy(self, slot: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, r: int) -> None:
        a_flat, bt_flat, _, _ = self.flat_views()
        r_max, fan_in, fan_out = self.lora_A.shape[1], self.lora_A.shape[2], self.lora_Bt.shape[2]
        a0, b0 = slot * r_max * fan_in, slot * r_max * fan_out
        old = self.ranks[slot]
        if old > r:
            a_flat[a0 + r * fan_in : a0 + old * fan_in] = 0
            bt_flat[b0 + r * fan_out : b0 + old * fan_out] = 0
        if r == 0 or lora_A is None or lora_B is None:
            return
        a_flat[a0 : a0 + r * fan_in] = lora_A.numpy().reshape(-1)
        bt_flat[b0 : b0 + r * fan_out] = lora_B.t().numpy().reshape(-1)  # no copy when B is stored transposed

    def _write_torch(self, slot: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, r: int) -> None:
        non_blocking = self.lora_A.device.type == "cuda"
        old = self.ranks[slot]
        if old > r:
            self.lora_A[slot, r:old].zero_()
            self.lora_Bt[slot, r:old].zero_()
        if r == 0 or lora_A is None or lora_B is None:
            return
        self.lora_A[slot][:r].copy_(lora_A, non_blocking=non_blocking)
        self.lora_Bt[slot][:r].copy_(lora_B.t(), non_blocking=non_blocking)  # a memory copy when B.T is contiguous

    def _set_scalars(self, slot: int, rank: int, scaling: float) -> None:
        if self._numpy_slots():
            # Through numpy views: a torch item assignment costs microseconds each, and this runs per module.
            _, _, ranks, scales = self.flat_views()
            ranks[slot], scales[slot] = rank, scaling
            return
        self.scaling[slot] = scaling
        if self.rank_tensor is not None:
            self.rank_tensor[slot] = rank


@dataclass
class LoRABatch:
    """How the flat tokens [T] of one step map to adapter slots.

    segments: (start, end, slot) for each run of tokens that use an adapter (base-only tokens appear in none).
    token_slots: int64 [T] on the device, the slot of each token or -1 (base only).
    kernel: "segment", "gathered" or "native".
    """

    segments: list[tuple[int, int, int]]
    token_slots: torch.Tensor
    kernel: str = "segment"
    _rows: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None
    _segment_array: np.ndarray | None = None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(token indices that use an adapter [n], their slots [n], the distinct slots), built once per step."""
        if self._rows is None:
            rows = torch.nonzero(self.token_slots >= 0).flatten()
            self._rows = (rows, self.token_slots[rows], sorted({slot for _, _, slot in self.segments}))
        return self._rows

    def segment_array(self) -> np.ndarray:
        """The segments as flat int64 [3 * segments] (start, end, slot), built once per step (native kernel)."""
        if self._segment_array is None:
            self._segment_array = np.array(self.segments, dtype=np.int64).reshape(-1)
        return self._segment_array


def add_lora_segments(y: torch.Tensor, x: torch.Tensor, slots: LoRASlots, batch: LoRABatch) -> None:
    """y [T, out] += each segment's scaling * (x @ A.T) @ B.T at the adapter's own rank (SGMV), in place."""
    whole = len(batch.segments) == 1 and batch.segments[0][0] == 0 and batch.segments[0][1] == x.shape[0]
    for start, end, slot in batch.segments:
        view = slots.view(slot)
        if view is None:  # this adapter does not adapt this module
            continue
        a_t, b_t, scaling = view
        if whole:  # one adapter for the whole batch: no slicing
            y.addmm_(x @ a_t, b_t, alpha=scaling)
        else:
            y[start:end].addmm_(x[start:end] @ a_t, b_t, alpha=scaling)  # [tokens, r] @ [r, out]


def add_lora_gathered(y: torch.Tensor, x: torch.Tensor, slots: LoRASlots, batch: LoRABatch) -> None:
    """y [T, out] += the same update as add_lora_segments, every adapted row at once (BGMV): each row gathers its
    adapter's A / B, padded to the largest rank among this batch's adapters, and two bmm do the rest."""
    rows, row_slots, used = batch.rows()
    rank = max(slots.ranks[s] for s in used)
    if rank == 0:
        return
    a = slots.lora_A[row_slots, :rank]  # [n, r, in]
    bt = slots.lora_Bt[row_slots, :rank]  # [n, r, out]
    xa = torch.bmm(a, x[rows, :, None])  # [n, r, 1]; rows past an adapter's rank are zero in A
    xa = xa * slots.scaling[row_slots][:, None, None]
    y.index_add_(0, rows, torch.bmm(xa.transpose(1, 2), bt)[:, 0])


def add_lora_native(y: torch.Tensor, x: torch.Tensor, slots: LoRASlots, batch: LoRABatch) -> None:
    """y [T, out] += the same update as add_lora_segments, every segment in one Rust call (CPU float32 only)."""
    kernel = _native_kernel()
    assert kernel is not None, "the native LoRA kernel is missing from this build of nibblora._native"
    lora_a, lora_bt, ranks, scaling = slots.flat_views()
    kernel(
        y.view(-1).numpy(),
        x.contiguous().view(-1).numpy(),
        lora_a,
        lora_bt,
        ranks,
        scaling,
        batch.segment_array(),
        slots.max_rank,
        x.shape[1],
        y.shape[1],
    )


KERNEL_FUNCTIONS = {"segment": add_lora_segments, "gathered": add_lora_gathered, "native": add_lora_native}


class BatchedLoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or NF4Linear) plus the LoRA terms of whichever adapters the batch uses.

    forward(x [..., in]) -> [..., out]: `base(x)` once for all tokens, then the current `LoRABatch` (set by the
    engine on the shared `context` before each step) adds the per-token updates. With no batch set, or a batch
    of base-only tokens, it is exactly the base layer.
    """

    def __init__(self, base: nn.Module, slots: LoRASlots, context: LoRAContext) -> None:
        super().__init__()
        self.base = base
        self.slots = slots
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.context.batch
        if batch is None or not batch.segments:
            return y
        shape = y.shape
        y2, x2 = y.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1]).to(y.dtype)
        KERNEL_FUNCTIONS[batch.kernel](y2, x2, self.slots, batch)
        return y2.view(shape)


class LoRAContext:
    """The batch layout every BatchedLoRALinear of one model reads during a forward (set, run, cleared)."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class KernelChooser:
    """Picks the LoRA kernel per step shape by timing the candidates per (tokens, segments) bucket: the first
    time the bucket is seen, and again every `remeasure_every` uses.

    forced: "segment", "gathered" or "native" skips the measurement (tests use it to check each path).
    native: whether the Rust kernel may run (CPU float32 slots and a build that has it); it is then a candidate,
    and forcing "native" without it is an error.
    """

    def __init__(
        self, forced: str = "auto", repeats: int = 5, native: bool = False, remeasure_every: int = 512
    ) -> None:
        if forced not in KERNELS:
            raise ValueError(f"lora kernel must be one of {KERNELS}, got {forced!r}")
        if forced == "native" and not native:
            raise ValueError(
                "lora kernel 'native' runs on the CPU in float32 only, with a nibblora build that has it; "
                "use 'auto', 'segment' or 'gathered'"
            )
        self.forced = forced
        self.repeats = repeats
        self.candidates = ("segment", "gathered", "native") if native else ("segment", "gathered")
        self.choices: dict[tuple[int, int], str] = {}
        # A choice is measured again after this many uses: one measurement taken while a neighbour hogged the
        # machine would otherwise pick the slower kernel for the rest of the server's life.
        self.remeasure_every = remeasure_every
        self._uses: dict[tuple[int, int], int] = {}

    @staticmethod
    def bucket(num_tokens: int, num_segments: int) -> tuple[int, int]:
        """Round up to powers of two so a handful of measurements covers every step shape."""
        return (1 << max(0, (num_tokens - 1).bit_length()), 1 << max(0, (num_segments - 1).bit_length()))

    def choose(self, batch: LoRABatch, probe: LoRASlots | None) -> str:
        if self.forced != "auto":
            return self.forced
        if not batch.segments or probe is None:
            return "segment"
        key = self.bucket(batch.token_slots.shape[0], len(batch.segments))
        choice = self.choices.get(key)
        uses = self._uses.get(key, 0) + 1
        self._uses[key] = uses
        if choice is None or uses % self.remeasure_every == 0:
            choice = self._measure(batch, probe)
            self.choices[key] = choice
        return choice

    def _measure(self, batch: LoRABatch, slots: LoRASlots) -> str:
        """Time the kernels on the real slot tensors at this step's shape; the fastest wins the bucket. The
        candidates take turns within each repeat, so a burst of load from a neighbour hits them alike."""
        num_tokens = batch.token_slots.shape[0]
        x = torch.randn(num_tokens, slots.lora_A.shape[2], dtype=slots.lora_A.dtype, device=slots.lora_A.device)
        y = torch.zeros(num_tokens, slots.lora_Bt.shape[2], dtype=x.dtype, device=x.device)
        best = dict.fromkeys(self.candidates, float("inf"))
        for name in self.candidates:
            KERNEL_FUNCTIONS[name](y, x, slots, batch)  # warm-up (allocator, one-hot)
        _sync(x.device)
        for _ in range(self.repeats):
            for name in self.candidates:
                start = time.perf_counter()
                KERNEL_FUNCTIONS[name](y, x, slots, batch)
                _sync(x.device)
                best[name] = min(best[name], time.perf_counter() - start)
        return min(best, key=best.get)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
