"""The command line: `qlora-tui [RUNS_DIR]` (the dashboard) and `qlora-tui --once [RUNS_DIR]` (plain text)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-tui",
        description="Watch training runs (every runs.sqlite under RUNS_DIR) and GPU memory; see docs/tui.md.",
    )
    parser.add_argument("runs_dir", nargs="?", default="runs", help="directory holding run output dirs (default: runs)")
    parser.add_argument("--once", "-1", action="store_true", help="print a plain-text summary and exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads of the run stores")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if args.once:
        from nibblora.tui.hardware import HardwareMonitor
        from nibblora.tui.jobs import JobIndex
        from nibblora.tui.text import summary

        if not runs_dir.is_dir():
            print(f"qlora-tui: error: {runs_dir} is not a directory", file=sys.stderr)
            return 2
        jobs = JobIndex(runs_dir).poll()
        monitor = HardwareMonitor()
        try:
            monitor.read()  # psutil's CPU share is measured between two reads
            time.sleep(0.25)
            print(summary(jobs, monitor.read(), str(runs_dir)))
        finally:
            monitor.close()
        return 0
    from nibblora.tui.app import QloraTUI

    QloraTUI(runs_dir, poll_seconds=max(args.interval, 0.1)).run()
    return 0
