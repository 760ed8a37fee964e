"""The command line: `qlora-tui [RUNS_DIR]` (the dashboard) and `qlora-tui --once [RUNS_DIR]` (plain text)."""

from __future__ import annotations

import argparse
import importlib.util
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
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="URL",
        help="also watch this nibblora.serve server (repeatable); servers started with --runs-dir "
        "RUNS_DIR are found on their own",
    )
    return parser


# What each mode imports from the [tui] extra (nvidia-ml-py is optional: without it the GPU panel says why).
NEEDED_ONCE = ("psutil",)
NEEDED_APP = ("psutil", "textual")


def missing_packages(names: Sequence[str]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    missing = missing_packages(NEEDED_ONCE if args.once else NEEDED_APP)
    if missing:
        print(
            f"qlora-tui: error: {', '.join(missing)} not installed; install the dashboard's extra: "
            "pip install 'nibblora[tui]'",
            file=sys.stderr,
        )
        return 2
    if args.once:
        from nibblora.tui.hardware import HardwareMonitor
        from nibblora.tui.jobs import JobIndex
        from nibblora.tui.servers import ServerIndex, servers_text
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
        servers = ServerIndex(str(runs_dir), urls=args.server)
        if servers.targets():
            print("\nservers:\n" + servers_text(servers.poll()))
        return 0
    from nibblora.tui.app import QloraTUI

    QloraTUI(runs_dir, poll_seconds=max(args.interval, 0.1), server_urls=args.server).run()
    return 0
