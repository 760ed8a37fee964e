"""Hostile adapters (seeded, a few hundred): load_adapter and the merge tool's adapter input answer each with
success or a one-line error of nibblora's own types that names the adapter file; the merge leaves no output."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers_adapters import hostile_adapters
from helpers_merge import peft_model, save_adapter_dir, save_base

from nibblora.errors import AdapterError, InputError
from nibblora.lora import load_adapter
from nibblora.merge import merge_checkpoint
from nibblora.merge.cli import main as merge_main

SEED = 20261130
COUNT = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nibblora.models import load_model

    root = tmp_path_factory.mktemp("hostile")
    base = save_base(root / "base")
    good = save_adapter_dir(peft_model(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), root / "good")
    cases = hostile_adapters(good, root / "cases", SEED, COUNT)
    return root, base, good, cases, load_model(base)


def _check_message(err: BaseException, directory: Path, case, problems: list[str]) -> None:
    text = str(err)
    if "\n" in text:
        problems.append(f"{case.name}: message spans lines: {text!r}")
    if str(directory) not in text:
        problems.append(f"{case.name}: message does not name the adapter: {text!r}")
    if case.needle is not None and case.needle not in text:
        problems.append(f"{case.name}: message lacks {case.needle!r}: {text!r}")


def test_the_suite_covers_many_kinds_and_mostly_refusals(world):
    _, _, _, cases, _ = world
    kinds = Counter(case.name.split(" ")[0] for _, case in cases)
    assert len(cases) == COUNT and len(kinds) >= 8, kinds
    assert sum(case.must_fail for _, case in cases) > COUNT // 2


def test_load_adapter_answers_every_hostile_adapter_with_success_or_a_one_line_adapter_error(world):
    _, _, good, cases, template = world
    load_adapter(copy.deepcopy(template), good, check_base_model=False)  # the source of every case is fine
    problems: list[str] = []
    refused = 0
    for directory, case in cases:
        model = copy.deepcopy(template)
        before = {n: p.clone() for n, p in model.state_dict().items()}
        try:
            load_adapter(model, directory, check_base_model=False)
        except InputError as err:
            refused += 1
            _check_message(err, directory, case, problems)
            if set(model.state_dict()) != set(before) or any(
                not torch.equal(p, before[n]) for n, p in model.state_dict().items()
            ):
                problems.append(f"{case.name}: the model was changed before the error")
        except Exception as err:  # noqa: BLE001 - the test reports what escaped instead of stopping at the first
            problems.append(f"{case.name}: raw {type(err).__name__}: {err}")
        else:
            if case.must_fail:
                problems.append(f"{case.name}: loaded without an error")
    assert problems == [], "\n".join(problems[:30])
    assert refused > COUNT // 2


def test_merge_answers_every_hostile_adapter_with_success_or_a_one_line_error_and_no_output(world):
    root, base, _, cases, _ = world
    out = root / "out"
    problems: list[str] = []
    for directory, case in cases:
        try:
            merge_checkpoint(base, [directory], out, progress=False)
        except InputError as err:
            _check_message(err, directory, case, problems)
            if out.exists():
                problems.append(f"{case.name}: {out} exists after the error")
        except Exception as err:  # noqa: BLE001 - the test reports what escaped instead of stopping at the first
            problems.append(f"{case.name}: raw {type(err).__name__}: {err}")
        else:
            if case.must_fail:
                problems.append(f"{case.name}: merged without an error")
            import shutil

            shutil.rmtree(out)
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
        if leftovers:
            problems.append(f"{case.name}: left {leftovers}")
    assert problems == [], "\n".join(problems[:30])


def test_merge_adapter_errors_are_adapter_errors(world):
    root, base, _, cases, _ = world
    directory = next(d for d, c in cases if c.name.startswith("config r="))
    with pytest.raises(AdapterError, match="key 'r'"):
        merge_checkpoint(base, [directory], root / "out", progress=False)


def test_merge_cli_exits_2_with_one_line_for_a_sample(world, capsys):
    root, base, _, cases, _ = world
    sample = [(d, c) for d, c in cases if c.must_fail][::10]
    assert len(sample) >= 15
    for directory, case in sample:
        code = merge_main(["--base", str(base), "--adapter", str(directory), "--out", str(root / "cli-out"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2, case.name
        assert err.startswith("nibblora.merge: error: ") and "\n" not in err, (case.name, err)
        assert not (root / "cli-out").exists()


def test_merge_cli_in_a_real_process_exits_2(world):
    root, base, _, cases, _ = world
    directory = next(d for d, c in cases if c.must_fail and c.name.startswith("config"))
    command = [
        sys.executable,
        "-m",
        "nibblora.merge",
        "--base",
        str(base),
        "--adapter",
        str(directory),
        "--out",
        str(root / "proc-out"),
        "--quiet",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("nibblora.merge: error: ")]
    assert len(lines) == 1 and str(directory) in lines[0]
    assert "Traceback" not in result.stderr and not (root / "proc-out").exists()
