"""Everything the runs share, made once in the output folder: the pretrained tiny base and the prepared data.

    ws = prepare_workspace(out, base=None, pretrain_steps=1200)
    ws.base_dir, ws.data["train"], ws.test_examples, ws.general_before["dense"]

The data is the demo's (nibblora.demo): 3,000 instruction rows with checkable answers prepared by nibblora.data
(ChatML, everything but the answers masked), a validation split the trainer scores every run on (task loss picks
each method's learning rate), a disjoint test split scored by free greedy generation (the exact match reported),
held-out stdlib text (forgetting is measured there) and pretraining stdlib text (replayed by the general-data
mitigation and used for EWC's Fisher estimate).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from nibblora.data import prepare_dataset
from nibblora.demo import tasks, tiny_base
from nibblora.demo.evaluation import exact_match, general_rows, mean_loss
from nibblora.errors import ExportError
from nibblora.models import load_model
from nibblora.train import open_dataset

TRAIN_ROWS, VAL_ROWS, TEST_ROWS = 3000, 120, 300
GENERAL_EVAL_ROWS, GENERAL_TRAIN_ROWS, GENERAL_SEQ_LEN = 48, 400, 64


@dataclass
class Workspace:
    base_dir: Path
    data_dir: Path
    tokenizer: Tokenizer
    pad_id: int
    data: dict[str, Path] = field(default_factory=dict)  # train, task (validation), general (eval), general_train
    test_examples: list[dict] = field(default_factory=list)
    base_params: int = 0
    base_config: dict = field(default_factory=dict)  # the base's config.json
    longest_train_row: int = 0  # tokens: the calculator's sequence length for the run as trained
    # Loss on the held-out stdlib text before fine-tuning: "dense" base, and "nf4" for runs over a 4-bit base.
    general_before: dict[str, float] = field(default_factory=dict)
    base_exact_match: dict[str, float] = field(default_factory=dict)


def find_base(out: Path, base: Path | None, pretrain_steps: int, log) -> Path:
    """The base to fine-tune: `base` when given (it must be a tiny base nibblora.demo wrote), else one already
    pretrained in out/base or build/demo/base, else a fresh one pretrained into out/base."""
    if base is not None:
        if not tiny_base.is_pretrained_base(base):
            raise ExportError(
                f"--base {base}: not a base nibblora.demo.tiny_base pretrained (needs config.json of its shape, "
                "model.safetensors and tokenizer.json); omit --base to pretrain one"
            )
        return base
    for candidate in (out / "base", Path("build") / "demo" / "base"):
        if tiny_base.is_pretrained_base(candidate):
            log(f"reusing the pretrained base in {candidate}")
            return candidate
    log(f"pretraining the tiny base into {out / 'base'} ({pretrain_steps} steps, about 1.5 min on 2 cores)")
    shutil.rmtree(out / "base", ignore_errors=True)
    return tiny_base.pretrain(out / "base", steps=pretrain_steps, log_every=max(1, pretrain_steps // 4))


def prepare_workspace(out: Path, base: Path | None, pretrain_steps: int, test_rows: int, log) -> Workspace:
    base_dir = find_base(out, base, pretrain_steps, log)
    tokenizer = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(base_dir, data_dir, tokenizer, tokenizer.token_to_id("<pad>"))

    train = tasks.make_examples(TRAIN_ROWS, seed=1)
    val = tasks.held_out_examples(train, VAL_ROWS, seed=2)
    ws.test_examples = tasks.held_out_examples(train, test_rows, seed=3, exclude=val)
    for name, examples in (("train", train), ("task", val)):
        prepare_dataset(
            [tasks.as_conversation(e) for e in examples],
            data_dir / name,
            tokenizer=base_dir / "tokenizer.json",
            template="chatml",
            overwrite=True,
        )
        ws.data[name] = data_dir / name
    ws.base_config = json.loads((base_dir / "config.json").read_text())
    train_set = open_dataset(ws.data["train"])
    ws.longest_train_row = max(len(train_set[i]["input_ids"]) for i in range(len(train_set)))
    general_eval = general_rows(tokenizer, GENERAL_EVAL_ROWS, GENERAL_SEQ_LEN, held_out=True)
    general_eval.to_jsonl(data_dir / "general_eval.jsonl")
    general_rows(tokenizer, GENERAL_TRAIN_ROWS, GENERAL_SEQ_LEN, held_out=False).to_jsonl(data_dir / "general.jsonl")
    ws.data["general"], ws.data["general_train"] = data_dir / "general_eval.jsonl", data_dir / "general.jsonl"

    for kind, quantize in (("dense", None), ("nf4", "nf4")):
        model = load_model(base_dir, torch.float32, quantize=quantize)
        if kind == "dense":
            ws.base_params = sum(p.numel() for p in model.parameters())
        ws.general_before[kind] = mean_loss(model, general_eval, ws.pad_id)
        ws.base_exact_match[kind] = exact_match(model, tokenizer, ws.test_examples)
    log(
        f"data: {len(train)} training rows, {len(val)} validation rows (learning-rate choice), "
        f"{len(ws.test_examples)} test rows (exact match); general-text loss before: "
        f"{ws.general_before['dense']:.3f} (NF4 base {ws.general_before['nf4']:.3f})"
    )
    return ws
