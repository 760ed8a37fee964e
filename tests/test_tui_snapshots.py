"""Snapshots of the main screens (pytest-textual-snapshot) on fixed run stores and a fake one-GPU NVML.
After an intended change of the look: pytest tests/test_tui_snapshots.py --snapshot-update, and review the SVGs."""

import os
from pathlib import Path

import pytest
from helpers_tui import GIB, NVMLError, h200, monitor, settle, synthetic_runs, utc

pytest.importorskip("pytest_textual_snapshot")

from nibblora.tui.app import QloraTUI  # noqa: E402

SIZE = (160, 45)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    utc(monkeypatch)
    monkeypatch.chdir(tmp_path)  # paths on screen read runs/..., not the temporary directory
    synthetic_runs(tmp_path / "runs")
    return Path("runs")


def app_for(runs, gpus):
    return QloraTUI(runs, hardware=monitor(gpus), poll_seconds=60, hardware_seconds=60)


async def _settled(pilot):
    await settle(pilot)


def test_job_list_with_one_gpu(runs, snap_compare):
    # The running job's process (this test) holds 3 GiB on the GPU: the job list's GPU mem column.
    gpus = [h200(procs={os.getpid(): 3 * GIB})]
    assert snap_compare(app_for(runs, gpus), terminal_size=SIZE, run_before=_settled)


def test_job_list_with_no_gpu_and_a_broken_gpu_field(runs, snap_compare):
    # Not a real combination; one screen shows both the n/a fields and the marked rows.
    async def before(pilot):
        await _settled(pilot)
        await pilot.press("space", "space")

    gpus = [h200(util=NVMLError("Not Supported"), power_mw=NVMLError("Unknown"))]
    assert snap_compare(app_for(runs, gpus), terminal_size=SIZE, run_before=before)


def test_job_screen(runs, snap_compare):
    async def before(pilot):
        await _settled(pilot)
        await pilot.press("down", "down", "down", "enter")
        await settle(pilot)

    assert snap_compare(app_for(runs, [h200()]), terminal_size=SIZE, run_before=before)


def test_compare_screen(runs, snap_compare):
    async def before(pilot):
        await _settled(pilot)
        await pilot.press("space", "space", "c")
        await settle(pilot)

    assert snap_compare(app_for(runs, [h200()]), terminal_size=SIZE, run_before=before)
