"""Measured training memory: the CUDA caching allocator's counters on a GPU, the C allocator's on a CPU.

On CUDA, allocated/reserved/peak are torch.cuda.memory_allocated / memory_reserved / max_memory_allocated.
PyTorch's CPU tensors come from the C library's malloc, so on a CPU we read malloc's own counters the same way:
"allocated" is the bytes in live allocations (glibc's mallinfo2: in-use arena bytes plus mmapped blocks), and
"reserved" is the process's anonymous resident memory (RssAnon in /proc/self/status), which also holds the freed
blocks glibc keeps for reuse, like CUDA's reserved. Both are taken relative to their values just before the model
was loaded. A sampler thread reads them every 2 ms and keeps the highest, so a short spike between two samples
can be missed. Without glibc (macOS, musl) the resident set size stands in for both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import weakref
from functools import cache

import torch

SAMPLE_SECONDS = 0.002


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@cache
def _mallinfo2():
    """glibc's mallinfo2 (2.33+), or None where there is no such function."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


def _live_malloc_bytes() -> int | None:
    """Bytes in live malloc allocations across all arenas (in-use arena bytes + mmapped blocks), or None."""
    function = _mallinfo2()
    if function is None:
        return None
    info = function()
    return info.uordblks + info.hblkhd


def _anonymous_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # the [tui] extra; only needed where /proc is missing (macOS)
    except ImportError:
        import resource

        # Without psutil the peak resident set is the best stand-in (bytes on macOS, KiB elsewhere).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return psutil.Process().memory_info().rss


class MemoryMeter:
    """Start before loading the model; `read()` returns mem_allocated_bytes, mem_reserved_bytes, mem_peak_bytes."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline = 0
        self._peak = 0
        self._live_baseline = 0
        self._live_peak = 0
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline = self._peak = _anonymous_rss()
            self._live_baseline = self._live_peak = self._live()
            # The thread holds the meter only weakly: a meter nobody stopped still ends its sampler once it is
            # garbage, instead of polling /proc every 2 ms (and taking the GIL) for the rest of the process.
            threading.Thread(
                target=MemoryMeter._sample,
                args=(weakref.ref(self), self._stop),
                name="nibblora-memory-sampler",
                daemon=True,
            ).start()

    @staticmethod
    def _live() -> int:
        live = _live_malloc_bytes()
        return _anonymous_rss() if live is None else live

    @staticmethod
    def _sample(meter_ref: weakref.ref[MemoryMeter], stop: threading.Event) -> None:
        while not stop.wait(SAMPLE_SECONDS):
            meter = meter_ref()
            if meter is None:
                return
            meter._peak = max(meter._peak, _anonymous_rss())
            meter._live_peak = max(meter._live_peak, meter._live())
            del meter

    def stop(self) -> None:
        self._stop.set()

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        if _mallinfo2() is None:
            return "peak anonymous RSS (sampled every 2 ms) minus its value before the model was loaded"
        return "peak bytes in live malloc allocations (mallinfo2, sampled every 2 ms) since before the model loaded"

    def read(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {
                "mem_allocated_bytes": torch.cuda.memory_allocated(self.device),
                "mem_reserved_bytes": torch.cuda.memory_reserved(self.device),
                "mem_peak_bytes": torch.cuda.max_memory_allocated(self.device),
            }
        now, live = _anonymous_rss(), self._live()
        self._peak = max(self._peak, now)
        self._live_peak = max(self._live_peak, live)
        return {
            "mem_allocated_bytes": live - self._live_baseline,
            "mem_reserved_bytes": now - self.baseline,
            "mem_peak_bytes": self._live_peak - self._live_baseline,
        }
