"""Fakes and fixtures for the qlora-tui tests: an NVML module, fixed CPU/RAM, run stores with fixed content,
and a way to drive the app headless from a plain (non-async) test."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

from nibblora.runs import RunWriter
from nibblora.tui.hardware import HardwareMonitor, SystemReading

GIB = 2**30
T0 = 1_714_564_800.0  # 2024-05-01 12:00:00 UTC: fixed times make the snapshots stable


class NVMLError(Exception):
    pass


class FakeNvml:
    """The pynvml functions HardwareMonitor calls. `gpus` is a list of dicts; a value that is an exception
    instance is raised when that field is read. `init_error` makes nvmlInit fail (no driver)."""

    NVML_TEMPERATURE_GPU = 0
    NVMLError = NVMLError

    def __init__(self, gpus: list[dict] | None = None, init_error: Exception | None = None):
        self.gpus = gpus or []
        self.init_error = init_error
        self.shut_down = False

    def _get(self, handle: int, key: str):
        value = self.gpus[handle][key]
        if isinstance(value, Exception):
            raise value
        return value

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self._get(h, "name")

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self._get(h, "used"), total=self._get(h, "total"), free=0)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._get(h, "util"), memory=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._get(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h):
        return self._get(h, "power_mw")

    def nvmlDeviceGetEnforcedPowerManagementLimit(self, h):
        return self._get(h, "limit_mw")

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self._get(h, "procs").items()]


def h200(**fields) -> dict:
    gpu = dict(
        name="NVIDIA H200",
        used=40 * GIB,
        total=141 * GIB,
        util=87,
        temp=61,
        power_mw=512_000,
        limit_mw=700_000,
        procs={},
    )
    gpu.update(fields)
    return gpu


def fixed_system() -> SystemReading:
    return SystemReading(cpu_percent=12.5, cpu_count=16, ram_used_bytes=20 * GIB, ram_total_bytes=128 * GIB)


def monitor(gpus: list[dict] | None = None, init_error: Exception | None = None) -> HardwareMonitor:
    """A HardwareMonitor on a fake NVML (no torch.cuda fallback) with fixed CPU and RAM."""
    if gpus is None and init_error is None:
        init_error = NVMLError("NVML Shared Library Not Found")
    return HardwareMonitor(nvml=FakeNvml(gpus, init_error), cuda_fallback=None, system=fixed_system)


def write_run(
    run_dir: Path,
    name: str,
    mode: str,
    steps: int,
    total: int,
    status: str,
    *,
    start: float = T0,
    seconds_per_step: float = 2.0,
    loss0: float = 3.0,
    eval_every: int = 5,
    peak_gib: float = 6.0,
) -> Path:
    """A run store with smooth synthetic curves and fixed times (for snapshots and sorting tests).
    status 'running' keeps this process's pid, so the run reads as alive while the test runs."""
    writer = RunWriter.open(run_dir, run_id=name, name=name, config={"train": {"mode": mode}}, total_steps=total)
    writer._stop_heartbeat.set()  # no heartbeat thread rewriting times
    writer._heartbeat.join()
    for step in range(1, steps + 1):
        metrics = {
            "loss": loss0 * (0.6 + 0.4 * (1.0 / step) ** 0.5),
            "lr": 2e-4 * min(1.0, step / 3) * (1 - step / (total + 1)),
            "grad_norm": 0.3 + 0.2 * ((step * 7) % 5) / 5,
            "tokens_per_s": 1000.0 + 25 * (step % 4),
            "mem_allocated_bytes": (peak_gib - 1) * GIB,
            "mem_reserved_bytes": peak_gib * GIB,
            "mem_peak_bytes": peak_gib * GIB * min(1.0, 0.8 + 0.05 * step),
            "mem_estimate_bytes": 5.5 * GIB,
        }
        if step % eval_every == 0:
            metrics["eval_val_loss"] = metrics["loss"] + 0.1
        writer.log_metrics(step, metrics)
        writer.log(f"step {step}/{total} loss {metrics['loss']:.4f}")
    if status != "running":
        writer.finish(status, f"{status} at step {steps}", steps)
    else:
        writer.conn.close()
    # Fixed times: step k at start + k * seconds_per_step.
    conn = sqlite3.connect(run_dir / "runs.sqlite")
    with conn:
        conn.execute("UPDATE metrics SET time = ? + step * ?", (start, seconds_per_step))
        conn.execute("UPDATE logs SET time = ? + id * ?", (start, seconds_per_step))
        end = start + steps * seconds_per_step
        conn.execute(
            "UPDATE runs SET created_at=?, updated_at=?, heartbeat_at=?, ended_at=?",
            (start, end, end, None if status == "running" else end),
        )
    conn.close()
    return run_dir


def synthetic_runs(root: Path) -> Path:
    """Four runs, one of each status, under root."""
    write_run(root / "llama-qlora-r64", "llama-qlora-r64", "qlora", 30, 100, "running", start=T0 + 600)
    write_run(root / "llama-lora-r16", "llama-lora-r16", "lora", 100, 100, "finished", loss0=3.3, peak_gib=9.0)
    write_run(root / "mistral-full", "mistral-full", "full", 12, 200, "failed", start=T0 + 300, peak_gib=30.0)
    write_run(root / "qwen-qlora", "qwen-qlora", "qlora", 40, 100, "stopped", start=T0 + 60, loss0=2.8)
    return root


def utc(monkeypatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def drive(app, scenario, size=(160, 45)):
    """Run `scenario(pilot)` (async) against the app headless; returns what it returns."""

    async def main():
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            return await scenario(pilot)

    return asyncio.run(main())


async def settle(pilot) -> None:
    """Let pending reads (worker threads) finish and their results reach the screen."""
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


async def wait_for(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


def table_rows(app) -> list[list[str]]:
    """The job table as plain text, in display order."""
    from textual.widgets import DataTable

    table = app.screen.query_one("#jobs", DataTable)
    return [[str(getattr(c, "plain", c)) for c in table.get_row_at(i)] for i in range(table.row_count)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


_TRAINED: dict[str, Path] = {}


def trained_runs(tmp_path_factory) -> Path:
    """A runs directory with one REAL short training run (tiny Llama, LoRA, 6 steps, eval every 2), made once
    per test session: the trainer writes the store exactly as it would on a real job."""
    if "root" not in _TRAINED:
        from helpers_train import tiny_checkpoint, tiny_config, tiny_rows

        from nibblora.train import train

        base = tmp_path_factory.mktemp("tui-real")
        model = tiny_checkpoint(base / "model")
        root = base / "runs"
        config = tiny_config(
            model, root / "tiny-lora", train={"max_steps": 6}, eval={"every": 2}, checkpoint={"every": 0}
        )
        train(config, tiny_rows(32), {"val": tiny_rows(8, seed=1)}, quiet=True)
        _TRAINED["root"], _TRAINED["model"] = root, model
    return _TRAINED["root"]
