"""The command line of `python -m nibblora.train CONFIG.toml [--set key=value ...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nibblora.errors import NibbloraError
from nibblora.train.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.train",
        description="Fine-tune a Llama-family model (full, LoRA or QLoRA) as a TOML config says; see "
        "docs/training.md. Run under `torchrun --nproc-per-node N -m nibblora.train ...` for DDP.",
    )
    parser.add_argument("config", help="the TOML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.lr=1e-4 --set lora.target_modules='[\"q_proj\"]'",
    )
    parser.add_argument("--quiet", action="store_true", help="no log lines on stdout (the run store still has them)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """0: finished or stopped on request; 1: training failed (a non-finite loss, a write error); 2: bad input
    (config, data, checkpoint, a damaged run store, an output_dir another trainer holds); 130: interrupted."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"nibblora.train: error: {err}", file=sys.stderr)
        return 2
    # torch and the model code load only for a valid config
    from nibblora.train.loop import train

    try:
        result = train(config, quiet=args.quiet)
    except (ValueError, FileNotFoundError) as err:  # InputError is a ValueError
        print(f"nibblora.train: error: {err}", file=sys.stderr)
        return 2
    except NibbloraError as err:  # NonFiniteLossError, OutputError
        print(f"nibblora.train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "nibblora.train: interrupted; resume from the last checkpoint by running the same command", file=sys.stderr
        )
        return 130
    if result.weights_dir is not None:
        print(f"nibblora.train: {result.status} at step {result.step}; weights in {result.weights_dir}")
    return 0
