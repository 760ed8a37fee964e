"""How the demo and the method comparison score a model: exact match by free greedy generation on held-out task
prompts, and mean loss on held-out stdlib text (the "general distribution" forgetting is measured on).

    exact_match(model, tokenizer, held_out)      # share of prompts answered exactly
    mean_loss(model, general_rows(tokenizer), pad_id)
"""

from __future__ import annotations

import contextlib

import torch
from tokenizers import Tokenizer
from torch import nn

from nibblora.demo import tasks, tiny_base
from nibblora.models import generate
from nibblora.train import TokenizedRows, evaluate
from nibblora.train.distributed import DistInfo


def greedy_answers(
    model: nn.Module, tokenizer: Tokenizer, examples: list[dict], batch_size: int = 32, max_new_tokens: int = 16
) -> list[str]:
    """The model's greedy answer (up to <|im_end|>) to each example's prompt, rendered as ChatML."""
    end_id = tokenizer.token_to_id(tasks.IM_END)
    pad_id = tokenizer.token_to_id("<pad>")
    answers = []
    model.eval()
    for begin in range(0, len(examples), batch_size):
        chunk = examples[begin : begin + batch_size]
        prompts = [tokenizer.encode(tasks.render_prompt(e["prompt"]), add_special_tokens=False).ids for e in chunk]
        longest = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])  # left-padded
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = generate(
                model, ids, max_new_tokens=max_new_tokens, attention_mask=mask, eos_token_id=end_id, pad_token_id=pad_id
            )
        for row in out[:, longest:].tolist():
            answers.append(tokenizer.decode([t for t in row if t not in (end_id, pad_id)], skip_special_tokens=False))
    return answers


def exact_match(model: nn.Module, tokenizer: Tokenizer, examples: list[dict], batch_size: int = 32) -> float:
    """Share of held-out prompts whose greedy answer (up to <|im_end|>) is exactly the expected one."""
    answers = greedy_answers(model, tokenizer, examples, batch_size)
    return sum(a.strip() == e["answer"] for a, e in zip(answers, examples)) / len(examples)


def general_rows(tokenizer: Tokenizer, n_rows: int = 48, seq_len: int = 64, held_out: bool = True) -> TokenizedRows:
    """Stdlib source in chunks of seq_len tokens: the "general distribution". held_out: files pretraining never saw
    (for measuring forgetting); else the pretraining files themselves (for replay during fine-tuning)."""
    pretraining, unseen = tiny_base.stdlib_files()
    files = unseen if held_out else pretraining
    chars = max(200_000, 4 * n_rows * seq_len)  # ~3 characters per token of source code, with a margin
    ids = tokenizer.encode(tiny_base.read_text(files, chars), add_special_tokens=False).ids
    rows = [{"input_ids": ids[i : i + seq_len]} for i in range(0, n_rows * seq_len, seq_len)]
    return TokenizedRows([r for r in rows if len(r["input_ids"]) == seq_len])


def mean_loss(model: nn.Module, rows: TokenizedRows, pad_id: int) -> float:
    """Mean next-token loss over every labelled token of `rows` (the trainer's own evaluate, on the CPU)."""
    return evaluate(model, rows, 16, 0, pad_id, DistInfo(0, 1, 0, torch.device("cpu")), contextlib.nullcontext)[0]
