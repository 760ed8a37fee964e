"""The command line of `python -m nibblora.merge`: argparse over `merge_checkpoint`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nibblora.cli_errors import run_tool
from nibblora.dtypes import TORCH_NAME_TO_SAFETENSORS
from nibblora.merge.names import METHODS
from nibblora.quant.names import BLOCKSIZES, BNB_QUANT_TYPES
from nibblora.threads import add_threads_argument, apply_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.merge",
        description="Merge peft LoRA adapters into a Hugging Face checkpoint (full precision or bitsandbytes "
        "4-bit), streaming tensor by tensor in the Rust core, and write a new checkpoint.",
    )
    parser.add_argument("--base", required=True, help="base model folder: config.json + safetensors")
    parser.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="DIR",
        help="peft adapter folder; repeat for several adapters",
    )
    parser.add_argument(
        "--weight",
        action="append",
        type=float,
        metavar="W",
        help="weight of the adapter given before it (one per --adapter; default 1.0 each)",
    )
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument(
        "--method",
        default="linear",
        choices=METHODS,
        help="how several adapters combine (default linear: the weighted sum of the updates)",
    )
    parser.add_argument("--density", type=float, default=1.0, help="share of each update kept by TIES / DARE")
    parser.add_argument("--rank", type=int, help="truncate the combined update to this rank (SVD)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default 0)")
    parser.add_argument(
        "--dtype",
        choices=tuple(TORCH_NAME_TO_SAFETENSORS),
        help="dtype of the output's float tensors (default: the base's, or its 4-bit compute dtype)",
    )
    parser.add_argument(
        "--quantize",
        choices=BNB_QUANT_TYPES,
        help="re-quantize the decoder's linear weights (bitsandbytes layout) and report per layer "
        "the update against the quantization error",
    )
    parser.add_argument(
        "--blocksize",
        type=int,
        default=64,
        choices=BLOCKSIZES,
        metavar="N",
        help="block size for --quantize (default 64)",
    )
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="with --quantize: keep block scales in float32",
    )
    parser.add_argument(
        "--accept-quantization-loss",
        action="store_true",
        help="with --quantize: exit 0 even when the 4-bit rounding erases most of the adapters' "
        "update (by default the merge is written but exits 1 then)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    from nibblora.merge.tool import merge_checkpoint  # torch loads after the arguments are read

    return run_tool(
        "nibblora.merge",
        lambda: merge_checkpoint(
            args.base,
            args.adapter,
            args.out,
            weights=args.weight,
            method=args.method,
            density=args.density,
            rank=args.rank,
            seed=args.seed,
            dtype=args.dtype,
            quantize=args.quantize,
            blocksize=args.blocksize,
            double_quant=args.double_quant,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
            accept_quantization_loss=args.accept_quantization_loss,
        ),
    )
