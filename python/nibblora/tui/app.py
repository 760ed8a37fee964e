"""The Textual app and its first screen, the job list with the hardware panel (the job screen and the
comparison are in screens.py, the dialogs in dialogs.py). Every read of a run store or of NVML runs in a worker
thread; the UI thread only draws."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from nibblora.runs import request_stop
from nibblora.tui.dialogs import ConfirmScreen, StartJobScreen
from nibblora.tui.hardware import HardwareMonitor, HardwareSnapshot
from nibblora.tui.jobs import Job, JobIndex, attach_gpu_memory
from nibblora.tui.launch import LaunchedJob, console_tail
from nibblora.tui.screens import CompareScreen, JobScreen
from nibblora.tui.servers import ServerIndex, ServerStatus, servers_text
from nibblora.tui.text import fmt_bytes, fmt_duration, fmt_number, fmt_step, fmt_time, unreadable_lines
from nibblora.tui.widgets import STATUS_STYLES, Cell, HardwarePanel, sort_key

__all__ = ["CompareScreen", "ConfirmScreen", "JobScreen", "JobsScreen", "QloraTUI", "StartJobScreen"]

# (column key, header); the first is the compare mark.
TABLE_COLUMNS = (
    ("mark", " "),
    ("name", "name"),
    ("method", "method"),
    ("status", "status"),
    ("step", "step"),
    ("loss", "loss"),
    ("tokens_per_s", "tok/s"),
    ("gpu_mem", "GPU mem"),
    ("eta", "ETA"),
    ("started", "started"),
)
SORTABLE = [key for key, _ in TABLE_COLUMNS[1:]]


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
        "gpu_mem": Cell(
            "-" if job.gpu_memory_bytes is None else fmt_bytes(job.gpu_memory_bytes),
            job.gpu_memory_bytes,
            justify="right",
        ),
        "eta": Cell(fmt_duration(job.eta_seconds), job.eta_seconds, justify="right"),
        "started": Cell(fmt_time(job.info.created_at), job.info.created_at),
    }


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
        yield Static(id="unreadable", classes="hidden")
        yield Static(id="servers", classes="hidden")
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


class QloraTUI(App):
    """`qlora-tui RUNS_DIR`: jobs, their curves, and GPU memory."""

    TITLE = "qlora-tui"
    CSS = """
    #jobs { height: 1fr; border: round $primary-darken-2; }
    #empty { height: auto; padding: 0 1; color: $text-muted; }
    #empty.hidden { display: none; }
    #unreadable { height: auto; max-height: 8; padding: 0 1; color: $error; }
    #unreadable.hidden { display: none; }
    #servers { height: auto; max-height: 8; padding: 0 1; }
    #servers.hidden { display: none; }
    """

    def __init__(
        self,
        runs_dir: str | Path = "runs",
        *,
        hardware: HardwareMonitor | None = None,
        poll_seconds: float = 1.0,
        hardware_seconds: float = 2.0,
        server_urls: list[str] | None = None,
    ):
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.index = JobIndex(self.runs_dir)
        # Inference servers (nibblora.serve) registered under runs_dir or given with --server, read via /metrics.
        self.servers = ServerIndex(str(self.runs_dir), urls=server_urls)
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
        self._last_read_error: str | None = None

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
        except Exception as err:  # e.g. a folder we may not read: say so once, keep the app running
            message = f"reading {self.runs_dir}: {err}"
            if message != self._last_read_error:
                self._last_read_error = message
                self.call_from_thread(self.notify, message, severity="error")
            return
        finally:
            self._polling_jobs = False
        self._last_read_error = None
        self.call_from_thread(self._show_jobs, jobs)

    def poll_hardware(self) -> None:
        if not self._polling_hardware:
            self._polling_hardware = True
            self._read_hardware()

    @work(thread=True, group="hardware")
    def _read_hardware(self) -> None:
        try:
            snapshot = self.hardware.read()
            self.call_from_thread(self._show_hardware, snapshot)
            servers = self.servers.poll()  # HTTP with a short timeout each; a dead server reads as unreachable
            self.call_from_thread(self._show_servers, servers)
        finally:
            self._polling_hardware = False

    # -- drawing, on the UI thread -----------------------------------------------------------------------------
    def _jobs_screen(self) -> JobsScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, JobsScreen):
                return screen
        return None

    def _show_servers(self, servers: list[ServerStatus]) -> None:
        screen = self._jobs_screen()
        if screen is None:
            return
        panel = screen.query_one("#servers", Static)
        panel.set_class(not servers, "hidden")
        if servers:
            panel.border_title = "servers"
            panel.update(servers_text(servers))

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
        problems = unreadable_lines(jobs)
        unreadable = screen.query_one("#unreadable", Static)
        unreadable.update("\n".join(problems))
        unreadable.set_class(not problems, "hidden")
        empty = screen.query_one("#empty", Static)
        if jobs:
            empty.add_class("hidden")
        else:
            empty.remove_class("hidden")
            where = "" if self.runs_dir.is_dir() else " (the directory does not exist yet)"
            empty.update(
                f"no runs under {self.runs_dir}{where}. Press n to start a job from a config file, or run "
                f"`python -m nibblora.train CONFIG.toml` with output_dir inside {self.runs_dir}."
            )
        arrow = "\u2193" if self.sort_reverse else "\u2191"
        table.border_subtitle = f"{len(jobs)} runs \u00b7 sorted by {self.sort_column} {arrow} (o / r / click a header)"

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
        job = self.jobs.get(key)
        if job is None:
            return
        if job.error is not None:  # nothing to show but why
            self.notify(f"{job.info.run_dir}: {job.error}", severity="error", timeout=10)
            return
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

        self.push_screen(
            ConfirmScreen(
                f"Stop {job.name}? It writes a checkpoint at the end of its current step, "
                "then exits as 'stopped' (run the same config again to resume)."
            ),
            answered,
        )

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
                self.notify(
                    f"{job.config_path.name} exited with code {code}: {console_tail(job.console_log)}",
                    severity="error",
                    timeout=15,
                )

    def on_unmount(self) -> None:
        self.hardware.close()
