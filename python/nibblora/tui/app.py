"""The Textual app: the job list with the hardware panel, a job's screen, a comparison of two runs, and the
start / stop dialogs. Every read of a run store or of NVML runs in a worker thread; the UI thread only draws."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, RichLog, Static

from nibblora.runs import request_stop
from nibblora.tui.hardware import HardwareMonitor, HardwareSnapshot
from nibblora.tui.jobs import Job, JobIndex, RunSeries, attach_gpu_memory
from nibblora.tui.launch import LaunchedJob, console_tail, find_configs
from nibblora.tui.plot import Series
from nibblora.tui.text import fmt_bytes, fmt_duration, fmt_number, fmt_step, fmt_time
from nibblora.tui.widgets import STATUS_STYLES, Cell, HardwarePanel, PlotPanel, sort_key

# (column key, header); the first is the compare mark.
TABLE_COLUMNS = (("mark", " "), ("name", "name"), ("method", "method"), ("status", "status"), ("step", "step"),
                 ("loss", "loss"), ("tokens_per_s", "tok/s"), ("gpu_mem", "GPU mem"), ("eta", "ETA"), ("started", "started"))
SORTABLE = [key for key, _ in TABLE_COLUMNS[1:]]
EVAL_STYLES = ("magenta", "yellow", "green", "red")
RUN_STYLES = ("cyan", "magenta")


def job_row(job: Job, marked: bool) -> dict[str, Cell]:
    tps = job.tokens_per_s
    return {
        "mark": Cell("\u25cf" if marked else " ", marked, "bold magenta"),
        "name": Cell(job.name, job.name.lower(), "bold"),
        "method": Cell(job.method, job.method),
        "status": Cell(job.status, job.status, STATUS_STYLES.get(job.status, "")),
        "step": Cell(fmt_step(job), job.step, justify="right"),
        "loss": Cell(fmt_number(job.loss), job.loss, justify="right"),
        "tokens_per_s": Cell("-" if tps is None else f"{tps:,.0f}", tps, justify="right"),
        "gpu_mem": Cell("-" if job.gpu_memory_bytes is None else fmt_bytes(job.gpu_memory_bytes),
                        job.gpu_memory_bytes, justify="right"),
        "eta": Cell(fmt_duration(job.eta_seconds), job.eta_seconds, justify="right"),
        "started": Cell(fmt_time(job.info.created_at), job.info.created_at),
    }


def _bytes_axis(v: float) -> str:
    return fmt_bytes(v)


class JobTable(DataTable):
    """The job list; its own Enter binding is shown in the footer (DataTable's is hidden)."""

    BINDINGS = [Binding("enter", "select_cursor", "Open")]


class JobsScreen(Screen):
    """The job list (sortable; Enter opens a job) above the hardware panel."""

    BINDINGS = [
        Binding("n", "new_job", "New job"),
        Binding("s", "stop_job", "Stop"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("o", "sort_next", "Sort"),
        Binding("r", "sort_reverse", "Reverse"),
        Binding("q", "app.quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        table = JobTable(id="jobs", cursor_type="row", zebra_stripes=True)
        for key, label in TABLE_COLUMNS:
            table.add_column(label, key=key)
        table.border_title = "jobs"
        yield table
        yield Static(id="empty")
        yield HardwarePanel(id="hardware")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#jobs", DataTable).focus()

    @property
    def table(self) -> DataTable:
        return self.query_one("#jobs", DataTable)

    def selected_key(self) -> str | None:
        table = self.table
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @on(DataTable.RowSelected, "#jobs")
    def _row_clicked(self, event: DataTable.RowSelected) -> None:
        self.app.open_job(event.row_key.value)

    @on(DataTable.HeaderSelected, "#jobs")
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        key = event.column_key.value
        if key in SORTABLE:
            self.app.set_sort(key, not self.app.sort_reverse if key == self.app.sort_column else False)

    def action_new_job(self) -> None:
        self.app.push_screen(StartJobScreen())

    def action_stop_job(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.app.ask_stop(key)

    def action_mark(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.app.toggle_mark(key)
            self.table.action_cursor_down()

    def action_compare(self) -> None:
        self.app.compare_marked(self.selected_key())

    def action_sort_next(self) -> None:
        i = SORTABLE.index(self.app.sort_column)
        self.app.set_sort(SORTABLE[(i + 1) % len(SORTABLE)], self.app.sort_reverse)

    def action_sort_reverse(self) -> None:
        self.app.set_sort(self.app.sort_column, not self.app.sort_reverse)


class JobScreen(Screen):
    """One run: loss (train and eval), lr, grad norm, tokens/s, memory against the calculator's estimate, logs."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("s", "stop_job", "Stop"),
        Binding("q", "app.quit", "Quit"),
    ]

    DEFAULT_CSS = """
    JobScreen #info { height: auto; padding: 0 1; }
    JobScreen #plots { grid-size: 3 2; height: 1fr; }
    JobScreen #loss { column-span: 2; }
    JobScreen #log { height: 9; border: round $primary-darken-2; }
    """

    def __init__(self, job_key: str):
        super().__init__()
        self.job_key = job_key
        run_dir, run_id = job_key.split("::", 1)
        self.series = RunSeries(Path(run_dir), run_id)
        self._polling = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("reading...", id="info")
        with Grid(id="plots"):
            yield PlotPanel("loss", id="loss")
            yield PlotPanel("learning rate", lambda v: f"{v:.2e}", id="lr")
            yield PlotPanel("grad norm", id="grad_norm")
            yield PlotPanel("tokens/s", lambda v: f"{v:,.0f}", id="tokens_per_s")
            yield PlotPanel("memory", _bytes_axis, id="memory")
        log = RichLog(id="log", max_lines=2000, wrap=False, markup=False)
        log.border_title = "log"
        yield log
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.series.run_id
        self._fit_log()
        self.poll()
        self.set_interval(self.app.poll_seconds, self.poll)

    def on_resize(self) -> None:
        self._fit_log()

    def _fit_log(self) -> None:
        # On a small terminal (80 x 24) the plots need the rows more than the log does; nothing scrolls.
        height = self.app.size.height
        self.query_one("#log", RichLog).styles.height = 9 if height >= 36 else 6 if height >= 22 else 3

    def poll(self) -> None:
        if not self._polling:
            self._polling = True
            self._read()

    @work(thread=True, group="job-series")
    def _read(self) -> None:
        try:
            _, logs = self.series.poll()
            self.app.call_from_thread(self._show, logs)
        except Exception as err:
            self.app.call_from_thread(self._show_error, err)
        finally:
            self._polling = False

    def _show_error(self, err: Exception) -> None:
        self.query_one("#info", Static).update(Text(f"cannot read {self.series.run_dir}: {err}", style="red"))

    def _show(self, logs: list[dict]) -> None:
        s, info = self.series, self.series.info
        evals = s.eval_sets()
        loss = [Series("train", s.series("loss"), "cyan")]
        loss += [Series(f"eval {name}", s.series(f"eval_{name}_loss"), EVAL_STYLES[i % len(EVAL_STYLES)])
                 for i, name in enumerate(evals)]
        self.query_one("#loss", PlotPanel).set_series(loss)
        self.query_one("#lr", PlotPanel).set_series([Series("lr", s.series("lr"), "green")])
        self.query_one("#grad_norm", PlotPanel).set_series([Series("norm", s.series("grad_norm"), "yellow")])
        self.query_one("#tokens_per_s", PlotPanel).set_series([Series("tok/s", s.series("tokens_per_s"), "cyan")])
        self.query_one("#memory", PlotPanel).set_series([
            Series("peak", s.series("mem_peak_bytes"), "red"),
            Series("alloc", s.series("mem_allocated_bytes"), "cyan"),
            Series("est", s.series("mem_estimate_bytes"), "green"),
        ])
        self.query_one("#info", Static).update(self._info_text())
        log = self.query_one("#log", RichLog)
        for line in logs:
            style = "red" if line["level"] in ("error", "warning") else ""
            log.write(Text(f"{time.strftime('%H:%M:%S', time.localtime(line['time']))} {line['message']}", style=style))

    def _info_text(self) -> Text:
        s, info = self.series, self.series.info
        text = Text()
        text.append(info.name, style="bold").append("  ")
        text.append(info.status, style=STATUS_STYLES.get(info.status, ""))
        mode = info.config.get("train", {}).get("mode", "?")
        last = max(s.metrics.get("loss", {0: 0}))
        total = f"/{info.total_steps}" if info.total_steps else ""
        text.append(f"  {mode}  step {last}{total}  loss {fmt_number(s.latest('loss'))}")
        for name in s.eval_sets():
            text.append(f"  eval {name} {fmt_number(s.latest(f'eval_{name}_loss'))}")
        peak = max(s.metrics.get("mem_peak_bytes", {}).values(), default=None)
        estimate = s.latest("mem_estimate_bytes")
        text.append(f"\nmemory: measured peak {fmt_bytes(peak)}, calculator's estimate {fmt_bytes(estimate)}")
        if peak and estimate:
            text.append(f" (estimate/peak {estimate / peak:.2f})")
        text.append(f"   started {fmt_time(info.created_at)}", style="dim")
        if info.ended_at:
            text.append(f", ended {fmt_time(info.ended_at)}", style="dim")
        text.append(f"   {info.run_dir}", style="dim")
        return text

    def action_stop_job(self) -> None:
        self.app.ask_stop(self.job_key)


class CompareScreen(Screen):
    """Two runs' curves on shared axes: train loss, eval loss, tokens/s, memory."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("q", "app.quit", "Quit")]

    DEFAULT_CSS = """
    CompareScreen #info { height: auto; padding: 0 1; }
    CompareScreen #plots { grid-size: 2 2; height: 1fr; }
    """

    def __init__(self, keys: tuple[str, str]):
        super().__init__()
        self.runs = []
        for key in keys:
            run_dir, run_id = key.split("::", 1)
            self.runs.append(RunSeries(Path(run_dir), run_id))
        self._polling = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("reading...", id="info")
        with Grid(id="plots"):
            yield PlotPanel("train loss", id="loss")
            yield PlotPanel("eval loss", id="eval")
            yield PlotPanel("tokens/s", lambda v: f"{v:,.0f}", id="tokens_per_s")
            yield PlotPanel("peak memory", _bytes_axis, id="memory")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "compare"
        self.poll()
        self.set_interval(self.app.poll_seconds, self.poll)

    def poll(self) -> None:
        if not self._polling:
            self._polling = True
            self._read()

    @work(thread=True, group="compare-series")
    def _read(self) -> None:
        try:
            for run in self.runs:
                run.poll()
            self.app.call_from_thread(self._show)
        except Exception as err:
            self.app.call_from_thread(self.query_one("#info", Static).update, Text(str(err), style="red"))
        finally:
            self._polling = False

    def _label(self, i: int) -> str:
        run = self.runs[i]
        # Two runs of the same name (two stores) are told apart by their folder.
        same = self.runs[0].run_id == self.runs[1].run_id
        return f"{run.run_id} ({run.run_dir.name})" if same else run.run_id

    def _show(self) -> None:
        def each(name: str, suffix: str = "") -> list[Series]:
            return [Series(self._label(i) + suffix, run.series(name), RUN_STYLES[i]) for i, run in enumerate(self.runs)]

        self.query_one("#loss", PlotPanel).set_series(each("loss"))
        evals = []
        for i, run in enumerate(self.runs):
            for name in run.eval_sets():
                evals.append(Series(f"{self._label(i)} {name}", run.series(f"eval_{name}_loss"), RUN_STYLES[i]))
        self.query_one("#eval", PlotPanel).set_series(evals, "" if evals else "no eval sets")
        self.query_one("#tokens_per_s", PlotPanel).set_series(each("tokens_per_s"))
        self.query_one("#memory", PlotPanel).set_series(each("mem_peak_bytes"))
        text = Text()
        for i, run in enumerate(self.runs):
            info = run.info
            peak = max(run.metrics.get("mem_peak_bytes", {}).values(), default=None)
            text.append("\u2501 ", style=RUN_STYLES[i]).append(self._label(i), style="bold")
            text.append(f"  {info.status}  {info.config.get('train', {}).get('mode', '?')}  "
                        f"step {run.last_step if run.last_step >= 0 else '-'}"
                        f"{'/' + str(info.total_steps) if info.total_steps else ''}  "
                        f"loss {fmt_number(run.latest('loss'))}  peak {fmt_bytes(peak)}\n")
        text.rstrip()
        self.query_one("#info", Static).update(text)


class StartJobScreen(ModalScreen[str | None]):
    """Ask for a config file; the app validates it and starts `python -m nibblora.train CONFIG`."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    DEFAULT_CSS = """
    StartJobScreen { align: center middle; }
    StartJobScreen > Vertical { width: 80; height: auto; border: thick $primary; padding: 1 2; background: $surface; }
    StartJobScreen Label { width: 100%; }
    StartJobScreen #error { color: $error; height: auto; }
    StartJobScreen Horizontal { height: auto; margin-top: 1; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Start a training job: the path of its TOML config, relative to {os.getcwd()} "
                        "(\u2192 accepts a suggestion)")
            yield Input(placeholder="path/to/config.toml", id="config",
                        suggester=SuggestFromList(find_configs(Path.cwd()), case_sensitive=False))
            yield Label("", id="error")
            with Horizontal():
                yield Button("Start", variant="primary", id="start")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#start")
    def _submit(self) -> None:
        path = self.query_one("#config", Input).value.strip()
        if not path:
            self.query_one("#error", Label).update("enter the path of a config file")
            return
        error = self.app.start_job(path)
        if error:
            self.query_one("#error", Label).update(error)
        else:
            self.dismiss(path)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 70; height: auto; border: thick $warning; padding: 1 2; background: $surface; }
    ConfirmScreen Label { width: 100%; }
    ConfirmScreen Horizontal { height: auto; margin-top: 1; }
    """

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", variant="warning", id="yes")
                yield Button("No (n)", id="no")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class QloraTUI(App):
    """`qlora-tui RUNS_DIR`: jobs, their curves, and GPU memory."""

    TITLE = "qlora-tui"
    CSS = """
    #jobs { height: 1fr; border: round $primary-darken-2; }
    #empty { height: auto; padding: 0 1; color: $text-muted; }
    #empty.hidden { display: none; }
    """

    def __init__(self, runs_dir: str | Path = "runs", *, hardware: HardwareMonitor | None = None,
                 poll_seconds: float = 1.0, hardware_seconds: float = 2.0):
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.index = JobIndex(self.runs_dir)
        self.hardware = hardware if hardware is not None else HardwareMonitor()
        self.poll_seconds = poll_seconds
        self.hardware_seconds = hardware_seconds
        self.jobs: dict[str, Job] = {}
        self.marked: list[str] = []
        self.sort_column = "started"
        self.sort_reverse = False
        self.launched: list[LaunchedJob] = []
        self.last_snapshot: HardwareSnapshot | None = None
        self._polling_jobs = False
        self._polling_hardware = False

    def on_mount(self) -> None:
        self.sub_title = str(self.runs_dir)
        self.push_screen(JobsScreen())
        self.poll_jobs()
        self.poll_hardware()
        self.set_interval(self.poll_seconds, self.poll_jobs)
        self.set_interval(self.hardware_seconds, self.poll_hardware)

    # -- reading, in worker threads ---------------------------------------------------------------------------
    def poll_jobs(self, rescan: bool = False) -> None:
        if not self._polling_jobs:
            self._polling_jobs = True
            self._read_jobs(rescan)

    @work(thread=True, group="jobs")
    def _read_jobs(self, rescan: bool) -> None:
        try:
            jobs = self.index.poll(force_rescan=rescan)
            self.call_from_thread(self._show_jobs, jobs)
        finally:
            self._polling_jobs = False

    def poll_hardware(self) -> None:
        if not self._polling_hardware:
            self._polling_hardware = True
            self._read_hardware()

    @work(thread=True, group="hardware")
    def _read_hardware(self) -> None:
        try:
            snapshot = self.hardware.read()
            self.call_from_thread(self._show_hardware, snapshot)
        finally:
            self._polling_hardware = False

    # -- drawing, on the UI thread -----------------------------------------------------------------------------
    def _jobs_screen(self) -> JobsScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, JobsScreen):
                return screen
        return None

    def _show_hardware(self, snapshot: HardwareSnapshot) -> None:
        self.last_snapshot = snapshot
        screen = self._jobs_screen()
        if screen is not None:
            screen.query_one(HardwarePanel).show(snapshot)
            if self.jobs:
                self._show_jobs(list(self.jobs.values()))  # the GPU memory column

    def _show_jobs(self, jobs: list[Job]) -> None:
        self._check_launched()
        screen = self._jobs_screen()
        if screen is None:
            return
        table = screen.table
        selected = screen.selected_key()
        if self.last_snapshot is not None:
            attach_gpu_memory(jobs, self.last_snapshot.gpu_memory_by_pid())
        fresh = {job.key: job for job in jobs}
        for key in set(self.jobs) - set(fresh):
            table.remove_row(key)
        self.marked = [k for k in self.marked if k in fresh]
        changed = False
        for key, job in fresh.items():
            cells = job_row(job, key in self.marked)
            if key not in self.jobs or key not in table.rows:
                table.add_row(*cells.values(), key=key)
                changed = True
                continue
            for column, cell in cells.items():
                # Only cells whose text changed are touched: no redraw of the whole table, no flicker.
                if not cell.same_as(table.get_cell(key, column)):
                    table.update_cell(key, column, cell)
                    changed = True
        self.jobs = fresh
        if changed:
            self._sort(table, selected)
        empty = screen.query_one("#empty", Static)
        if jobs:
            empty.add_class("hidden")
        else:
            empty.remove_class("hidden")
            where = "" if self.runs_dir.is_dir() else " (the directory does not exist yet)"
            empty.update(f"no runs under {self.runs_dir}{where}. Press n to start a job from a config file, or run "
                         f"`python -m nibblora.train CONFIG.toml` with output_dir inside {self.runs_dir}.")
        arrow = "\u2193" if self.sort_reverse else "\u2191"
        table.border_subtitle = f"{len(jobs)} runs \u00b7 sorted by {self.sort_column} {arrow} (o: next column, r: reverse)"

    def _sort(self, table: DataTable, keep_selected: str | None) -> None:
        table.sort(self.sort_column, key=sort_key, reverse=self.sort_reverse)
        if keep_selected is not None and keep_selected in table.rows:
            table.move_cursor(row=table.get_row_index(keep_selected), animate=False, scroll=False)

    def set_sort(self, column: str, reverse: bool) -> None:
        self.sort_column, self.sort_reverse = column, reverse
        screen = self._jobs_screen()
        if screen is not None:
            self._sort(screen.table, screen.selected_key())
            self._show_jobs(list(self.jobs.values()))

    # -- actions -----------------------------------------------------------------------------------------------
    def open_job(self, key: str) -> None:
        if key in self.jobs:
            self.push_screen(JobScreen(key))

    def toggle_mark(self, key: str) -> None:
        if key in self.marked:
            self.marked.remove(key)
        else:
            self.marked = (self.marked + [key])[-2:]
        screen = self._jobs_screen()
        if screen is not None:
            for k in self.jobs:
                cell = job_row(self.jobs[k], k in self.marked)["mark"]
                if not cell.same_as(screen.table.get_cell(k, "mark")):
                    screen.table.update_cell(k, "mark", cell)

    def compare_marked(self, cursor_key: str | None) -> None:
        keys = list(self.marked)
        if len(keys) == 1 and cursor_key is not None and cursor_key != keys[0]:
            keys.append(cursor_key)
        if len(keys) != 2:
            self.notify("mark two runs with space (or one, then move to the other) and press c", severity="warning")
            return
        self.push_screen(CompareScreen((keys[0], keys[1])))

    def ask_stop(self, key: str) -> None:
        job = self.jobs.get(key)
        if job is None:
            return
        if job.status != "running":
            self.notify(f"{job.name} is {job.status}, not running", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._request_stop(job)

        self.push_screen(ConfirmScreen(f"Stop {job.name}? It writes a checkpoint at the end of its current step, "
                                       "then exits as 'stopped' (run the same config again to resume)."), answered)

    @work(thread=True, group="stop")
    def _request_stop(self, job: Job) -> None:
        try:
            request_stop(job.info.run_dir, job.info.run_id)
            self.call_from_thread(self.notify, f"stop requested for {job.name}; it checkpoints, then exits")
        except Exception as err:
            self.call_from_thread(self.notify, f"could not request a stop: {err}", severity="error")

    def start_job(self, config_path: str) -> str | None:
        """Start a job from a config file; returns an error message, or None when it started."""
        from nibblora.train.config import ConfigError
        from nibblora.tui.launch import start_job

        try:
            launched, message = start_job(config_path, self.runs_dir)
        except (ConfigError, OSError) as err:
            return str(err)
        self.launched.append(launched)
        self.notify(message, timeout=8)
        self.poll_jobs(rescan=True)
        self.set_timer(3.0, lambda: self.poll_jobs(rescan=True))
        return None

    def _check_launched(self) -> None:
        """Tell the user when a job it started exits with an error (often before its run store exists)."""
        for job in list(self.launched):
            code = job.process.poll()
            if code is None:
                continue
            self.launched.remove(job)
            if code != 0:
                self.notify(f"{job.config_path.name} exited with code {code}: {console_tail(job.console_log)}",
                            severity="error", timeout=15)

    def on_unmount(self) -> None:
        self.hardware.close()
