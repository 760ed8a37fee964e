"""`qlora-tui`: a terminal dashboard for training runs and GPU memory (Textual), and `--once` for scripts.

    qlora-tui runs/            # the job list; Enter opens a job; n starts one, s stops one, c compares two
    qlora-tui --once runs/     # a plain-text summary

The app and its pieces (for tests and for embedding): `QloraTUI`, `JobIndex` / `RunSeries` (incremental reads of
the run stores), `HardwareMonitor` (NVML, torch.cuda, psutil), `render_plot` (braille line plots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nibblora._lazy import lazy_exports
from nibblora.tui.cli import main

if TYPE_CHECKING:
    from nibblora.tui.app import QloraTUI
    from nibblora.tui.hardware import GpuReading, HardwareMonitor, HardwareSnapshot, SystemReading
    from nibblora.tui.jobs import Job, JobIndex, RunSeries
    from nibblora.tui.plot import Series, render_plot

# Only the command line loads at once: the console script must start (and say what is missing) even without the
# [tui] extra, and `--once` never loads Textual.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "QloraTUI": "nibblora.tui.app",
        **dict.fromkeys(
            ("GpuReading", "HardwareMonitor", "HardwareSnapshot", "SystemReading"), "nibblora.tui.hardware"
        ),
        **dict.fromkeys(("Job", "JobIndex", "RunSeries"), "nibblora.tui.jobs"),
        **dict.fromkeys(("Series", "render_plot"), "nibblora.tui.plot"),
    },
)

__all__ = [
    "GpuReading",
    "HardwareMonitor",
    "HardwareSnapshot",
    "Job",
    "JobIndex",
    "QloraTUI",
    "RunSeries",
    "Series",
    "SystemReading",
    "main",
    "render_plot",
]
