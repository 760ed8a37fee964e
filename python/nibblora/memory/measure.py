"""Measured training memory: the CUDA caching allocator's counters on a GPU, the process's resident set on a CPU.

On CUDA, allocated/reserved/peak are torch.cuda.memory_allocated / memory_reserved / max_memory_allocated.
PyTorch's CPU allocator keeps no statistics, so on a CPU we use the kernel's: resident set size (RSS) now, and its
high-water mark (getrusage ru_maxrss), both minus the RSS measured just before the model was loaded. glibc keeps
freed blocks for reuse, so like CUDA's "reserved" this counts memory the allocator holds, not only live tensors.
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kilobytes, macOS bytes


class MemoryMeter:
    """Start before loading the model; `read()` returns mem_allocated_bytes, mem_reserved_bytes, mem_peak_bytes."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._process = psutil.Process()
        self.baseline = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline = self._process.memory_info().rss

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "process RSS high-water mark (getrusage) minus RSS before the model was loaded"

    def read(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {
                "mem_allocated_bytes": torch.cuda.memory_allocated(self.device),
                "mem_reserved_bytes": torch.cuda.memory_reserved(self.device),
                "mem_peak_bytes": torch.cuda.max_memory_allocated(self.device),
            }
        rss = self._process.memory_info().rss - self.baseline
        return {
            "mem_allocated_bytes": rss,
            "mem_reserved_bytes": rss,
            "mem_peak_bytes": max(rss, _max_rss_bytes() - self.baseline),
        }
