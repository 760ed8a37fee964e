"""`python -m nibblora.serve` refuses bad arguments with one line and exit status 2, before serving anything."""

from __future__ import annotations

import pytest
from helpers_serve import save_served_model

from nibblora.serve.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_served_model(tmp_path_factory.mktemp("cli") / "m")[1]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--adapter", "no-equals-sign"], "--adapter 'no-equals-sign': write NAME=DIR"),
        (["--adapter", "x=/does/not/exist"], "reading adapter: /does/not/exist is not a directory"),
        (["--adapter-dir", "/does/not/exist"], "--adapter-dir /does/not/exist: not a directory"),
        (["--max-loras", "8", "--max-cpu-loras", "2"], "max_cpu_loras (2) must be at least max_loras (8)"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(model_dir, capsys, extra, needle):
    assert main(["--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m nibblora.serve: error: ") and needle in err
    assert len(err.splitlines()) == 1


def test_missing_model_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
