"""What the machine is doing: GPUs through NVML (nvidia-ml-py), torch.cuda where NVML is missing, CPU and RAM.

    monitor = HardwareMonitor()          # NVML loads lazily; tests pass a fake `nvml` module
    snapshot = monitor.read()            # HardwareSnapshot: gpus (one GpuReading each), cpu, ram, gpu_note

Every NVML field is read on its own: one that raises becomes None (shown as n/a), never an exception.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


@dataclass
class GpuReading:
    """One GPU. Any field the driver would not give is None."""

    index: int
    name: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: dict[int, int] = field(default_factory=dict)  # pid -> GPU memory bytes (when NVML tells)


@dataclass
class SystemReading:
    cpu_percent: float | None
    cpu_count: int | None
    ram_used_bytes: int | None
    ram_total_bytes: int | None


@dataclass
class HardwareSnapshot:
    gpus: list[GpuReading]
    system: SystemReading
    source: str  # "nvml" | "torch.cuda" | "none"
    gpu_note: str = ""  # why there is no GPU reading, in words

    def gpu_memory_by_pid(self) -> dict[int, int]:
        """{pid: GPU memory bytes} summed over every GPU (empty where NVML does not list processes)."""
        out: dict[int, int] = {}
        for gpu in self.gpus:
            for pid, used in gpu.processes.items():
                out[pid] = out.get(pid, 0) + used
        return out


def read_system() -> SystemReading:
    """CPU utilisation since the previous call (psutil) and RAM in use."""
    try:
        cpu = psutil.cpu_percent(interval=None)
    except Exception:
        cpu = None
    try:
        mem = psutil.virtual_memory()
        used, total = mem.total - mem.available, mem.total
    except Exception:
        used = total = None
    return SystemReading(cpu, psutil.cpu_count(), used, total)


def _field(read: Callable[[], object]):
    """One NVML call; any failure (NVMLError_NotSupported, a driver hiccup, a bad value) gives None."""
    try:
        return read()
    except Exception:
        return None


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpus:
    """GPUs through an NVML module (pynvml from nvidia-ml-py, or a fake with the same function names)."""

    def __init__(self, nvml):
        self.nvml = nvml
        nvml.nvmlInit()  # raises where there is no driver; the caller falls back

    def read(self) -> list[GpuReading]:
        nv = self.nvml
        count = nv.nvmlDeviceGetCount()
        gpus = []
        for i in range(count):
            handle = _field(lambda: nv.nvmlDeviceGetHandleByIndex(i))
            if handle is None:
                gpus.append(GpuReading(i))
                continue
            memory = _field(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
            util = _field(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
            power = _field(lambda: nv.nvmlDeviceGetPowerUsage(handle))
            limit = _field(lambda: nv.nvmlDeviceGetEnforcedPowerManagementLimit(handle))
            procs = _field(lambda: nv.nvmlDeviceGetComputeRunningProcesses(handle)) or []
            gpus.append(
                GpuReading(
                    index=i,
                    name=_field(lambda: _text(nv.nvmlDeviceGetName(handle))),
                    memory_used_bytes=_field(lambda: int(memory.used)),
                    memory_total_bytes=_field(lambda: int(memory.total)),
                    utilization_percent=_field(lambda: float(util.gpu)),
                    temperature_c=_field(lambda: float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))),
                    power_w=None if power is None else power / 1000.0,
                    power_limit_w=None if limit is None else limit / 1000.0,
                    processes=_field(lambda: {int(p.pid): int(p.usedGpuMemory or 0) for p in procs}) or {},
                )
            )
        return gpus


# Device nodes a CUDA driver creates on Linux (/dev/dxg: WSL2's GPU bridge). Without any of them torch.cuda
# cannot see a GPU either, and importing torch just to hear so costs seconds of the dashboard's start.
LINUX_GPU_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/dxg")


def cuda_driver_may_exist(platform: str = sys.platform) -> bool:
    """False only where it is certain no CUDA device is visible (Linux without NVIDIA device nodes)."""
    if not platform.startswith("linux"):
        return True
    return any(glob.glob(pattern) for pattern in LINUX_GPU_DEVICE_GLOBS)


def torch_cuda_gpus() -> list[GpuReading]:
    """The fallback without NVML: memory per device from torch.cuda.mem_get_info (no utilisation).
    Imports torch only when a CUDA device may exist (or torch is loaded already)."""
    if "torch" not in sys.modules and not cuda_driver_may_exist():
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        name = _field(lambda: torch.cuda.get_device_name(i))
        info = _field(lambda: torch.cuda.mem_get_info(i))
        free, total = info if info is not None else (None, None)
        used = None if info is None else total - free
        gpus.append(GpuReading(i, name, used, total))
    return gpus


class HardwareMonitor:
    """Reads GPUs (NVML, else torch.cuda), CPU and RAM. Never raises from `read()`.

    nvml: an NVML module; None imports pynvml (nvidia-ml-py) on first use. cuda_fallback: a callable giving
    GpuReadings when NVML is unusable (default torch.cuda). system: a callable giving the SystemReading.
    """

    def __init__(
        self,
        nvml=None,
        cuda_fallback: Callable[[], list[GpuReading]] | None = torch_cuda_gpus,
        system: Callable[[], SystemReading] = read_system,
    ):
        self._nvml_module = nvml
        self._cuda_fallback = cuda_fallback
        self._system = system
        self._nvml: NvmlGpus | None = None
        self._nvml_error: str | None = None
        self._started = False

    def _start(self) -> None:
        self._started = True
        try:
            module = self._nvml_module
            if module is None:
                import pynvml as module  # nvidia-ml-py
            self._nvml = NvmlGpus(module)
        except Exception as err:  # no package, no driver, no GPU
            self._nvml_error = str(err) or type(err).__name__

    def read(self) -> HardwareSnapshot:
        if not self._started:
            self._start()
        try:
            system = self._system()
        except Exception:
            system = SystemReading(None, None, None, None)
        if self._nvml is not None:
            try:
                return HardwareSnapshot(self._nvml.read(), system, "nvml")
            except Exception as err:
                return HardwareSnapshot([], system, "nvml", f"NVML failed: {err}")
        gpus: list[GpuReading] = []
        if self._cuda_fallback is not None:
            gpus = _field(self._cuda_fallback) or []
        if gpus:
            return HardwareSnapshot(gpus, system, "torch.cuda", f"NVML unavailable ({self._nvml_error})")
        return HardwareSnapshot([], system, "none", f"no GPU (NVML: {self._nvml_error})")

    def close(self) -> None:
        if self._nvml is not None:
            _field(self._nvml.nvml.nvmlShutdown)
