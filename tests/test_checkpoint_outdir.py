"""nibblora.checkpoint.outdir: atomic output folders, the --overwrite swap, and what a rerun recovers."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nibblora.checkpoint import outdir
from nibblora.checkpoint.outdir import atomic_output_dir, check_out_dir, recover_output_dir, replace_output_dir
from nibblora.errors import OutputError


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "marker").write_text(content)
    return path


def _names(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_overwrite_exchanges_the_folders_in_one_step_where_the_os_can(tmp_path):
    out = _folder(tmp_path / "out", "old")
    calls = []
    original = outdir.exchange_dirs

    def spy(a, b):
        calls.append((Path(a).name, Path(b).name))
        return original(a, b)

    outdir.exchange_dirs, saved = spy, outdir.exchange_dirs
    try:
        with atomic_output_dir(out) as tmp:
            (tmp / "marker").write_text("new")
    finally:
        outdir.exchange_dirs = saved
    assert (out / "marker").read_text() == "new"
    assert _names(tmp_path) == ["out"]
    assert len(calls) == 1 and calls[0][1] == "out" and calls[0][0].startswith(f".out.tmp-{os.getpid()}-")


def test_overwrite_without_exchange_swaps_in_three_recoverable_steps(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    monkeypatch.setattr(outdir, "exchange_dirs", lambda a, b: False)
    with atomic_output_dir(out) as tmp:
        (tmp / "marker").write_text("new")
    assert (out / "marker").read_text() == "new"
    assert _names(tmp_path) == ["out"]


def test_rerun_finishes_a_swap_killed_after_the_old_output_was_moved_away(tmp_path):
    pid = _dead_pid()
    _folder(tmp_path / f".out.new-{pid}-ab12", "new")
    _folder(tmp_path / f".out.old-{pid}-cd34", "old")
    done = recover_output_dir(tmp_path / "out")
    assert (tmp_path / "out" / "marker").read_text() == "new"
    assert _names(tmp_path) == ["out"]
    assert done[0].startswith("finished replacing")


def test_rerun_restores_the_old_output_when_no_complete_new_one_exists(tmp_path):
    pid = _dead_pid()
    _folder(tmp_path / f".out.old-{pid}-cd34", "old")
    _folder(tmp_path / f".out.tmp-{pid}-ef56", "partial")
    recover_output_dir(tmp_path / "out")
    assert (tmp_path / "out" / "marker").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_rerun_keeps_the_output_in_place_and_drops_an_unswapped_new_folder(tmp_path):
    pid = _dead_pid()
    _folder(tmp_path / "out", "old")
    _folder(tmp_path / f".out.new-{pid}-ab12", "new")
    recover_output_dir(tmp_path / "out")
    assert (tmp_path / "out" / "marker").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_stale_temp_folders_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    _folder(tmp_path / f".out.tmp-{dead}-ab12", "partial")
    _folder(tmp_path / f".out.tmp-{os.getpid()}-cd34", "mine, still writing")
    _folder(tmp_path / ".out.tmp-legacyname", "unknown writer")  # no pid: never guessed at
    _folder(tmp_path / f".other.tmp-{dead}-ef56", "another output's")
    check_out_dir(tmp_path / "out", overwrite=False)  # every tool's first step recovers
    assert _names(tmp_path) == sorted(
        [f".other.tmp-{dead}-ef56", ".out.tmp-legacyname", f".out.tmp-{os.getpid()}-cd34"]
    )


def test_temp_folder_names_the_writer_pid(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        assert tmp.parent == tmp_path


def test_replace_into_an_empty_folder_is_a_plain_rename(tmp_path):
    (tmp_path / "out").mkdir()
    tmp = _folder(tmp_path / ".out.tmp-1-x", "new")
    replace_output_dir(tmp, tmp_path / "out")
    assert _names(tmp_path) == ["out"] and (tmp_path / "out" / "marker").read_text() == "new"


def test_a_failed_write_is_one_output_error_naming_the_folder_and_leaves_nothing(tmp_path):
    out = _folder(tmp_path / "out", "old")
    with pytest.raises(OutputError) as info:
        with atomic_output_dir(out) as tmp:
            (tmp / "part").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    message = str(info.value)
    assert message.startswith(f"writing {out}: the disk that holds {tmp_path} is full (model.safetensors)")
    assert "\n" not in message and message.endswith("Nothing was written")
    assert _names(tmp_path) == ["out"] and (out / "marker").read_text() == "old"


def test_interrupt_leaves_the_old_output_untouched(tmp_path):
    out = _folder(tmp_path / "out", "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as tmp:
            (tmp / "marker").write_text("new")
            raise KeyboardInterrupt
    assert _names(tmp_path) == ["out"] and (out / "marker").read_text() == "old"


@pytest.mark.parametrize("exchange", [True, False])
def test_overwriting_a_symlinked_output_replaces_the_link_and_keeps_its_target(tmp_path, monkeypatch, exchange):
    target = _folder(tmp_path / "elsewhere", "old")
    (tmp_path / "out").symlink_to(target)
    if not exchange:
        monkeypatch.setattr(outdir, "exchange_dirs", lambda a, b: False)
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "marker").write_text("new")
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "marker").read_text() == "new"
    assert (target / "marker").read_text() == "old"
    assert _names(tmp_path) == ["elsewhere", "out"]


def test_output_folders_names_reading_and_the_cli_printer_do_not_import_torch():
    # nibblora.data and the CLIs' argument parsing use these; the package's own __init__ is bypassed so that
    # only these modules' imports are measured.
    code = (
        "import sys, types\n"
        f"m = types.ModuleType('nibblora'); m.__path__ = [{str(Path(outdir.__file__).parents[1])!r}]\n"
        "sys.modules['nibblora'] = m\n"
        "import nibblora.checkpoint, nibblora.cli_errors, nibblora.dtypes\n"
        "from nibblora.checkpoint import read_config, atomic_output_dir, open_checkpoint\n"
        "from nibblora.cli_errors import run_tool\n"
        "from nibblora.checkpoint.shards import parse_size\n"
        "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('nibblora'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_what_recovery_did_is_logged(tmp_path, caplog):
    pid = _dead_pid()
    _folder(tmp_path / f".out.old-{pid}-cd34", "old")
    with caplog.at_level("WARNING", logger="nibblora.checkpoint.outdir"):
        recover_output_dir(tmp_path / "out")
    assert [r.getMessage() for r in caplog.records] == [
        f"restored the previous {tmp_path / 'out'} (a run was killed while swapping it in)"
    ]
