"""Braille plots, number formats and the start-job helpers of qlora-tui."""

from pathlib import Path

from nibblora.tui.launch import find_configs, plan_output_dir
from nibblora.tui.plot import Series, render_plot
from nibblora.tui.text import fmt_bytes, fmt_duration, fmt_number


def test_a_rising_line_fills_the_plot_corner_to_corner():
    text = render_plot([Series("y", [(0, 0.0), (10, 1.0)])], width=20, height=5).plain.splitlines()
    assert len(text) == 5 and all(len(line) == 20 for line in text[:4])
    assert text[0].startswith("  1│") and text[2].startswith("0.5│") and text[3].startswith("  0│")
    assert text[3][4] != " " and text[0][-1] != " "  # bottom left and top right are drawn
    assert text[0][4] == " " and text[3][-1] == " "
    assert text[4].split() == ["0", "10"]


def test_plot_of_nothing_says_so():
    assert render_plot([Series("y", [])], 40, 5).plain == "no data yet"
    assert render_plot([Series("y", [(1, float("nan"))])], 40, 5).plain == "no data yet"


def test_flat_series_and_single_point_still_draw():
    assert "\u2800" < max(render_plot([Series("y", [(1, 2.0), (2, 2.0)])], 30, 4).plain)
    assert "no data" not in render_plot([Series("y", [(5, 2.0)])], 30, 4).plain


def test_two_series_share_axes_and_keep_their_colours():
    text = render_plot([Series("a", [(0, 0.0), (1, 0.0)], "red"), Series("b", [(0, 4.0), (1, 4.0)], "blue")], 30, 6)
    styles = {str(span.style) for span in text.spans}
    assert {"red", "blue"} <= styles


def test_formats():
    assert fmt_bytes(None) == "n/a" and fmt_bytes(512) == "512 B" and fmt_bytes(1.5 * 2**30) == "1.5 GiB"
    assert fmt_duration(None) == "-" and fmt_duration(59) == "59s" and fmt_duration(3725) == "1h02m"
    assert fmt_duration(90061) == "1d01h"
    assert fmt_number(None) == "-" and fmt_number(2.34567) == "2.346" and fmt_number(2e-4) == "2.00e-04"


def test_output_dir_outside_the_runs_directory_moves_under_it(tmp_path):
    runs = tmp_path / "runs"
    assert plan_output_dir(str(runs / "a"), runs) == ((runs / "a").resolve(), False)
    assert plan_output_dir(str(tmp_path / "else" / "b"), runs) == ((runs / "b").resolve(), True)


def test_config_suggestions_skip_pyproject_and_hidden_folders(tmp_path):
    for name in ("a.toml", "pyproject.toml", "configs/qlora.toml", ".venv/x.toml", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert find_configs(Path(tmp_path)) == ["a.toml", "configs/qlora.toml"]
