"""nibblora end to end on two CPU cores, nothing downloaded (`make demo`, a few minutes):

1. pretrain a tiny Llama on the Python standard library's source (nibblora.demo.tiny_base), with its own BPE
2. generate an instruction set with checkable answers, prepared by nibblora.data (ChatML, prompt masked)
3. QLoRA fine-tuning with `python -m nibblora.train`, recorded in the run store (watch it with qlora-tui)
4. exact-match accuracy on held-out tasks and loss on held-out stdlib text, before and after
5. quantize the base to NF4 (nibblora.quantize), merge the adapter into it (nibblora.merge, Rust), verify the
   merged model's logits against base + adapter (nibblora.verify) and that it answers exactly as the adapter does
6. a closing table
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from nibblora.data import prepare_dataset
from nibblora.demo import tasks as demo_tasks
from nibblora.demo import tiny_base as pretrain_tiny
from nibblora.demo.evaluation import exact_match, general_rows, mean_loss
from nibblora.lora import load_adapter
from nibblora.merge import merge_checkpoint
from nibblora.models import load_model
from nibblora.quantize import quantize_checkpoint
from nibblora.runs import open_run
from nibblora.verify import verify_merge

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description="nibblora's fine-tuning demo")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo")
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--reuse-base", action="store_true", help="keep an already pretrained base model")
    args = parser.parse_args()
    start = time.perf_counter()
    work = args.work
    base_dir, run_dir = work / "base", work / "run"

    print("== 1. pretraining a tiny Llama on the Python standard library")
    if not (args.reuse_base and (base_dir / "model.safetensors").is_file()):
        pretrain_tiny.pretrain(base_dir, steps=args.pretrain_steps)
    tokenizer = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    pad_id = tokenizer.token_to_id("<pad>")

    print("== 2. generating the instruction set")
    train_examples = demo_tasks.make_examples(3000, seed=1)
    # Held-out rows are fresh draws; prompts seen in training are dropped, except for the addition table (100
    # prompts in all, every one of them in the training set).
    held_out = demo_tasks.held_out_examples(train_examples, 120, seed=2)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    # nibblora.data (Rust): ChatML rendered once per conversation, tokenized once, labels -100 everywhere but
    # the assistant's answer and its <|im_end|>.
    for name, examples in (("train", train_examples), ("task_eval", held_out)):
        summary = prepare_dataset(
            [demo_tasks.as_conversation(e) for e in examples],
            data_dir / name,
            tokenizer=base_dir / "tokenizer.json",
            template="chatml",
            overwrite=True,
        )
        print(
            f"   prepared {name}: {summary.rows_out:,} rows, {summary.tokens:,} tokens, "
            f"{summary.supervised_tokens / summary.tokens:.0%} supervised"
        )
    general = general_rows(tokenizer)
    general.to_jsonl(data_dir / "general_eval.jsonl")
    print(f"   {len(train_examples)} training rows, {len(held_out)} held-out rows over {len(demo_tasks.TASKS)} tasks")

    print("== 3. before fine-tuning (the 4-bit base alone)")
    base = load_model(base_dir, torch.float32, quantize="nf4")
    acc_before, general_before = exact_match(base, tokenizer, held_out), mean_loss(base, general, pad_id)
    print(f"   exact match {acc_before:.1%}, general-text loss {general_before:.3f}")

    print("== 4. QLoRA fine-tuning: python -m nibblora.train (run store: build/demo/run/runs.sqlite)")
    config = work / "qlora.toml"
    config.write_text(f"""\
