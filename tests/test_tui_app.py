"""The dashboard headless (App.run_test + Pilot): job list, job screen, compare, stop, start, hardware panel."""

import json
import re

import pytest
from helpers_tui import NVMLError, drive, h200, monitor, settle, synthetic_runs, table_rows, trained_runs, utc, wait_for
from textual.widgets import DataTable, RichLog, Static

from nibblora.runs import open_run
from nibblora.tui.app import CompareScreen, ConfirmScreen, JobScreen, QloraTUI, StartJobScreen
from nibblora.tui.widgets import HardwarePanel, PlotPanel


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    return trained_runs(tmp_path_factory)


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    utc(monkeypatch)
    return synthetic_runs(tmp_path / "runs")


def test_job_list_and_job_screen_of_a_real_run(real_root):
    app = QloraTUI(real_root, hardware=monitor())

    async def scenario(pilot):
        assert table_rows(app)[0][1:5] == ["tiny-lora", "lora", "finished", "6/6"]
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, JobScreen))
        await settle(pilot)
        screen = app.screen
        loss = screen.query_one("#loss", PlotPanel)
        assert [s.label for s in loss.series] == ["train", "eval val"]
        assert [len(s.points) for s in loss.series] == [6, 3]
        memory = screen.query_one("#memory", PlotPanel)
        assert [s.label for s in memory.series] == ["peak", "alloc", "est"]
        info = str(screen.query_one("#info", Static).render())
        assert "tiny-lora" in info and "step 6/6" in info and "calculator's estimate" in info
        assert re.search(r"eval val \d+\.\d+ \(exact \d+\.\d%\)", info)  # the real run's exact match
        log = "\n".join(line.text for line in screen.query_one("#log", RichLog).lines)
        assert "step 6/6 loss" in log
        await pilot.press("escape")
        assert not isinstance(app.screen, JobScreen)

    drive(app, scenario)


def test_clicking_a_row_opens_the_job(real_root):
    app = QloraTUI(real_root, hardware=monitor())

    async def scenario(pilot):
        await pilot.click("#jobs", offset=(10, 2))  # the first data row, under the header
        await pilot.click("#jobs", offset=(10, 2))
        await wait_for(pilot, lambda: isinstance(app.screen, JobScreen))

    drive(app, scenario)


def test_sorting_by_keyboard_and_by_clicking_a_header(synthetic):
    app = QloraTUI(synthetic, hardware=monitor())

    async def scenario(pilot):
        names = lambda: [r[1] for r in table_rows(app)]  # noqa: E731
        assert names() == ["llama-lora-r16", "qwen-qlora", "mistral-full", "llama-qlora-r64"]  # by start time
        await pilot.press("r")
        assert names() == ["llama-qlora-r64", "mistral-full", "qwen-qlora", "llama-lora-r16"]
        app.set_sort("loss", False)
        assert names() == ["qwen-qlora", "llama-qlora-r64", "llama-lora-r16", "mistral-full"]
        await pilot.press("o")  # the next column: tok/s
        assert app.sort_column == "tokens_per_s"
        await pilot.click("#jobs", offset=(6, 1))  # the name header (row 0 is the border)
        assert app.sort_column == "name" and names()[0] == "llama-lora-r16"

    drive(app, scenario)


def test_sorting_keeps_the_selected_job_selected(synthetic):
    app = QloraTUI(synthetic, hardware=monitor())

    async def scenario(pilot):
        await pilot.press("down")  # qwen-qlora
        await pilot.press("r")
        table = app.screen.query_one("#jobs", DataTable)
        assert table.get_row_at(table.cursor_row)[1].plain == "qwen-qlora"

    drive(app, scenario)


def test_compare_two_marked_runs(synthetic):
    app = QloraTUI(synthetic, hardware=monitor())

    async def scenario(pilot):
        await pilot.press("c")  # nothing marked: a hint, no screen
        assert not isinstance(app.screen, CompareScreen)
        await pilot.press("space", "space", "c")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen))
        await settle(pilot)
        loss = app.screen.query_one("#loss", PlotPanel)
        assert [s.label for s in loss.series] == ["llama-lora-r16", "qwen-qlora"]
        assert [len(s.points) for s in loss.series] == [100, 40]
        evals = app.screen.query_one("#eval", PlotPanel)
        assert [len(s.points) for s in evals.series] == [20, 8]

    drive(app, scenario)


def test_stop_asks_then_requests_a_graceful_stop(synthetic):
    app = QloraTUI(synthetic, hardware=monitor())
    running = synthetic / "llama-qlora-r64"

    async def scenario(pilot):
        await pilot.press("down", "down", "down")  # the running job
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert not open_run(running).run().stop_requested
        await pilot.press("s", "y")
        await settle(pilot)
        assert open_run(running).run().stop_requested
        await pilot.press("up", "s")  # a failed job cannot be stopped: no dialog
        assert not isinstance(app.screen, ConfirmScreen)

    drive(app, scenario)


