"""Inference overhead: greedy generation speed (tokens per CPU-second) of each fine-tuned model against the base.

    timing = measure_inference(spec, ws, weights_dir, scratch, rounds=5)
    timing["variants"]["merged"] == {"tokens_per_s": ..., "slowdown": 0.004, "noise": 0.01}

Variants: "unmerged" is the base with the method applied at run time (LoRA / DoRA / IA3 layers, prompt tuning's
virtual tokens, prefix tuning's extra key/value entries, bottleneck adapter layers); "merged" is the method folded
into the weights, which has the base's architecture (LoRA, QLoRA and DoRA merged by nibblora.merge as a user would,
IA3 by merge_ia3; full fine-tuning is already a plain model). QLoRA's unmerged variant runs over the 4-bit base,
so "4-bit base" times that base alone to show what the adapter adds on top.

The base and the variants are timed in interleaved rounds, in CPU seconds of this process (a neighbour's load
does not count, though it still changes how fast the cores run, from one minute to the next); the slowdown is the
median over rounds of time(variant) / time(base) within the round, and the noise an A/A comparison: the base timed
a second time in every round, judged the same way. A tiny model on a CPU is dominated by per-layer overhead, so
the numbers say what each method adds per decoder step, not what it costs a 7B model on a GPU.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibblora.compare.plan import RunSpec
from nibblora.compare.runner import load_trained
from nibblora.compare.workspace import Workspace
from nibblora.demo import tasks
from nibblora.models import generate, load_model

PROMPTS, NEW_TOKENS = 8, 24


def prompt_batch(ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """The first PROMPTS test prompts, left-padded: (input_ids, attention_mask), int64 [PROMPTS, longest]."""
    prompts = [
        ws.tokenizer.encode(tasks.render_prompt(e["prompt"]), add_special_tokens=False).ids
        for e in ws.test_examples[:PROMPTS]
    ]
    longest = max(map(len, prompts))
    ids = torch.tensor([[ws.pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def generation_seconds(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """CPU seconds this process spends on greedy generation of exactly NEW_TOKENS tokens per prompt (no
    end-of-turn stop). CPU time, not wall time: on a shared machine the wall clock also counts the time other
    processes held the cores, which differs from one timing to the next; the work a model costs does not."""
    start = time.process_time()
    generate(model, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask, eos_token_id=[])
    return time.process_time() - start


def time_against_base(
    base: nn.Module, variants: dict[str, nn.Module], ids: torch.Tensor, mask: torch.Tensor, rounds: int
) -> dict[str, Any]:
    """tokens per CPU-second of the base and of each variant, each variant's slowdown against the base and the
    timing noise (fractions). Every round times the base, each variant, and the base again, in a rotating order;
    a variant's slowdown is the median over rounds of its time over the mean of that round's two base times (so a
    machine that speeds up or slows down between rounds cancels out), and the noise is the same statistic for the
    base's second timing against its first: an A/A comparison."""
    models = {"base": base, **variants, "base again": base}
    for model in models.values():
        generation_seconds(model, ids, mask)  # warm-up: first-call allocations and caches
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(generation_seconds(models[name], ids, mask))
    base_per_round = [(a + b) / 2 for a, b in zip(times["base"], times["base again"])]
    tokens = ids.shape[0] * NEW_TOKENS
    noise = abs(statistics.median(b / a for a, b in zip(times["base"], times["base again"])) - 1)
    return {
        "base_tokens_per_s": tokens / statistics.median(base_per_round),
        "variants": {
            name: {
                "tokens_per_s": tokens / statistics.median(times[name]),
                "slowdown": statistics.median(t / b for t, b in zip(times[name], base_per_round)) - 1,
                "noise": noise,
            }
            for name in variants
        },
    }


def variant_loaders(
    spec: RunSpec, ws: Workspace, weights_dir: Path, scratch: Path
) -> dict[str, Callable[[], nn.Module]]:
    """How to build each inference variant of this run's model (see the module docstring)."""
    unmerged = lambda: load_trained(spec, ws, weights_dir)  # noqa: E731
    if spec.mode == "full":
        return {"merged": unmerged}
    variants: dict[str, Callable[[], nn.Module]] = {"unmerged": unmerged}
    if spec.mode in ("lora", "qlora", "dora"):
        variants["merged"] = lambda: merged_lora(spec, ws, weights_dir, scratch)
    elif spec.mode == "ia3":
        from nibblora.methods import merge_ia3

        variants["merged"] = lambda: merge_ia3(load_trained(spec, ws, weights_dir)).eval()
    if spec.mode == "qlora":
        variants["4-bit base"] = lambda: load_model(ws.base_dir, torch.float32, quantize="nf4")
    return variants


def nf4_base(ws: Workspace, scratch: Path) -> Path:
    """The base quantized to NF4 (the bytes QLoRA trained against), written once under scratch."""
    folder = scratch / "base-nf4"
    if not (folder / "config.json").is_file():
        from nibblora.quantize import quantize_checkpoint

        quantize_checkpoint(
            ws.base_dir, folder, quant_type="nf4", compute_dtype="float32", overwrite=True, progress=False
        )
    return folder


def merged_lora(spec: RunSpec, ws: Workspace, weights_dir: Path, scratch: Path) -> nn.Module:
    """LoRA / DoRA merged into the dense base, QLoRA into the dequantized NF4 base: nibblora.merge's output."""
    from nibblora.merge import merge_checkpoint

    base = nf4_base(ws, scratch) if spec.mode == "qlora" else ws.base_dir
    out = scratch / f"merged-{spec.run_id}"
    merge_checkpoint(base, [weights_dir], out, dtype="float32", overwrite=True, progress=False)
    model = load_model(out, torch.float32).eval()
    shutil.rmtree(out, ignore_errors=True)
    return model


def overhead_note(spec: RunSpec) -> str:
    """What the unmerged method adds to each forward, in words."""
    s = spec.settings
    if spec.mode == "prompt":
        return f"+{s['prompt']['num_virtual_tokens']} virtual input tokens"
    if spec.mode == "prefix":
        return f"+{s['prefix']['num_virtual_tokens']} key/value entries per layer"
    if spec.mode == "adapter":
        per_layer = 2 if s["adapter"]["variant"] == "houlsby" else 1
        return f"{per_layer} bottleneck layers per decoder layer"
    if spec.mode in ("lora", "qlora", "dora"):
        return "adapter matmuls per projection unless merged"
    if spec.mode == "ia3":
        return "a scale per k, v, down_proj unless merged"
    return "the base's architecture"


def measure_inference(spec: RunSpec, ws: Workspace, weights_dir: Path, scratch: Path, rounds: int) -> dict[str, Any]:
    ids, mask = prompt_batch(ws)
    base = load_model(ws.base_dir, torch.float32).eval()
    variants = {name: build() for name, build in variant_loaders(spec, ws, weights_dir, scratch).items()}
    # Denormal floats (tiny weights a weight-decayed pretraining leaves) make x86 float math many times slower:
    # flushed to zero while timing, a model's speed depends on its shape and method, not on its values.
    torch.set_flush_denormal(True)
    try:
        timing = time_against_base(base, variants, ids, mask, rounds)
    finally:
        torch.set_flush_denormal(False)
    timing["note"] = overhead_note(spec)
    return timing
