"""The dashboard's widgets: plots that redraw to their size, the hardware panel, sortable table cells."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Group
from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from nibblora.tui.hardware import HardwareSnapshot
from nibblora.tui.plot import Series, render_plot
from nibblora.tui.text import gpu_line, system_line

STATUS_STYLES = {
    "running": "bold green",
    "finished": "cyan",
    "failed": "bold red",
    "stopped": "yellow",
    "unreadable": "bold magenta",
}


class Cell(Text):
    """A table cell that sorts by a value of its own (a number, a time), not by its text."""

    def __init__(self, text: str, sort_value, style: str = "", justify: str = "left"):
        super().__init__(text, style=style, justify=justify, no_wrap=True, overflow="ellipsis")
        self.sort_value = sort_value

    def same_as(self, other: object) -> bool:
        return (
            isinstance(other, Cell)
            and other.plain == self.plain
            and other.style == self.style
            and other.justify == self.justify
        )


def sort_key(cell: Cell):
    """Missing values (None) sort after every value, in both directions of the table's own reverse."""
    value = cell.sort_value
    return (value is None, value if value is not None else 0)


class PlotPanel(Widget):
    """A titled plot of one or more series; redraws to whatever size the layout gives it."""

    DEFAULT_CSS = """
    PlotPanel { border: round $primary-darken-2; border-title-color: $text; padding: 0 1; height: 1fr; }
    """

    def __init__(self, title: str, y_format: Callable[[float], str] | None = None, *, id: str | None = None):
        super().__init__(id=id)
        self.border_title = title
        self.y_format = y_format
        self.series: list[Series] = []
        self.note = ""

    def set_series(self, series: list[Series], note: str = "") -> None:
        self.series, self.note = series, note
        self.refresh()

    def render(self):
        legend = Text(no_wrap=True, overflow="ellipsis")
        for s in self.series:
            if s.points:
                legend.append("\u2501 ", style=s.style).append(f"{s.label} {self.format_last(s)}  ")
        if self.note:
            legend.append(self.note, style="dim")
        plot = render_plot(self.series, self.size.width, max(self.size.height - 1, 1), self.y_format)
        plot.no_wrap, plot.overflow = True, "crop"
        return Group(legend, plot)

    def format_last(self, s: Series) -> str:
        value = s.points[-1][1]
        return self.y_format(value) if self.y_format else f"{value:.4g}"


class HardwarePanel(Static):
    """One line per GPU (memory, utilisation, temperature, power; n/a where NVML would not say), or a plain
    'no GPU', then CPU and RAM."""

    DEFAULT_CSS = """
    HardwarePanel { border: round $primary-darken-2; height: auto; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None):
        super().__init__("reading hardware...", id=id)
        self.border_title = "hardware"

    def show(self, snapshot: HardwareSnapshot) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        for gpu in snapshot.gpus:
            used, total = gpu.memory_used_bytes, gpu.memory_total_bytes
            style = "green"
            if used is not None and total:
                share = used / total
                style = "bold red" if share > 0.9 else "yellow" if share > 0.7 else "green"
            text.append(gpu_line(gpu) + "\n", style=style)
        if not snapshot.gpus:
            text.append((snapshot.gpu_note or "no GPU") + "\n", style="bold yellow")
        elif snapshot.source != "nvml":
            text.append(f"through {snapshot.source}: {snapshot.gpu_note}\n", style="dim")
        text.append(system_line(snapshot))
        self.border_subtitle = snapshot.source if snapshot.gpus else ""
        self.update(text)
