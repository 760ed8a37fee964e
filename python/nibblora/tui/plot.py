"""Line plots in braille characters (2 x 4 dots a cell), as Rich Text: no plotting dependency.

text = render_plot([Series("train", [(1, 2.3), (2, 2.1)], "cyan")], width=60, height=10)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rich.text import Text

BRAILLE = 0x2800
# Dot bit for (column 0..1, row 0..3) within one braille cell.
DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y), x increasing
    style: str = "cyan"


def _finite(points):
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _line(x0: int, y0: int, x1: int, y1: int):
    """Dots of a straight segment (Bresenham)."""
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        yield x0, y0
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def render_plot(
    series: list[Series], width: int, height: int, y_format: Callable[[float], str] | None = None, log_y: bool = False
) -> Text:
    """A plot `width` x `height` cells including a y axis on the left and the x range on the last line.
    Series share the axes; a cell where two series meet takes the later one's colour."""
    y_format = y_format or (lambda v: f"{v:.4g}")
    series = [Series(s.label, _finite(s.points), s.style) for s in series]
    if log_y:
        series = [Series(s.label, [(x, math.log10(y)) for x, y in s.points if y > 0], s.style) for s in series]
    points = [p for s in series for p in s.points]
    if not points or width < 12 or height < 3:
        return Text("no data yet", style="dim")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    if y_hi == y_lo:
        pad = abs(y_hi) * 0.05 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    shown = (lambda v: y_format(10**v)) if log_y else y_format
    labels = [shown(y_hi), shown((y_hi + y_lo) / 2), shown(y_lo)]
    if len(set(labels)) < 3 and not log_y:
        # A range too narrow for the given format (lr during a constant phase): show the digits that differ.
        digits = min(12, 3 + max(0, math.ceil(math.log10(max(abs(y_hi), abs(y_lo)) / (y_hi - y_lo)))))
        labels = [f"{v:.{digits}g}" for v in (y_hi, (y_hi + y_lo) / 2, y_lo)]
    label_w = max(len(s) for s in labels)
    plot_w, plot_h = width - label_w - 1, height - 1
    if plot_w < 4:
        return Text("too narrow", style="dim")
    dots_w, dots_h = plot_w * 2, plot_h * 4

    def to_dot(x: float, y: float) -> tuple[int, int]:
        col = 0 if x_hi == x_lo else round((x - x_lo) / (x_hi - x_lo) * (dots_w - 1))
        row = round((y_hi - y) / (y_hi - y_lo) * (dots_h - 1))
        return col, row

    cells = [[0] * plot_w for _ in range(plot_h)]
    colors: list[list[str | None]] = [[None] * plot_w for _ in range(plot_h)]
    for s in series:
        previous = None
        for x, y in s.points:
            dot = to_dot(x, y)
            segment = _line(*previous, *dot) if previous is not None else [dot]
            for c, r in segment:
                cells[r // 4][c // 2] |= DOT_BITS[c % 2][r % 4]
                colors[r // 4][c // 2] = s.style
            previous = dot

    text = Text()
    label_rows = {0: labels[0], plot_h // 2: labels[1], plot_h - 1: labels[2]}
    for r in range(plot_h):
        text.append(label_rows.get(r, "").rjust(label_w) + "\u2502", style="dim")
        for c in range(plot_w):
            if cells[r][c]:
                text.append(chr(BRAILLE + cells[r][c]), style=colors[r][c])
            else:
                text.append(" ")
        text.append("\n")
    left, right = f"{x_lo:g}", f"{x_hi:g}"
    axis = " " * (label_w + 1) + left + right.rjust(max(plot_w - len(left), len(right) + 1))
    text.append(axis, style="dim")
    return text
