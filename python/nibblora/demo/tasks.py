"""The demo's data: instruction tasks with checkable answers (arithmetic, parity, list lookups, counting),
rendered as ChatML with the prompt masked.

A demo helper, not a data pipeline: nibblora.data (Rust: chat templates, masks, packing) is the real one.
Every task is generated from a seeded random.Random, so the same seed gives the same rows on every machine.
"""

from __future__ import annotations

import random

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SYSTEM = "You are a precise assistant. Answer with the result only."


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", str(a + b)


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(100, 999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def _first(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(4)]
    return f"First item of: {' '.join(map(str, xs))}", str(xs[0])


def _last(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(4)]
    return f"Last item of: {' '.join(map(str, xs))}", str(xs[-1])


def _max(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(3)]
    return f"Largest of: {', '.join(map(str, xs))}", str(max(xs))


def _count(rng: random.Random) -> tuple[str, str]:
    xs = [rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))]
    return f"How many letters: {' '.join(xs)}", str(len(xs))


TASKS = {"add": _add, "parity": _parity, "first": _first, "last": _last, "max": _max, "count": _count}


def make_examples(n: int, seed: int) -> list[dict]:
    """n rows {"task", "prompt", "answer"}, tasks in turn."""
    rng = random.Random(seed)
    names = list(TASKS)
    rows = []
    for i in range(n):
        task = names[i % len(names)]
        prompt, answer = TASKS[task](rng)
        rows.append({"task": task, "prompt": prompt, "answer": answer})
    return rows


def held_out_examples(train: list[dict], n: int, seed: int, exclude: list[dict] = ()) -> list[dict]:
    """n fresh rows (seed differs from the training set's) whose prompts neither `train` nor `exclude` holds,
    except the addition table's: all 100 of its prompts are in any training set of a few hundred rows, so those
    are kept (the model must still learn to answer them)."""
    seen = {e["prompt"] for e in (*train, *exclude)}
    fresh = [e for e in make_examples(max(600, 8 * n), seed) if e["task"] == "add" or e["prompt"] not in seen]
    return fresh[:n]


def as_conversation(example: dict) -> dict:
    """The row nibblora.data prepares: system, user prompt, assistant answer."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["answer"]},
        ]
    }


def render_prompt(prompt: str) -> str:
    """ChatML up to where the assistant starts answering."""
    return f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"
