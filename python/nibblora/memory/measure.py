"""Measured training memory: the CUDA caching allocator's counters on a GPU, the process's anonymous memory on a CPU.

On CUDA, allocated/reserved/peak are torch.cuda.memory_allocated / memory_reserved / max_memory_allocated.
PyTorch's CPU allocator keeps no statistics, so on a CPU we read the kernel's: the process's anonymous resident
memory (RssAnon in /proc/self/status: heap and mmapped tensors, not the code pages of libtorch that the first
backward pulls in), minus its value just before the model was loaded. A sampler thread reads it every 2 ms and
keeps the highest value, so a short spike between two samples can be missed. glibc keeps freed blocks for reuse,
so like CUDA's "reserved" this counts memory the allocator holds, not only live tensors. Where /proc is missing
(macOS), the resident set size stands in.
"""

from __future__ import annotations

import threading

import psutil
import torch

SAMPLE_SECONDS = 0.002


def _anonymous_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class MemoryMeter:
    """Start before loading the model; `read()` returns mem_allocated_bytes, mem_reserved_bytes, mem_peak_bytes."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline = 0
        self._peak = 0
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline = _anonymous_rss()
            self._peak = self.baseline
            threading.Thread(target=self._sample, name="nibblora-memory-sampler", daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._peak = max(self._peak, _anonymous_rss())

    def stop(self) -> None:
        self._stop.set()

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "peak anonymous RSS (sampled every 2 ms) minus its value before the model was loaded"

    def read(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {
                "mem_allocated_bytes": torch.cuda.memory_allocated(self.device),
                "mem_reserved_bytes": torch.cuda.memory_reserved(self.device),
                "mem_peak_bytes": torch.cuda.max_memory_allocated(self.device),
            }
        now = _anonymous_rss()
        self._peak = max(self._peak, now)
        return {
            "mem_allocated_bytes": now - self.baseline,
            "mem_reserved_bytes": now - self.baseline,
            "mem_peak_bytes": self._peak - self.baseline,
        }
