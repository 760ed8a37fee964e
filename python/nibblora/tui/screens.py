"""A job's screen (its curves, memory against the estimate, its log) and the comparison of two runs.
Each polls its run store(s) in a worker thread and redraws on the UI thread."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import Footer, Header, RichLog, Static

from nibblora.tui.jobs import RunSeries
from nibblora.tui.plot import Series
from nibblora.tui.text import fmt_bytes, fmt_number, fmt_time
from nibblora.tui.widgets import STATUS_STYLES, PlotPanel

EVAL_STYLES = ("magenta", "yellow", "green", "red")
RUN_STYLES = ("cyan", "magenta")


def _bytes_axis(v: float) -> str:
    return fmt_bytes(v)


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
        s = self.series
        evals = s.eval_sets()
        loss = [Series("train", s.series("loss"), "cyan")]
        loss += [
            Series(f"eval {name}", s.series(f"eval_{name}_loss"), EVAL_STYLES[i % len(EVAL_STYLES)])
            for i, name in enumerate(evals)
        ]
        self.query_one("#loss", PlotPanel).set_series(loss)
        self.query_one("#lr", PlotPanel).set_series([Series("lr", s.series("lr"), "green")])
        self.query_one("#grad_norm", PlotPanel).set_series([Series("norm", s.series("grad_norm"), "yellow")])
        self.query_one("#tokens_per_s", PlotPanel).set_series([Series("tok/s", s.series("tokens_per_s"), "cyan")])
        self.query_one("#memory", PlotPanel).set_series(
            [
                Series("peak", s.series("mem_peak_bytes"), "red"),
                Series("alloc", s.series("mem_allocated_bytes"), "cyan"),
                Series("est", s.series("mem_estimate_bytes"), "green"),
            ]
        )
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
            exact = s.latest(f"eval_{name}_exact_match")
            if exact is not None:
                text.append(f" (exact {exact:.1%})")
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
            text.append(
                f"  {info.status}  {info.config.get('train', {}).get('mode', '?')}  "
                f"step {run.last_step if run.last_step >= 0 else '-'}"
                f"{'/' + str(info.total_steps) if info.total_steps else ''}  "
                f"loss {fmt_number(run.latest('loss'))}  peak {fmt_bytes(peak)}\n"
            )
        text.rstrip()
        self.query_one("#info", Static).update(text)
