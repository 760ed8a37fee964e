"""Start-up benchmark: wall time of the commands a user or script types, each in a fresh interpreter.

    python bench/bench_startup.py [--runs 15] [--warmup 2] [--append docs/benchmarks.md]

Like hyperfine: each command runs `--warmup` times unmeasured (so the page cache holds the files), then `--runs`
times; the median is the result, min and max show the spread. The load average before and after is printed,
since on a shared machine it moves every number. Commands:
- `qlora-tui --once RUNS` over an empty runs folder (the console script's code: `nibblora.tui.main()`),
- `python -m nibblora.prepare --help`,
- `python -c "import nibblora"`, and `python -c "import torch"` as the anchor the first two must stay clear of.
Target: `qlora-tui --once` and `prepare --help` under 1 s on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def commands(runs_dir: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "qlora-tui --once": [
            py,
            "-c",
            "import sys; from nibblora.tui import main; sys.exit(main())",
            "--once",
            runs_dir,
        ],
        "python -m nibblora.prepare --help": [py, "-m", "nibblora.prepare", "--help"],
        "python -c 'import nibblora'": [py, "-c", "import nibblora"],
        "python -c 'import torch' (anchor)": [py, "-c", "import torch"],
    }


def time_command(argv: list[str], runs: int, warmup: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(warmup):
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--append", type=Path, help="append the result table to this markdown file")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for label, argv in commands(runs_dir).items():
            times = time_command(argv, args.runs, args.warmup)
            rows.append((label, statistics.median(times), min(times), max(times)))
            print(f"{label:<36} median {rows[-1][1]:6.3f} s  (min {rows[-1][2]:.3f}, max {rows[-1][3]:.3f})")
    load_after = os.getloadavg()[0]
    cores = os.cpu_count()
    print(f"load average {load_before:.1f} before, {load_after:.1f} after, {cores} cores")

    if args.append:
        lines = [
            "",
            f"{date.today().isoformat()}, median of {args.runs} runs after {args.warmup} warm-ups, {cores} cores, "
            f"load average {load_before:.1f} before and {load_after:.1f} after:",
            "",
            "| command | median | min | max |",
            "| --- | ---: | ---: | ---: |",
            *(f"| `{label}` | {med:.2f} s | {lo:.2f} s | {hi:.2f} s |" for label, med, lo, hi in rows),
            "",
        ]
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
