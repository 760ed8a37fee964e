"""Against forgetting: general rows mixed into every step, L2-SP and EWC; and the eval's exact match."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_train import VOCAB, tiny_checkpoint, tiny_config, tiny_rows
from safetensors.torch import load_file

from nibblora.errors import ConfigError
from nibblora.models import generate, load_model
from nibblora.train import TokenizedRows, train
from nibblora.train.data import MixedRows, step_micro_batches, step_rows
from nibblora.train.distributed import DistInfo
from nibblora.train.forgetting import WeightAnchor, estimate_fisher
from nibblora.train.step import evaluate, model_loss_sum

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def general_rows(n: int = 16, seed: int = 5) -> TokenizedRows:
    g = torch.Generator().manual_seed(seed)
    return TokenizedRows([{"input_ids": torch.randint(3, VOCAB, (12,), generator=g).tolist()} for _ in range(n)])


# -- mixing general rows into the steps


def test_general_rows_take_their_share_of_every_step_without_drift():
    batch, fraction = 8, 0.3
    counts = [
        sum(i >= 100 for i in step_rows(100, s, batch, seed=3, general_rows=40, general_fraction=fraction))
        for s in range(50)
    ]
    assert set(counts) <= {2, 3}  # 0.3 x 8 = 2.4 rows per step
    assert sum(counts) == math.floor(50 * batch * fraction)


def test_mixed_steps_are_a_pure_function_of_the_step_and_walk_both_streams_in_order():
    seen_task, seen_general = [], []
    for s in range(30):
        rows = step_rows(20, s, 4, seed=1, general_rows=7, general_fraction=0.25)
        assert rows == step_rows(20, s, 4, seed=1, general_rows=7, general_fraction=0.25)
        seen_task += [i for i in rows if i < 20]
        seen_general += [i - 20 for i in rows if i >= 20]
    # Each source is walked epoch by epoch: every task row once per 20 drawn, every general row once per 7.
    assert sorted(seen_task[:20]) == list(range(20)) and sorted(seen_general[:7]) == list(range(7))


def test_without_general_rows_the_steps_are_unchanged():
    rows = tiny_rows(10)
    plain = step_micro_batches(rows, 4, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=9)
    zero = step_micro_batches(rows, 4, 4, 2, 1, 0, 9, general_rows=5, general_fraction=0.0)
    assert plain == zero and all(i < 10 for m in plain for i in m)


def test_mixed_rows_index_the_task_then_the_general_rows():
    task, general = tiny_rows(3), general_rows(2)
    mixed = MixedRows(task, general)
    assert len(mixed) == 5
    assert mixed[4]["input_ids"].tolist() == general[1]["input_ids"].tolist()
    assert mixed.describe(4) == "1 of data.general" and mixed.describe(2) == "2"


def test_general_fraction_trains_on_general_rows(model_dir, tmp_path):
    task, general = tiny_rows(16), general_rows(16)
    common = dict(train={"mode": "full", "max_steps": 8, "lr": 3e-3, "schedule": "constant"}, data={"batch_size": 8})
    plain = train(tiny_config(model_dir, tmp_path / "plain", **common), task, {"general": general}, quiet=True)
    common["data"] = {"batch_size": 8, "general_fraction": 0.5}
    mixed = train(
        tiny_config(model_dir, tmp_path / "mixed", **common),
        task,
        {"general": general},
        general_dataset=general,
        quiet=True,
    )
    assert mixed.eval["eval_general_loss"] < plain.eval["eval_general_loss"] - 0.05


def test_general_fraction_without_general_rows_is_a_config_error_naming_the_key(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path / "run", data={"general_fraction": 0.2})
    with pytest.raises(ConfigError, match=r"data\.general_fraction .*data\.general"):
        train(config, tiny_rows(4), quiet=True)
    config = tiny_config(model_dir, tmp_path / "run2", train={"ewc": 1.0})
    with pytest.raises(ConfigError, match=r"train\.ewc .*data\.general"):
        train(config, tiny_rows(4), quiet=True)


# -- L2-SP and EWC


def test_anchor_gradient_and_value_are_those_of_the_quadratic_penalty():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    fisher = [torch.rand(3, 4), torch.rand(5)]
    anchor = WeightAnchor.build(params, l2sp=0.3, ewc=2.0, fisher=fisher)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    params[0].grad = torch.ones(3, 4)  # an existing gradient is added to; a missing one is created
    value = anchor.add_gradients()
    expected = sum(0.5 * ((0.3 + 2.0 * f) * (p - w0) ** 2).sum() for p, w0, f in zip(params, anchor.start, fisher))
    grads = torch.autograd.grad(expected, params)
    assert value == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(params[0].grad, grads[0] + 1)
    torch.testing.assert_close(params[1].grad, grads[1])


def test_no_anchor_when_both_weights_are_zero():
    assert WeightAnchor.build([torch.nn.Parameter(torch.zeros(2))], 0.0, 0.0, None) is None


def test_fisher_is_the_mean_squared_per_row_gradient_scaled_to_mean_one(model_dir):
    model = load_model(model_dir, torch.float32)
    params = [model.lm_head.weight, model.model.norm.weight]
    for p in model.parameters():
        p.requires_grad_(p is params[0] or p is params[1])
    rows = [tiny_rows(3)[i] for i in range(3)]
    fisher = estimate_fisher(model, params, rows, lambda m, b: model_loss_sum(m, b, b["labels"]), CPU.device)
    assert all(p.grad is None for p in params)  # the estimate leaves no gradient behind
    manual = [torch.zeros_like(p) for p in params]
    for row in rows:
        model.zero_grad()
        batch = {k: v[None] for k, v in row.items()}
        n = int((row["labels"][1:] != -100).sum())
        (model_loss_sum(model, batch, batch["labels"]) / n).backward()
        for m, p in zip(manual, params):
            m += p.grad.square()
    scale = sum(m.numel() for m in manual) / sum(float(m.sum()) for m in manual)
    for f, m in zip(fisher, manual):
        torch.testing.assert_close(f, m * scale, rtol=1e-4, atol=1e-8)


def distance_from_start(result, model_dir) -> float:
    start = load_file(str(model_dir / "model.safetensors"))
    end = load_file(str(result.weights_dir / "model.safetensors"))
    return sum(float((end[k].float() - start[k].float()).square().sum()) for k in start if k in end) ** 0.5


@pytest.mark.parametrize("mitigation", [{"l2sp": 50.0}, {"ewc": 50.0}])
def test_l2sp_and_ewc_hold_full_fine_tuning_near_the_start(model_dir, tmp_path, mitigation):
    task, general = tiny_rows(16), general_rows(16)
    sections = dict(data={"batch_size": 8}, train={"mode": "full", "max_steps": 6, "lr": 3e-3, "schedule": "constant"})
    free = train(tiny_config(model_dir, tmp_path / "free", **sections), task, quiet=True)
    sections["train"] = {**sections["train"], **mitigation, "ewc_samples": 8}
    held = train(tiny_config(model_dir, tmp_path / "held", **sections), task, general_dataset=general, quiet=True)
    assert distance_from_start(held, model_dir) < 0.7 * distance_from_start(free, model_dir)


def test_resume_with_mixing_and_ewc_reproduces_the_uninterrupted_run(model_dir, tmp_path):
    task, general = tiny_rows(16), general_rows(16)
    sections = dict(
        data={"batch_size": 4, "general_fraction": 0.25},
        train={
            "mode": "full",
            "max_steps": 4,
            "lr": 3e-3,
            "schedule": "constant",
            "ewc": 5.0,
            "l2sp": 1.0,
            "ewc_samples": 6,
        },
        checkpoint={"every": 2},
    )
    whole = train(tiny_config(model_dir, tmp_path / "whole", **sections), task, general_dataset=general, quiet=True)
    sections["train"] = {**sections["train"], "max_steps": 2}
    train(tiny_config(model_dir, tmp_path / "split", **sections), task, general_dataset=general, quiet=True)
    sections["train"] = {**sections["train"], "max_steps": 4}
    resumed = train(tiny_config(model_dir, tmp_path / "split", **sections), task, general_dataset=general, quiet=True)
    assert resumed.losses[4] == pytest.approx(whole.losses[4], rel=1e-6)
    a, b = (
        load_file(str(whole.weights_dir / "model.safetensors")),
        load_file(str(resumed.weights_dir / "model.safetensors")),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_penalty_is_recorded_per_step(model_dir, tmp_path):
    from nibblora.runs import open_run

    config = tiny_config(model_dir, tmp_path / "run", train={"mode": "lora", "max_steps": 3, "l2sp": 1.0})
    train(config, tiny_rows(8), quiet=True)
    with open_run(tmp_path / "run") as store:
        metrics = store.metrics()
    assert metrics[1]["penalty"] == 0.0  # at the start the weights are the anchor
    assert metrics[3]["penalty"] > 0.0


# -- exact match


def greedy_exact(model, rows) -> float:
    """Exact match by free greedy generation: the prompt (tokens before the first supervised label), then as many
    new tokens as the answer has; right when they are the answer."""
    correct = 0
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        first = int((labels != -100).nonzero()[0])
        out = generate(model, ids[None, :first], max_new_tokens=len(ids) - first)
        correct += out[0, first:].tolist() == ids[first:].tolist()
    return correct / len(rows)


def test_exact_match_equals_free_greedy_generation(model_dir, tmp_path):
    task = tiny_rows(12, min_len=4, max_len=8)
    config = tiny_config(
        model_dir,
        tmp_path / "run",
        data={"batch_size": 12},
        train={"max_steps": 40, "lr": 2e-2, "schedule": "constant"},
    )
    config.lora.r = 16
    result = train(config, task, {"task": task}, quiet=True)
    from nibblora.lora import load_adapter

    model = load_model(model_dir, torch.float32)
    load_adapter(model, result.weights_dir)
    scores = evaluate(model, task, 5, 0, 0, CPU, lambda: torch.no_grad())
    expected = greedy_exact(model, [task[i] for i in range(len(task))])
    assert 0 < expected  # the check means something only if some rows are right
    assert scores.exact_match == pytest.approx(expected)
    assert scores.rows == 12
    assert result.eval["eval_task_exact_match"] == pytest.approx(expected)


def test_exact_match_is_the_same_through_logits_and_through_the_fused_loss(model_dir):
    model = load_model(model_dir, torch.float32)
    rows = tiny_rows(9)
    fused = evaluate(model, rows, 4, 0, 0, CPU, lambda: torch.no_grad())
    model.loss_chunk_tokens = 0  # the plain path: full logits
    plain = evaluate(model, rows, 4, 0, 0, CPU, lambda: torch.no_grad())
    assert fused.exact_match == plain.exact_match and fused.tokens == plain.tokens
    assert fused.loss == pytest.approx(plain.loss, rel=1e-6)


def test_rows_without_a_supervised_token_are_not_scored(model_dir):
    model = load_model(model_dir, torch.float32)
    rows = TokenizedRows([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}, tiny_rows(1)[0]])
    scores = evaluate(model, rows, 2, 0, 0, CPU, lambda: torch.no_grad())
    assert scores.rows == 1


def test_a_missing_or_broken_general_set_is_one_clear_error_and_no_export(model_dir, tmp_path):
    from nibblora.errors import DataError, DataFileNotFoundError

    missing = tiny_config(
        model_dir, tmp_path / "missing", data={"general": str(tmp_path / "nope.jsonl"), "general_fraction": 0.2}
    )
    with pytest.raises(DataFileNotFoundError, match="nope.jsonl does not exist"):
        train(missing, tiny_rows(4), quiet=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    config = tiny_config(model_dir, tmp_path / "broken", data={"general": str(broken)}, train={"ewc": 1.0})
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not JSON"):
        train(config, tiny_rows(4), quiet=True)
    for run in ("missing", "broken"):
        assert not (tmp_path / run / "adapter").exists() and not (tmp_path / run / "checkpoints").exists()
