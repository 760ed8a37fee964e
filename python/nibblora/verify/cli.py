"""The command line of `python -m nibblora.verify`: argparse over `verify_merge` (torch loads after parsing)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from nibblora.dtypes import TORCH_NAME_TO_SAFETENSORS, torch_dtype
from nibblora.errors import NibbloraError
from nibblora.threads import add_threads_argument, apply_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.verify",
        description="Check a merged model against its base + adapter: max |logit diff|, KL divergence and "
        "next-token agreement on sample prompts, judged against the rounding of the merged dtype. Exit code 0: "
        "within tolerance; 1: past it (or NaN / infinity anywhere); 2: inputs could not be read.",
    )
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--adapter", required=True, help="peft adapter folder")
    parser.add_argument("--merged", required=True, help="merged model folder (python -m nibblora.merge)")
    parser.add_argument("--prompt", action="append", help="a prompt to compare on (repeatable; needs tokenizer.json)")
    parser.add_argument(
        "--dtype", default="float32", choices=tuple(TORCH_NAME_TO_SAFETENSORS), help="compute dtype (default float32)"
    )
    parser.add_argument(
        "--atol", type=float, help="largest allowed |logit diff| (default: from the merged dtype's rounding)"
    )
    parser.add_argument(
        "--max-kl", type=float, help="largest allowed KL per position, nats (default: from the merged dtype's rounding)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and the rounding draw")
    add_threads_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--atol", args.atol), ("--max-kl", args.max_kl)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            parser.error(f"{flag} must be a finite number >= 0, got {value}")
    apply_threads(args.threads)
    from nibblora.verify.check import verify_merge

    try:
        report = verify_merge(
            args.base,
            args.adapter,
            args.merged,
            prompts=args.prompt,
            dtype=torch_dtype(TORCH_NAME_TO_SAFETENSORS[args.dtype]),
            atol=args.atol,
            kl_tol=args.max_kl,
            seed=args.seed,
        )
    except (NibbloraError, ValueError, FileNotFoundError, KeyError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"nibblora.verify: error: {message}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.passed else 1