output_dir = "{run_dir}"
run_name = "finetune-demo"
[model]
path = "{base_dir}"
dtype = "float32"            # CPU: float32 or bfloat16
gradient_checkpointing = false   # a tiny model: recomputing costs more than it saves
[lora]
r = 16
alpha = 32.0
dropout = 0.05
target_modules = "all-linear"
[data]
train = "{data_dir / "train"}"
eval = {{ task = "{data_dir / "task_eval"}", general = "{data_dir / "general_eval.jsonl"}" }}
batch_size = 16
pad_token_id = {pad_id}
[train]
mode = "qlora"
max_steps = {args.steps}
lr = 2e-3
warmup_steps = 10
grad_accum = 1
max_grad_norm = 1.0
log_every = 25
device = "cpu"
[eval]
every = 50
[checkpoint]
every = 50
resume = false
""")
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "nibblora.train", str(config)], check=True, env=env)

    print("== 5. after fine-tuning")
    tuned = load_model(base_dir, torch.float32, quantize="nf4")
    load_adapter(tuned, run_dir / "adapter")
    acc_after, general_after = exact_match(tuned, tokenizer, held_out), mean_loss(tuned, general, pad_id)
    print(f"   exact match {acc_after:.1%}, general-text loss {general_after:.3f}")
    per_task = {
        t: exact_match(tuned, tokenizer, [e for e in held_out if e["task"] == t])
        if any(e["task"] == t for e in held_out)
        else None
        for t in demo_tasks.TASKS
    }
    print("   by task: " + ", ".join(f"{t} {a:.0%}" for t, a in per_task.items() if a is not None))

    print("== 6. merging the adapter: nibblora.quantize -> nibblora.merge (Rust) -> nibblora.verify")
    # QLoRA trained against the NF4 base, so merge into exactly that: quantize the base (the same bytes
    # load_model(quantize="nf4") made), then merge, which dequantizes to float32 and adds scaling * B @ A once.
    quantize_checkpoint(
        base_dir, work / "base-nf4", quant_type="nf4", compute_dtype="float32", overwrite=True, progress=False
    )
    merge_checkpoint(
        work / "base-nf4", [run_dir / "adapter"], work / "merged", dtype="float32", overwrite=True, progress=False
    )
    report = verify_merge(work / "base-nf4", run_dir / "adapter", work / "merged", dtype=torch.float32)
    merged = load_model(work / "merged", torch.float32)
    acc_merged = exact_match(merged, tokenizer, held_out)
    assert report.max_abs_logit_diff < 1e-3 and acc_merged == acc_after, (
        report.max_abs_logit_diff,
        acc_merged,
        acc_after,
    )
    print(
        f"   merged logits within {report.max_abs_logit_diff:.1e} of base + adapter (max KL {report.max_kl:.1e}); "
        f"merged exact match {acc_merged:.1%} (same)"
    )

    with open_run(run_dir) as store:
        last = store.metrics()[max(store.metrics())]
        info = store.run()
        speeds = [v for _, v in store.metric("tokens_per_s")]
    adapter_bytes = sum(p.stat().st_size for p in (run_dir / "adapter").iterdir())
    trainable = sum(
        m.adapter.lora_A.numel() + m.adapter.lora_B.numel()
        for m in load_adapter(load_model(base_dir, torch.float32, quantize="nf4"), run_dir / "adapter").values()
    )
    rows = [
        ("exact-match accuracy (held out)", f"{acc_before:.1%}", f"{acc_after:.1%}"),
        ("general-text loss (held-out stdlib)", f"{general_before:.3f}", f"{general_after:.3f}"),
        ("trainable parameters", "", f"{trainable:,}"),
        ("adapter size on disk", "", f"{adapter_bytes / 1e6:.2f} MB"),
        (
            "peak memory (measured) / estimate",
            "",
            f"{last['mem_peak_bytes'] / 1e6:.0f} MB / {last['mem_estimate_bytes'] / 1e6:.0f} MB",
        ),
        ("training tokens/s (median)", "", f"{sorted(speeds)[len(speeds) // 2]:.0f}"),
        ("run status", "", info.status),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'before':>10}  {'after':>20}")
    for name, before, after in rows:
        print(f"{name:<{width}}  {before:>10}  {after:>20}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; run store: {run_dir / 'runs.sqlite'}")


if __name__ == "__main__":
    main()
