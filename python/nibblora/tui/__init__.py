"""`qlora-tui`: a terminal dashboard for training runs and GPU memory (Textual), and `--once` for scripts.

    qlora-tui runs/            # the job list; Enter opens a job; n starts one, s stops one, c compares two
    qlora-tui --once runs/     # a plain-text summary

The app and its pieces (for tests and for embedding): `QloraTUI`, `JobIndex` / `RunSeries` (incremental reads of
the run stores), `HardwareMonitor` (NVML, torch.cuda, psutil), `render_plot` (braille line plots).
"""

from nibblora.tui.cli import main
from nibblora.tui.hardware import GpuReading, HardwareMonitor, HardwareSnapshot, SystemReading
from nibblora.tui.jobs import Job, JobIndex, RunSeries
from nibblora.tui.plot import Series, render_plot


def __getattr__(name: str):
    if name == "QloraTUI":  # Textual loads only when the app is wanted (not for --once)
        from nibblora.tui.app import QloraTUI

        return QloraTUI
    raise AttributeError(name)


__all__ = ["GpuReading", "HardwareMonitor", "HardwareSnapshot", "Job", "JobIndex", "QloraTUI", "RunSeries", "Series",
           "SystemReading", "main", "render_plot"]
