"""bench/bench_serve.py: each cell in its own process with its peak memory; the CUDA memory path's logic on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if not (BENCH / "bench_serve.py").is_file():  # tests copied out of the tree (bench/gpu_check.sh)
    pytest.skip("bench/ is not beside the tests", allow_module_level=True)
sys.path.insert(0, str(BENCH))
import bench_serve  # noqa: E402


def test_cpu_peak_counts_memory_touched_after_start():
    meter = bench_serve.PeakMemory(torch.device("cpu"))
    meter.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so it is resident
    report = meter.report()
    del block
    assert report["peak_bytes"] >= 60 * 2**20
    assert report["host_peak_rss_bytes"] >= report["host_rss_at_start_bytes"] + report["peak_bytes"] - 2**20
    assert "cuda_max_allocated_bytes" not in report


def test_cuda_peak_reads_the_allocator_and_device_in_use(monkeypatch):
    """The CUDA branch, with torch.cuda's calls stood in for: the peak is the allocator's, reset at start."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 141 * 2**30))
    meter = bench_serve.PeakMemory(torch.device("cuda"))
    meter.start()
    assert calls == ["sync", "reset"]
    report = meter.report()
    assert report["peak_bytes"] == report["cuda_max_allocated_bytes"] == 3 * 2**30
    assert report["cuda_max_reserved_bytes"] == 4 * 2**30
    assert report["cuda_in_use_at_end_bytes"] == 41 * 2**30
    assert report["host_peak_rss_bytes"] > 0


def test_plan_runs_merged_once_and_skips_workloads_that_equal_identical():
    args = bench_serve.parse_args(["--quick", "--n", "1", "8"])
    cells = bench_serve.plan_cells(args)
    assert cells[:4] == [(1, "identical", c) for c in ("nibblora", "peft-per-adapter", "peft-mixed", "merged")]
    assert [c for c in cells if c[2] == "merged"] == [(1, "identical", "merged")]
    assert not [c for c in cells if c[0] == 1 and c[1] != "identical"]
    assert len(cells) == 4 + 4 * 3


@pytest.mark.slow
def test_each_cell_runs_in_its_own_process_and_reports_its_peak(tmp_path):
    out = tmp_path / "rows.json"
    tiny = "--hidden 64 --intermediate 96 --layers 1 --heads 2 --kv-heads 2 --vocab 128 --rank 4 --max-loras 2"
    command = [
        sys.executable,
        str(BENCH / "bench_serve.py"),
        *tiny.split(),
        *"--requests 6 --n 3 --workloads identical distinct --contenders nibblora".split(),
        *"--prompt-len 2 5 --output-len 1 3 --batch 4 --threads 1 --rounds 2 --json".split(),
        str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["contender"], r["workload"], r["n"], r["used"]) for r in rows] == [
        ("nibblora", "identical", 3, 1),
        ("nibblora", "distinct", 3, 3),
    ]
    for row in rows:
        assert row["tok/s"] > 0 and row["tok/cpu-s"] > 0
        assert row["memory"]["peak_bytes"] > 0 and row["memory"]["host_peak_rss_bytes"] > 2**20
    assert proc.stdout.count("[round 2/2]") == 2
