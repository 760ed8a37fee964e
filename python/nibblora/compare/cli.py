"""The command line of `python -m nibblora.compare`: argparse over `compare_methods` (torch loads after the
arguments are read, so --help stays fast)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from nibblora.cli_errors import run_tool
from nibblora.compare.plan import METHODS, Plan
from nibblora.threads import add_threads_argument


def build_parser() -> argparse.ArgumentParser:
    full, quick = Plan.full(), Plan.quick()
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.compare",
        description="Train every fine-tuning method (full, lora, qlora, dora, ia3, prompt, prefix, adapter) on the "
        "demo's tiny pretrained Llama and its checkable tasks, with the same token budget and a learning-rate sweep "
        "per method, plus a LoRA rank sweep and full fine-tuning with each forgetting mitigation; write the measured "
        "table (compare.json, compare.md, compare.png) and judge the lesson's claims from it. CPU only, nothing "
        "downloaded.",
    )
    parser.add_argument("--out", type=Path, default=Path("build/compare"), help="output folder (default build/compare)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{quick.steps} steps per run, one learning rate per method (the middle of its grid), ranks "
        f"{', '.join(map(str, quick.ranks))}, {len(quick.mitigations)} mitigations ({quick.run_count()} runs, "
        f"under 10 min on 2 cores); default: {full.steps} steps, {full.lr_count} rates, ranks "
        f"{', '.join(map(str, full.ranks))}, {len(full.mitigations)} mitigations ({full.run_count()} runs, "
        "under 60 min)",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="a tiny base nibblora.demo pretrained (default: OUT/base or build/demo/base when valid, "
        "else pretrain one)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=1200, help="when pretraining a base (default 1200)")
    parser.add_argument(
        "--methods",
        help=f"comma list, a subset of {','.join(METHODS)} (default: all; without full there is no quality column)",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per run (overrides the plan's)")
    parser.add_argument(
        "--test-rows", type=int, default=300, help="held-out prompts scored by generation (default 300)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="retrain every run (default: reuse finished runs of the same config)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        metavar="N",
        help="runs trained at once, each in its own process (default 2: on 2 cores, two single-threaded runs "
        "finish sooner than one two-threaded run); --threads 0 shares the idle CPUs between them",
    )
    add_threads_argument(parser)
    return parser


def plan_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """The plan --quick chooses, narrowed by --methods and --steps (a bad value is a usage error, exit 2)."""
    plan = Plan.quick() if args.quick else Plan.full()
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            parser.error(f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METHODS)}")
        plan = replace(plan, methods=methods)
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        plan = replace(plan, steps=args.steps, eval_every=max(1, min(plan.eval_every, args.steps)))
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plan = plan_from_args(parser, args)
    from nibblora.compare.tool import compare_methods  # torch loads after the arguments are read

    return run_tool(
        "nibblora.compare",
        lambda: compare_methods(
            args.out,
            quick=args.quick,
            base=args.base,
            pretrain_steps=args.pretrain_steps,
            test_rows=args.test_rows,
            plan=plan,
            reuse=not args.fresh,
            threads=args.threads,
            jobs=args.jobs,
            log=lambda line: print(f"nibblora.compare: {line}", flush=True),
        ),
        interrupted="finished runs are kept under OUT/runs and reused by the next run (--fresh retrains them)",
    )