def test_start_job_reports_a_bad_config_in_the_dialog(synthetic, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nmode = "qlora"\nmax_stepz = 3\n')
    app = QloraTUI(synthetic, hardware=monitor())

    async def scenario(pilot):
        await pilot.press("n")
        assert isinstance(app.screen, StartJobScreen)
        await pilot.press("enter")
        assert "enter the path" in str(app.screen.query_one("#error").render())
        app.screen.query_one("#config").value = str(bad)
        await pilot.press("enter")
        assert "max_stepz: unknown key" in str(app.screen.query_one("#error").render())
        await pilot.press("escape")
        assert not isinstance(app.screen, StartJobScreen)

    drive(app, scenario)


def test_start_job_runs_the_trainer_and_the_job_appears(real_root, tmp_path):
    """n, a config path, Enter: `python -m nibblora.train CONFIG` runs detached and its run shows up, finished."""
    from helpers_tui import _TRAINED

    rows = [{"input_ids": list(range(3, 13)), "labels": [-100] * 5 + list(range(8, 13))} for _ in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    config = tmp_path / "job.toml"
    config.write_text(f"""output_dir = "{tmp_path / "elsewhere" / "cli-job"}"
[model]
path = "{_TRAINED["model"]}"
dtype = "float32"
gradient_checkpointing = false
[lora]
r = 2
[data]
train = "{data}"
batch_size = 2
[train]
mode = "lora"
max_steps = 2
grad_accum = 1
device = "cpu"
""")
    app = QloraTUI(runs, hardware=monitor(), poll_seconds=0.2)

    async def scenario(pilot):
        await pilot.press("n")
        app.screen.query_one("#config").value = str(config)
        await pilot.press("enter")
        assert not isinstance(app.screen, StartJobScreen)
        [launched] = app.launched
        assert launched.output_dir == (runs / "cli-job").resolve()  # moved under the runs directory
        app.index.rescan_seconds = 0.2
        await wait_for(pilot, lambda: any(j.status == "finished" for j in app.jobs.values()), timeout=90)
        assert table_rows(app)[0][1:5] == ["cli-job", "lora", "finished", "2/2"]

    drive(app, scenario)


def test_hardware_panel_with_no_gpu(synthetic):
    app = QloraTUI(synthetic, hardware=monitor())

    async def scenario(pilot):
        text = str(app.screen.query_one(HardwarePanel).render())
        assert "no GPU" in text and "CPU 12% of 16 cores" in text and "RAM 20.0 GiB / 128.0 GiB" in text

    drive(app, scenario)


def test_hardware_panel_with_a_gpu_whose_fields_raise(synthetic):
    broken = h200(util=NVMLError("Not Supported"), temp=NVMLError("GPU is lost"))
    app = QloraTUI(synthetic, hardware=monitor([h200(), broken]))

    async def scenario(pilot):
        lines = str(app.screen.query_one(HardwarePanel).render()).splitlines()
        assert lines[0].startswith("GPU0 NVIDIA H200  mem 40.0 GiB / 141.0 GiB (28%)  util 87%")
        assert lines[1].startswith("GPU1 NVIDIA H200  mem 40.0 GiB / 141.0 GiB (28%)  util n/a  temp n/a")
        assert lines[2].startswith("CPU 12%")
        assert len(table_rows(app)) == 4  # the rest of the screen is unaffected

    drive(app, scenario)


def test_empty_runs_directory_says_what_to_do(tmp_path):
    app = QloraTUI(tmp_path / "not-yet", hardware=monitor())

    async def scenario(pilot):
        text = str(app.screen.query_one("#empty", Static).render())
        assert "no runs under" in text and "does not exist yet" in text and "Press n" in text

    drive(app, scenario)


def test_screens_follow_a_run_that_keeps_writing(synthetic):
    """New steps appear in the job list and on the open job screen at the next poll, without reopening."""
    from nibblora.runs import RunWriter

    app = QloraTUI(synthetic, hardware=monitor(), poll_seconds=0.1)
    run_dir = synthetic / "llama-qlora-r64"

    async def scenario(pilot):
        writer = RunWriter.open(
            run_dir,
            run_id="llama-qlora-r64",
            name="llama-qlora-r64",
            config={"train": {"mode": "qlora"}},
            total_steps=100,
        )
        try:
            writer.log_metrics(31, {"loss": 1.5, "tokens_per_s": 999.0})
            await wait_for(pilot, lambda: table_rows(app)[3][4] == "31/100")
            assert table_rows(app)[3][5:7] == ["1.5", "999"]
            await pilot.press("down", "down", "down", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, JobScreen))
            await settle(pilot)
            loss = app.screen.query_one("#loss", PlotPanel)
            assert loss.series[0].points[-1] == (31, 1.5)
            writer.log_metrics(32, {"loss": 1.25})
            writer.log("step 32 done")
            await wait_for(pilot, lambda: loss.series[0].points[-1] == (32, 1.25))
            log = app.screen.query_one("#log", RichLog)
            await wait_for(pilot, lambda: any("step 32 done" in line.text for line in log.lines))
        finally:
            writer.finish("finished")
        await wait_for(pilot, lambda: "finished" in str(app.screen.query_one("#info", Static).render()))

    drive(app, scenario)


def test_a_runs_directory_that_cannot_be_read_is_reported_not_fatal(synthetic):
    app = QloraTUI(synthetic, hardware=monitor(), poll_seconds=0.1)

    async def scenario(pilot):
        def refuse(force_rescan=False):
            raise PermissionError("Permission denied: 'runs/secret'")

        app.index.poll = refuse
        await wait_for(pilot, lambda: any("Permission denied" in str(n.message) for n in app._notifications))
        assert app.is_running and len(table_rows(app)) == 4  # what was read before stays

    drive(app, scenario)
