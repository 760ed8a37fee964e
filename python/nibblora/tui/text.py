"""Numbers as the dashboard shows them, and the plain-text summary of `qlora-tui --once`."""

from __future__ import annotations

import time

from nibblora.runs import DB_NAME
from nibblora.tui.hardware import GpuReading, HardwareSnapshot
from nibblora.tui.jobs import Job, attach_gpu_memory

NA = "n/a"
COLUMNS = ("name", "method", "status", "step", "loss", "tok/s", "GPU mem", "ETA", "started")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return NA
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def fmt_number(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def fmt_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def fmt_step(job: Job) -> str:
    step = "-" if job.step is None else str(job.step)
    return f"{step}/{job.total_steps}" if job.total_steps else step


def job_cells(job: Job) -> tuple[str, ...]:
    """The job list's cells, in COLUMNS order, as plain strings."""
    tps = "-" if job.tokens_per_s is None else f"{job.tokens_per_s:,.0f}"
    gpu = "-" if job.gpu_memory_bytes is None else fmt_bytes(job.gpu_memory_bytes)
    return (
        job.name,
        job.method,
        job.status,
        fmt_step(job),
        fmt_number(job.loss),
        tps,
        gpu,
        fmt_duration(job.eta_seconds),
        fmt_time(job.info.created_at),
    )


def gpu_line(gpu: GpuReading) -> str:
    used, total = gpu.memory_used_bytes, gpu.memory_total_bytes
    mem = f"{fmt_bytes(used)} / {fmt_bytes(total)}"
    if used is not None and total:
        mem += f" ({100 * used / total:.0f}%)"
    util = NA if gpu.utilization_percent is None else f"{gpu.utilization_percent:.0f}%"
    temp = NA if gpu.temperature_c is None else f"{gpu.temperature_c:.0f}C"
    if gpu.power_w is None:
        power = NA
    else:
        power = f"{gpu.power_w:.0f}" + ("" if gpu.power_limit_w is None else f"/{gpu.power_limit_w:.0f}") + " W"
    return f"GPU{gpu.index} {gpu.name or NA}  mem {mem}  util {util}  temp {temp}  power {power}"


def system_line(snapshot: HardwareSnapshot) -> str:
    s = snapshot.system
    cpu = NA if s.cpu_percent is None else f"{s.cpu_percent:.0f}%"
    cores = "" if s.cpu_count is None else f" of {s.cpu_count} cores"
    return f"CPU {cpu}{cores}  RAM {fmt_bytes(s.ram_used_bytes)} / {fmt_bytes(s.ram_total_bytes)}"


def hardware_lines(snapshot: HardwareSnapshot) -> list[str]:
    lines = [gpu_line(g) for g in snapshot.gpus]
    if not snapshot.gpus:
        lines.append(snapshot.gpu_note or "no GPU")
    elif snapshot.source != "nvml":
        lines.append(f"(through {snapshot.source}: {snapshot.gpu_note})")
    lines.append(system_line(snapshot))
    return lines


def unreadable_lines(jobs: list[Job]) -> list[str]:
    """One line per run store that could not be read: its folder and why."""
    return [f"unreadable: {job.info.run_dir / DB_NAME}: {job.error}" for job in jobs if job.error is not None]


def summary(jobs: list[Job], snapshot: HardwareSnapshot | None, root: str) -> str:
    """The `--once` text: a fixed-width job table, a line for each unreadable run store, then the hardware lines."""
    if snapshot is not None:
        attach_gpu_memory(jobs, snapshot.gpu_memory_by_pid())
    rows = [COLUMNS] + [job_cells(j) for j in sorted(jobs, key=lambda j: j.info.created_at)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [f"runs under {root}: {len(jobs)}"]
    if jobs:
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += unreadable_lines(jobs)
    if snapshot is not None:
        lines += [""] + hardware_lines(snapshot)
    return "\n".join(lines)
