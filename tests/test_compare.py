"""python -m nibblora.compare: a tiny end-to-end comparison whose table is checked against the files and models it
describes, the claim verdicts on synthetic numbers (each flips when the numbers do), the plan, and the memory
calculator's exact trainable counts for the methods beyond LoRA."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nibblora.compare import claims
from nibblora.compare.plan import LORA_RECIPE, Plan
from nibblora.compare.report import ROW_KEYS

# --- the claim verdicts, on synthetic numbers ---------------------------------------------------------------------


def row(exact_match=0.5, forgetting=0.5, test_rows=1000, **inference):
    return {
        "exact_match": exact_match,
        "forgetting": forgetting,
        "test_rows": test_rows,
        "inference": {k: {"slowdown": v, "noise": 0.0, "tokens_per_s": 100.0} for k, v in inference.items()},
    }


def verdicts(rows):
    return {v.key: v for v in claims.judge_claims(rows)}


def test_lora_close_to_full_flips_at_98_percent_of_full():
    assert verdicts({"lora": row(0.49), "full": row(0.50)})["lora_close_to_full"].holds is True  # 98%
    assert verdicts({"lora": row(0.48), "full": row(0.50)})["lora_close_to_full"].holds is False  # 96%
    assert verdicts({"lora": row(0.60), "full": row(0.50)})["lora_close_to_full"].holds is True  # above is fine
    v = verdicts({"lora": row(0.48), "full": row(0.50)})["lora_close_to_full"]
    assert "48.0%" in v.evidence and "50.0%" in v.evidence and "96.0% of full" in v.evidence


def test_qlora_slightly_below_lora_fails_above_lora_and_far_below_it():
    judge = lambda q, lo: verdicts({"qlora": row(q), "lora": row(lo)})["qlora_slightly_below_lora"].holds  # noqa: E731
    assert judge(0.48, 0.50) is True
    assert judge(0.50, 0.50) is True
    assert judge(0.52, 0.50) is False
    assert judge(0.40, 0.50) is False


def test_lora_forgets_less_compares_the_forgetting_columns():
    assert verdicts({"lora": row(forgetting=0.2), "full": row(forgetting=1.0)})["lora_forgets_less"].holds is True
    assert verdicts({"lora": row(forgetting=1.2), "full": row(forgetting=1.0)})["lora_forgets_less"].holds is False


def test_prompt_tuning_weak_below_half_of_full():
    assert verdicts({"prompt": row(0.2), "full": row(0.5)})["prompt_tuning_weak"].holds is True
    assert verdicts({"prompt": row(0.3), "full": row(0.5)})["prompt_tuning_weak"].holds is False


def test_latency_claims_follow_the_measured_slowdowns_and_their_noise():
    assert verdicts({"adapter": row(unmerged=0.25)})["adapters_add_latency"].holds is True
    assert verdicts({"adapter": row(unmerged=0.01)})["adapters_add_latency"].holds is False
    noisy = {"adapter": row(unmerged=0.25)}
    noisy["adapter"]["inference"]["unmerged"]["noise"] = 0.4  # a slowdown inside the timing noise does not count
    assert verdicts(noisy)["adapters_add_latency"].holds is False
    assert verdicts({"lora": row(merged=0.01, unmerged=0.3)})["merged_lora_adds_none"].holds is True
    assert verdicts({"lora": row(merged=0.20, unmerged=0.3)})["merged_lora_adds_none"].holds is False


def test_a_claim_without_its_rows_is_not_measured_rather_than_judged():
    v = verdicts({"lora": row()})
    assert v["lora_close_to_full"].holds is None and v["lora_close_to_full"].label == "not measured"
    assert v["adapters_add_latency"].holds is None
    zero_full = verdicts({"lora": row(0.1), "full": row(0.0)})["lora_close_to_full"]
    assert zero_full.holds is None


def test_sampling_noise_is_stated_when_the_margin_is_inside_it():
    v = verdicts({"lora": row(0.48, test_rows=50), "full": row(0.50, test_rows=50)})["lora_close_to_full"]
    assert "within sampling noise" in v.evidence
    assert claims.noise_points(0.5, 0.5, 100, 100) == pytest.approx(196 * math.sqrt(0.005))


# --- the plan -------------------------------------------------------------------------------------------------------


def test_the_full_plan_sweeps_three_rates_per_method_then_ranks_and_mitigations():
    plan = Plan.full()
    sweep = plan.sweep()
    assert len(sweep) == 8 * 3 and len({s.run_id for s in sweep}) == len(sweep)
    follow = plan.follow_ups({"lora": 3e-3, "full": 1e-4})
    ranks = sorted(s.settings["lora"]["r"] for s in follow if s.group == "rank")
    assert ranks == [1, 2, 4, 8, 64]  # r 16 is the lora row itself
    assert all(s.settings["lora"]["alpha"] == 2 * s.settings["lora"]["r"] for s in follow if s.group == "rank")
    assert all(s.lr == 3e-3 for s in follow if s.group == "rank")
    mitigations = [s for s in follow if s.group == "mitigation"]
    assert {s.mode for s in mitigations} == {"full"} and all(s.lr == 1e-4 for s in mitigations)
    assert plan.run_count() == len(sweep) + len(follow)
    assert LORA_RECIPE["r"] == 16


def test_the_best_rate_is_the_lowest_validation_loss_and_a_diverged_run_never_wins():
    from nibblora.compare.tool import best_by_task_loss

    outcomes = [
        {"method": "lora", "run_id": "a", "task_loss": 0.9},
        {"method": "lora", "run_id": "b", "task_loss": 0.7},
        {"method": "lora", "run_id": "c", "task_loss": float("nan")},
        {"method": "full", "run_id": "d", "task_loss": float("inf")},
    ]
    best = best_by_task_loss(outcomes)
    assert best["lora"]["run_id"] == "b" and "full" not in best


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "lora,nope"], "--methods: unknown nope"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--jobs", "0"], "--jobs must be >= 1"),
    ],
)
def test_bad_arguments_are_one_usage_line_and_exit_2(argv, message, capsys):
    from nibblora.compare.cli import main

    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_a_base_that_is_not_a_tiny_base_is_one_error_line(tmp_path, capsys):
    from nibblora.compare.cli import main

    assert main(["--out", str(tmp_path / "out"), "--base", str(tmp_path), "--methods", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nibblora.compare: error: --base ") and err.count("\n") == 1


# --- the memory calculator's exact trainable counts -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dora", "ia3", "prompt", "prefix", "adapter", "prefix-projection", "pfeiffer"])
def test_method_trainable_params_equal_the_injected_models(mode):
    from nibblora import methods
    from nibblora.lora.params import DecoderShape
    from nibblora.memory import estimate_method_memory, method_trainable_params
    from nibblora.models import LlamaForCausalLM, ModelConfig

    config = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    shape = DecoderShape.from_config(config)
    if mode == "dora":
        methods.inject_dora(model, "all-linear", r=4, alpha=8)
        expected = method_trainable_params(shape, "dora", r=4)
    elif mode == "ia3":
        methods.inject_ia3(model)
        expected = method_trainable_params(shape, "ia3")
    elif mode == "prompt":
        methods.inject_prompt_tuning(model, 5)
        expected = method_trainable_params(shape, "prompt", num_virtual_tokens=5)
    elif mode == "prefix":
        methods.inject_prefix_tuning(model, 5)
        expected = method_trainable_params(shape, "prefix", num_virtual_tokens=5)
    elif mode == "prefix-projection":
        methods.inject_prefix_tuning(model, 5, projection_hidden=24)
        expected = method_trainable_params(shape, "prefix", num_virtual_tokens=5, projection_hidden=24)
    else:
        variant = "houlsby" if mode == "adapter" else "pfeiffer"
        methods.inject_bottleneck(model, variant, 6)
        expected = method_trainable_params(shape, "adapter", adapter_variant=variant, bottleneck_size=6)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    base_mode = mode.split("-")[0] if mode != "pfeiffer" else "adapter"
    est = estimate_method_memory(config, base_mode, r=4, batch_size=2, seq_len=16, dtype="float32")
    assert est.components["optimizer_states"] == 2 * est.components["gradients"] > 0


def test_the_7b_figures_order_the_methods_as_their_trainable_state_does():
    from nibblora.memory import estimate_memory, estimate_method_memory

    lora = estimate_memory("llama-2-7b", "lora", r=16).total_bytes
    ia3 = estimate_method_memory("llama-2-7b", "ia3").total_bytes
    prompt = estimate_method_memory("llama-2-7b", "prompt").total_bytes
    full = estimate_memory("llama-2-7b", "full", r=16).total_bytes
    # The frozen bf16 base (13.5 GB) dominates every adapter method; full fine-tuning is 16 bytes per parameter.
    assert 13e9 < prompt < ia3 < lora < 16e9 < 100e9 < full


# --- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from nibblora.demo.tiny_base import pretrain

    return pretrain(tmp_path_factory.mktemp("base") / "base", steps=3, text_chars=60_000, log_every=100)


@pytest.fixture(scope="module")
def comparison(tiny_base, tmp_path_factory):
    from nibblora.compare import compare_methods, workspace

    plan = replace(
        Plan.quick(),
        steps=3,
        batch_size=4,
        lr_count=1,
        ranks=(4, 16),
        mitigations=("full + ewc 1",),
        methods=("full", "lora", "prefix"),
        eval_every=3,
        timing_rounds=2,
    )
    out = tmp_path_factory.mktemp("compare")
    lines: list[str] = []
    # Smaller data than the real comparison's (prepared here, in the parent: workers only read it).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workspace, "TRAIN_ROWS", 240)
        patch.setattr(workspace, "VAL_ROWS", 12)
        patch.setattr(workspace, "GENERAL_EVAL_ROWS", 8)
        patch.setattr(workspace, "GENERAL_TRAIN_ROWS", 24)
        # Two runs at a time in worker processes: the pool path, and everything a worker is sent, is exercised.
        summary = compare_methods(out, base=tiny_base, plan=plan, test_rows=6, threads=1, jobs=2, log=lines.append)
    return summary, lines


def test_the_json_has_every_column_for_every_row(comparison):
    summary, _ = comparison
    report = json.loads(summary.files["json"].read_text())
    assert [r["name"] for r in report["rows"]] == ["full", "lora", "prefix", "lora r4", "lora r16", "full + ewc 1"]
    for r in report["rows"]:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert 0 <= r["exact_match"] <= 1 and r["test_rows"] == 6
        assert r["forgetting"] == pytest.approx(r["general_loss_after"] - r["general_loss_before"])
        assert math.isfinite(r["task_loss"]) and r["train_seconds"] > 0
        assert r["peak_memory_bytes"] > 0 and r["estimated_memory_bytes"] > 0
        assert r["memory_7b_bytes"] > 1e9
        assert r["base_tokens_per_s"] > 0
        for v in r["inference"].values():
            assert v["tokens_per_s"] > 0 and v["noise"] >= 0
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["full"]["quality_vs_full"] == (1.0 if rows["full"]["exact_match"] > 0 else None)
    assert rows["full"]["trainable_pct"] == 100.0
    assert set(rows["lora"]["inference"]) == {"unmerged", "merged"}
    assert set(rows["prefix"]["inference"]) == {"unmerged"} and "key/value" in rows["prefix"]["inference_note"]
    assert rows["lora r16"]["run_id"] == rows["lora"]["run_id"]
    assert rows["lora r4"]["trainable_params"] * 4 == rows["lora"]["trainable_params"]
    assert {c["key"] for c in report["claims"]} == {f.__name__ for f in claims.CLAIMS}
    assert len(report["lr_sweep"]) == 3 and all(s["chosen"] for s in report["lr_sweep"])


def test_trainable_counts_and_sizes_equal_the_models_and_files(comparison):
    from nibblora.train import build_model, config_from_dict

    summary, _ = comparison
    for r in summary.report["rows"]:
        outcome = json.loads((Path(r["run_dir"]) / "outcome.json").read_text())
        _, trainable = build_model(config_from_dict(outcome["config"]), torch.device("cpu"))
        assert r["trainable_params"] == trainable, r["name"]
        weights = Path(outcome["weights_dir"])
        shipped = [p for p in weights.rglob("*") if p.is_file() and p.name != "trainable.safetensors"]
        assert r["artifact_bytes"] == sum(p.stat().st_size for p in shipped) > 0
        assert (weights / ("model.safetensors" if r["mode"] == "full" else "adapter_model.safetensors")).is_file()


def test_markdown_png_run_stores_and_progress_lines_are_written(comparison):
    from nibblora.runs import list_runs

    summary, lines = comparison
    markdown = summary.files["markdown"].read_text()
    for r in summary.report["rows"]:
        assert f"| {r['name']} |" in markdown
    assert "## The lesson's claims" in markdown and "Biderman" in markdown and ".478" in markdown
    assert summary.files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list_runs(summary.out / "runs")
    assert {run.status for run in runs} == {"finished"} and len(runs) == 5
    progress = [line for line in lines if line.startswith("run ")]
    assert [line.split()[1] for line in progress] == [f"{i}/5" for i in range(1, 6)]
    assert all(" lr " in line and "exact match" in line and "elapsed)" in line for line in progress)
    ewc = next(run for run in runs if run.run_id.startswith("full-ewc"))
    assert ewc.config["train"]["ewc"] == 1.0 and ewc.config["data"]["general"].endswith("general.jsonl")
    assert not summary.report["skipped"]
    assert "claims:" in summary.format()


def test_a_rerun_reuses_finished_runs(comparison):
    from nibblora.compare.runner import OUTCOME_NAME, run_training

    summary, _ = comparison
    lora = next(r for r in summary.report["rows"] if r["name"] == "lora")
    saved = json.loads((Path(lora["run_dir"]) / OUTCOME_NAME).read_text())
    plan = replace(Plan.quick(), steps=3, batch_size=4, lr_count=1, methods=("lora",), eval_every=3, timing_rounds=2)
    ws = workspace_of(summary)
    again = run_training(plan.sweep()[0], plan, ws, summary.out / "runs", threads=1)
    assert again["reused"] is True and again["config"] == saved["config"]
    changed = replace(plan, steps=4)  # another config: not reused (not run here either: only the check is)
    from nibblora.compare.runner import training_config

    assert training_config(plan.sweep()[0], changed, ws, Path(lora["run_dir"]), 1) != saved["config"]


def workspace_of(summary):
    """The Workspace the comparison used, rebuilt from its files without preparing anything again."""
    from tokenizers import Tokenizer

    from nibblora.compare.workspace import Workspace

    s = summary.report["settings"]
    base, data = Path(s["base_dir"]), summary.out / "data"
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    ws = Workspace(base, data, tokenizer, tokenizer.token_to_id("<pad>"))
    ws.data = {
        "train": data / "train",
        "task": data / "task",
        "general": data / "general_eval.jsonl",
        "general_train": data / "general.jsonl",
    }
    ws.test_examples = [None] * s["test_rows"]
    return ws
