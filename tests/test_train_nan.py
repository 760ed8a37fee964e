"""A NaN loss: recorded in the run store, then the run stops cleanly (nan_policy "stop") or skips the step ("skip")."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
import torch
from helpers_models import hf_tiny_model, save_hf
from helpers_train import tiny_config, tiny_rows
from safetensors.torch import load_file

from nibblora.runs import open_run
from nibblora.train import TokenizedRows, train
from nibblora.train.checkpointing import checkpoint_dirs
from nibblora.train.cli import main
from nibblora.train.data import step_micro_batches
from nibblora.train.loop import NonFiniteLossError

POISON = 2  # a token id whose embedding is NaN: any row holding it gives a NaN loss
BATCH = 2


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory):
    model = hf_tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("nan")
    return save_hf(model, tmp_path_factory.mktemp("model") / "poisoned")


def rows_with_poison(poisoned_rows: set[int]) -> TokenizedRows:
    rows = tiny_rows(8)
    for i in poisoned_rows:
        rows.rows[i]["input_ids"][-1] = POISON
    return rows


def poisoned_steps(rows: TokenizedRows, poisoned_rows: set[int], steps: int) -> list[int]:
    """1-based steps whose batch holds a poisoned row."""
    return [s + 1 for s in range(steps) if poisoned_rows & set(step_micro_batches(rows, s, BATCH, 1, 1, 0, seed=42)[0])]


def run_config(model_dir: Path, out: Path, policy: str):
    return tiny_config(
        model_dir,
        out,
        data={"batch_size": BATCH},
        checkpoint={"every": 1, "keep_last": 2},
        train={"max_steps": 8, "nan_policy": policy},
    )


def test_stop_policy_ends_the_run_as_failed_and_keeps_the_last_good_checkpoint(poisoned_model, tmp_path):
    rows = rows_with_poison({7})
    bad = poisoned_steps(rows, {7}, 8)[0]
    assert bad > 1, "pick another poisoned row: the first step must be good"
    with pytest.raises(NonFiniteLossError, match=f"^loss became NaN at step {bad}; .*step-{bad - 1:08d}"):
        train(run_config(poisoned_model, tmp_path / "run", "stop"), rows, quiet=True)
    with open_run(tmp_path / "run") as store:
        info = store.run()
        assert info.status == "failed"
        assert store.events()[-1]["message"].startswith(f"loss became NaN at step {bad}")
        assert [s for s, _ in store.metric("loss")] == list(range(1, bad))  # the finite ones
        assert all(math.isfinite(v) for _, v in store.metric("loss"))
    conn = sqlite3.connect(tmp_path / "run" / "runs.sqlite")
    assert conn.execute("SELECT step, value FROM nonfinite_metrics WHERE name='loss'").fetchall() == [(bad, "nan")]
    conn.close()
    last = checkpoint_dirs(tmp_path / "run")[-1]
    assert last.name == f"step-{bad - 1:08d}"
    weights = load_file(str(last / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "adapter").exists()  # no final export from a failed run


def test_skip_policy_skips_exactly_the_bad_steps_and_finishes(poisoned_model, tmp_path, capsys):
    rows = rows_with_poison({1, 6})
    bad = poisoned_steps(rows, {1, 6}, 8)
    assert bad and len(bad) < 8
    result = train(run_config(poisoned_model, tmp_path / "run", "skip"), rows, quiet=True)
    assert result.status == "finished" and result.skipped_steps == bad
    assert [s for s, v in result.losses.items() if math.isnan(v)] == bad
    assert capsys.readouterr().err.count("skipped the step") == len(bad)
    weights = load_file(str(result.weights_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    with open_run(tmp_path / "run") as store:
        assert store.run().status == "finished"
        assert [e["step"] for e in store.events() if e["kind"] == "skipped_step"] == bad


def test_cli_reports_a_nan_stop_in_one_line_with_exit_code_1(poisoned_model, tmp_path, capsys):
    data = rows_with_poison(set(range(8))).to_jsonl(tmp_path / "rows.jsonl")
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'output_dir = "{tmp_path / "run"}"\n[model]\npath = "{poisoned_model}"\ndtype = "float32"\n'
        f'[data]\ntrain = "{data}"\nbatch_size = 2\n[lora]\nr = 4\n'
        '[train]\nmode = "lora"\nmax_steps = 3\ndevice = "cpu"\n'
    )
    capsys.readouterr()
    assert main([str(toml), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nibblora.train: error: loss became NaN at step 1;")
    assert "no checkpoint was written yet" in err[0]
