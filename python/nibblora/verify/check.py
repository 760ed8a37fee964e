"""verify_merge: the base model with the adapter against the merged model, on the same prompts.

Both run in nibblora's own model (nibblora.models), in float32 unless asked otherwise: the adapter as separate
LoRA layers on the base (a 4-bit base stays 4-bit, as in training), the merged checkpoint as plain weights.
The report gives the largest absolute logit difference and the KL divergence KL(adapter || merged) of the
next-token distributions, mean and max over positions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "Q: What is 17 times 23?\nA:",
)


@dataclass(frozen=True)
class VerifyReport:
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    positions: int
    atol: float
    kl_tol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.atol and self.max_kl <= self.kl_tol

    def format(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: max |logit diff| {self.max_abs_logit_diff:.3g} (tolerance {self.atol:g}), "
                f"KL(adapter || merged) mean {self.mean_kl:.3g} max {self.max_kl:.3g} nats (tolerance "
                f"{self.kl_tol:g}) over {self.positions} positions")


def _inputs(base: Path, prompts: Sequence[str] | None, vocab: int, seed: int, seq_len: int) -> list[torch.Tensor]:
    """Token ids of the prompts (with the base's tokenizer.json), or random ids when there is no tokenizer."""
    tokenizer_file = base / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        ids = [tokenizer.encode(p).ids for p in (prompts or SAMPLE_PROMPTS)]
        return [torch.tensor([i], dtype=torch.long) for i in ids if i]
    if prompts:
        raise ValueError(f"{base} has no tokenizer.json, so text prompts cannot be encoded; omit --prompt to "
                         "compare on random token ids")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq_len), generator=generator) for _ in range(len(SAMPLE_PROMPTS))]


def verify_merge(
    base_dir: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    *,
    prompts: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    atol: float = 1e-2,
    kl_tol: float = 1e-3,
    seed: int = 0,
    seq_len: int = 32,
) -> VerifyReport:
    """Compare the base + adapter with the merged model on `prompts` (default: a few samples; random ids when the
    base has no tokenizer.json). Raises ValueError / FileNotFoundError for unreadable inputs."""
    from nibblora.lora import load_adapter
    from nibblora.models import load_model

    base_dir, merged_dir = Path(base_dir), Path(merged_dir)
    adapted = load_model(base_dir, dtype=dtype)
    load_adapter(adapted, adapter_dir, check_base_model=False)
    merged = load_model(merged_dir, dtype=dtype)
    worst, kl_sum, kl_max, positions = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for ids in _inputs(base_dir, prompts, adapted.config.vocab_size, seed, seq_len):
            a, m = adapted(ids).double(), merged(ids).double()  # float64: KL of near-equal logits is tiny
            worst = max(worst, (a - m).abs().max().item())
            log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(m, -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)
            kl_sum += kl.sum().item()
            kl_max = max(kl_max, kl.max().item())
            positions += kl.numel()
    return VerifyReport(worst, kl_sum / max(positions, 1), kl_max, positions, atol, kl_tol)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.verify",
        description="Check a merged model against its base + adapter: max |logit diff| and KL divergence on "
        "sample prompts. Exit code 0: within tolerance; 1: past it; 2: inputs could not be read.",
    )
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--adapter", required=True, help="peft adapter folder")
    parser.add_argument("--merged", required=True, help="merged model folder (python -m nibblora.merge)")
    parser.add_argument("--prompt", action="append", help="a prompt to compare on (repeatable; needs tokenizer.json)")
    parser.add_argument("--dtype", default="float32", choices=tuple(_DTYPES), help="compute dtype (default float32)")
    parser.add_argument("--atol", type=float, default=1e-2, help="largest allowed |logit diff| (default 1e-2)")
    parser.add_argument("--max-kl", type=float, default=1e-3, help="largest allowed KL per position, nats (1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts used without a tokenizer")
    args = parser.parse_args(argv)
    try:
        report = verify_merge(args.base, args.adapter, args.merged, prompts=args.prompt, dtype=_DTYPES[args.dtype],
                              atol=args.atol, kl_tol=args.max_kl, seed=args.seed)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"nibblora.verify: error: {err}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.passed else 1
