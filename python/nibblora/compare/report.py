"""The comparison's table in three forms: JSON (every number), Markdown (the table, the claims, the anchors) and
a console table. Torch-free.

    write_json(report, out / "compare.json"); write_markdown(report, out / "compare.md")
    print(console_table(report["rows"]))

`report` is the dict compare_methods builds: {"settings", "timing", "rows", "lr_sweep", "claims", ...}; every row
has ROW_KEYS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROW_KEYS = (
    "name",
    "group",
    "method",
    "mode",
    "lr",
    "trainable_params",
    "trainable_pct",
    "peak_memory_bytes",
    "estimated_memory_bytes",
    "memory_7b_bytes",
    "artifact_bytes",
    "base_tokens_per_s",
    "inference",
    "inference_note",
    "exact_match",
    "test_rows",
    "task_loss",
    "quality_vs_full",
    "general_loss_before",
    "general_loss_after",
    "forgetting",
    "train_seconds",
    "run_id",
    "run_dir",
)

ANCHORS = """\
- peft's method comparison (huggingface/peft `method_comparison/`, Llama-3.2-3B fine-tuned on MetaMathQA, GSM8K
  test accuracy): LoRA r32 .478, full fine-tuning .472, IA3 .311-.455, prompt tuning .057-.343, prefix tuning
  .186-.416. LoRA matches full fine-tuning there; prompt and prefix tuning trail, by a wide margin at their worst.
- Biderman et al. 2024, "LoRA Learns Less and Forgets Less" (TMLR): on code and math continued pretraining and
  instruction tuning of Llama-2-7B, LoRA reaches lower target-domain accuracy than full fine-tuning but keeps more
  of the base model's abilities outside it; full fine-tuning learns weight perturbations of much higher rank.
- Both are billion-parameter models trained for thousands of steps. This table is a 1.1 M-parameter model trained
  for a few hundred steps on a CPU: it tests whether the claims' direction shows up at toy scale, not their size."""


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB"


def _gb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.1f} GB"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def speed_cell(row: Mapping[str, Any]) -> str:
    """Generation speed of each variant as a multiple of the base's tokens/s: "merged 1.00x, unmerged 0.81x"."""
    parts = []
    for name, v in (row.get("inference") or {}).items():
        parts.append(f"{name} {1 / (1 + v['slowdown']):.2f}x")
    return ", ".join(parts)


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def table_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "lr",
        "trainable",
        "% of base",
        "train peak (measured)",
        "calculator, 7B",
        "artifact",
        "generation speed vs base",
        "exact match",
        "vs full FT",
        "forgetting",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["name"],
                f"{r['lr']:.0e}",
                f"{r['trainable_params']:,}",
                f"{r['trainable_pct']:.3g}%",
                _mb(r["peak_memory_bytes"]),
                _gb(r["memory_7b_bytes"]),
                _size(r["artifact_bytes"]),
                speed_cell(r),
                f"{100 * r['exact_match']:.1f}%",
                _ratio(r["quality_vs_full"]),
                f"{r['forgetting']:+.3f}",
            ]
        )
    return header, body


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header, body = table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def console_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header, body = table_rows(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def sweep_table(sweep: Sequence[Mapping[str, Any]]) -> str:
    """Every learning rate tried per method: validation task loss (what picks the rate) and test exact match."""
    lines = ["| method | lr | validation task loss | test exact match | chosen |", "| --- | --- | --- | --- | --- |"]
    for s in sweep:
        lines.append(
            f"| {s['method']} | {s['lr']:.0e} | {s['task_loss']:.4f} | {100 * s['exact_match']:.1f}% | "
            f"{'yes' if s['chosen'] else ''} |"
        )
    return "\n".join(lines)


def markdown_report(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    claims = "\n".join(f"- **{c['claim']}**: {c['verdict']}. {c['evidence']}" for c in report["claims"])
    notes = "\n".join(
        f"- {r['name']}: {r['inference_note']}; base {r['base_tokens_per_s']:.0f} tokens/s"
        + "".join(
            f", {k} {v['tokens_per_s']:.0f} ({100 * v['slowdown']:+.1f}% +-{100 * v['noise']:.1f})"
            for k, v in r["inference"].items()
        )
        for r in report["rows"]
    )
    skipped = "".join(f"\n- Not run: {x['row']} ({x['reason']})." for x in report.get("skipped", []))
    lr_choice = (
        f"the best of {s['lr_count']} on validation task loss"
        if s["lr_count"] > 1
        else "the middle of its grid (no sweep in --quick)"
    )
    command = "python -m nibblora.compare" + (" --quick" if s["quick"] else "")
    t = report["timing"]
    reused = f"; {t['runs_reused']} reused from an earlier invocation" if t.get("runs_reused") else ""
    header = " ".join(
        [
            f"Generated by `{command}` in {t['total_seconds'] / 60:.1f} min ({s['runs']} training runs,",
            f"{s.get('jobs', 1)} at a time, {s['threads']} CPU thread(s) each{reused}; the runs' own training",
            f"times add up to {t.get('runs_train_seconds', 0) / 60:.0f} min).",
            f"Base: the demo's {s['base_params']:,}-parameter Llama pretrained on the Python standard library's",
            f"source. Every run: {s['steps']} optimizer steps x {s['batch_size']} rows of the demo's instruction tasks",
            f"(the same token budget for every method), float32 on {s['device']}; each method's learning rate is",
            f"{lr_choice}.",
            f"Exact match: free greedy generation on {s['test_rows']} held-out test prompts (the base model alone:",
            f"{100 * s['base_exact_match']:.1f}%). Forgetting: loss on held-out stdlib text after fine-tuning minus",
            f"before (before: {s['general_loss_before']:.3f}; the NF4 base: {s['general_loss_before_nf4']:.3f}).",
        ]
    )
    return f"""# Parameter-efficient methods compared, measured

{header}

{markdown_table(report["rows"])}

Columns: trainable parameters (count, and share of the base's {s["base_params"]:,}); training peak memory as
measured by the trainer's meter ({s["memory_method"]}); the memory calculator's figure for the same method on
Llama-2-7B (batch 1 x 512 tokens, bf16, gradient checkpointing; see the notes below); the exported weights on disk
(adapter folder, or the whole model for full fine-tuning, without the trainer's resume copy); greedy generation
speed as a multiple of the base model's, per CPU-second (merged: folded into the weights; unmerged: applied at run
time); exact match on the test split;
that exact match as a share of full fine-tuning's; forgetting.

## The lesson's claims, judged from these numbers

{claims}

## Anchors

{ANCHORS}

## Learning-rate sweep

{sweep_table(report["lr_sweep"])}

## Inference timing

{notes}

## Notes

{report["notes"]}{skipped}
"""


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    return path


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    path.write_text(markdown_report(report))
    return path
