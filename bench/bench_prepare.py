"""Data preparation benchmark: nibblora end to end against transformers, TRL and the tokenizers ceiling.

    python bench/bench_prepare.py [--conversations 20000] [--reference-sample 2000]

One run, same machine, same tokenizer (a byte-level BPE with 8k merges trained here, the GPT-2 / Llama-3 / Qwen
kind) and the ChatML template with generation tags:
- nibblora: prepare_dataset from a JSONL file (read, render, tokenize, mask, pack into 2048-token rows, write).
- (a) transformers apply_chat_template(..., return_assistant_tokens_mask=True), example by example.
- (b) TRL's SFT dataset preparation (SFTTrainer with assistant_only_loss), when trl is installed.
- (c) tokenizers' encode_batch_fast on the pre-rendered strings: no template, no masks, no writing (a ceiling).
Peak memory: nibblora in a child process at a quarter and at the full dataset size (max RSS).
(a) and (b) run on a sample and are reported as rates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the model data training loss token batch answer question because system user helpful assistant write code "
    "python function return value list dictionary explain step first second then finally example result "
    "number 42 3.14 café naïve 日本語 🤖 Ωμέγα quickly brown fox jumps over lazy dog sea wave harbor wind"
).split()


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 50))) + "?"})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(30, 120)))})
        rows.append({"messages": messages})
    return rows


def train_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(random.Random(i).choices(WORDS, k=200)) for i in range(2000)]
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return folder


def child_peak_rss(tok: Path, src: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of prepare_dataset in a fresh process."""
    code = (
        "import sys, time, resource; from nibblora.data import prepare_dataset; t=time.perf_counter(); "
        f"prepare_dataset([{str(src)!r}], {str(out)!r}, tokenizer={str(tok)!r}, template='chatml', "
        "max_length=2048, pack=True, overwrite=True); "
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "python"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    seconds, rss = result.stdout.split()
    return float(seconds), float(rss)


def bench_trl(tok: Path, rows: list[dict]) -> float | None:
    try:
        import datasets
        import transformers
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:
        print(f"(b) TRL: skipped ({err})")
        return None
    from nibblora import _native

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = _native.named_template_source("chatml")
    config = transformers.LlamaConfig(
        vocab_size=len(hf),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        # A CPU machine: TRL defaults to bf16 mixed precision and refuses to start without use_cpu / bf16=False.
        args = SFTConfig(
            output_dir=out,
            assistant_only_loss=True,
            max_length=2048,
            packing=True,
            report_to=[],
            dataset_num_proc=None,
            use_cpu=True,
            bf16=False,
        )
        dataset = datasets.Dataset.from_list(rows)
        start = time.perf_counter()
        SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=hf)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--reference-sample", type=int, default=2000)
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    from nibblora.data import ConversationEncoder, prepare_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    tok = train_tokenizer(work / "tok")
    rows = make_conversations(args.conversations)
    src = work / "chats.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    quarter = work / "quarter.jsonl"
    quarter.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[: len(rows) // 4]))
    print(f"{len(rows):,} conversations, {src.stat().st_size / 1e6:.1f} MB JSONL, {os.cpu_count()} cores")

    prepare_dataset([src], work / "warm", tokenizer=tok, template="chatml", max_length=2048, pack=True)  # warm-up
    start = time.perf_counter()
    summary = prepare_dataset([src], work / "out", tokenizer=tok, template="chatml", max_length=2048, pack=True)
    ours = time.perf_counter() - start
    tokens = summary.tokens
    print(
        f"nibblora end to end: {ours:.2f} s, {len(rows) / ours:,.0f} conv/s, {tokens / ours / 1e6:.2f} M tok/s "
        f"({tokens:,} tokens, {summary.rows_out:,} packed rows, {100 * summary.supervised_fraction:.0f}% supervised)"
    )

    # (c) the ceiling: tokenizers on pre-rendered strings.
    encoder = ConversationEncoder(tok, "chatml")
    texts = [encoder.render(r["messages"]) for r in rows]
    fast = Tokenizer.from_file(str(tok / "tokenizer.json"))
    fast.encode_batch_fast(texts[:500], add_special_tokens=False)
    start = time.perf_counter()
    encoded = fast.encode_batch_fast(texts, add_special_tokens=False)
    ceiling = time.perf_counter() - start
    ceiling_tokens = sum(len(e.ids) for e in encoded)
    print(
        f"(c) tokenizers encode_batch_fast, pre-rendered: {ceiling:.2f} s, {ceiling_tokens / ceiling / 1e6:.2f} M tok/s"
        f" -> nibblora at {(tokens / ours) / (ceiling_tokens / ceiling):.2f}x the ceiling"
    )

    # (a) transformers, example by example, on a sample.
    import transformers

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok / "tokenizer.json"), eos_token="<|im_end|>")
    from nibblora import _native

    template = _native.named_template_source("chatml")
    sample = rows[: args.reference_sample]
    start = time.perf_counter()
    for r in sample:
        hf.apply_chat_template(
            r["messages"], chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    hf_rate = len(sample) / (time.perf_counter() - start)
    print(
        f"(a) transformers apply_chat_template + assistant mask: {hf_rate:,.0f} conv/s -> nibblora "
        f"{(len(rows) / ours) / hf_rate:.1f}x"
    )

    if not args.skip_trl:
        try:
            trl_seconds = bench_trl(tok, sample)
        except Exception as err:  # noqa: BLE001 - a benchmark anchor failing is reported, not fatal
            print(f"(b) TRL: failed ({type(err).__name__}: {str(err)[:200]})")
            trl_seconds = None
        if trl_seconds:
            trl_rate = len(sample) / trl_seconds
            print(
                f"(b) TRL SFTTrainer dataset preparation (sample): {trl_rate:,.0f} conv/s -> nibblora "
                f"{(len(rows) / ours) / trl_rate:.1f}x"
            )

    q_s, q_rss = child_peak_rss(tok, quarter, work / "q_out")
    f_s, f_rss = child_peak_rss(tok, src, work / "f_out")
    print(
        f"peak RSS (fresh process, incl. Python + torch import): {len(rows) // 4:,} conv {q_rss:.0f} MB, "
        f"{len(rows):,} conv {f_rss:.0f} MB"
    )
    print(f"scratch folder: {work}")
    _ = resource


if __name__ == "__main__":
    main()
