"""The command line of `python -m nibblora.quantize`: argparse over `quantize_checkpoint`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nibblora.cli_errors import run_tool
from nibblora.dtypes import TORCH_NAME_TO_SAFETENSORS
from nibblora.quant.names import BLOCKSIZES, BNB_QUANT_TYPES
from nibblora.threads import add_threads_argument, apply_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.quantize",
        description="Quantize a Hugging Face causal-LM checkpoint's decoder linear weights to bitsandbytes "
        "4-bit (NF4/FP4). The output loads with transformers' from_pretrained when bitsandbytes is installed.",
    )
    parser.add_argument("--model", required=True, help="input folder: config.json + safetensors (sharded or not)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--quant-type", default="nf4", choices=BNB_QUANT_TYPES)
    parser.add_argument(
        "--blocksize",
        type=int,
        default=64,
        choices=BLOCKSIZES,
        metavar="N",
        help="elements per scale: a power of two from 32 to 4096 (default 64)",
    )
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="keep block scales in float32 (4.5 instead of 4.127 bits per parameter)",
    )
    parser.add_argument(
        "--compute-dtype",
        default="bfloat16",
        choices=tuple(TORCH_NAME_TO_SAFETENSORS),
        help="bnb_4bit_compute_dtype written to the config (default bfloat16)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="module-name patterns to leave unquantized, matched like transformers' "
        "llm_int8_skip_modules: a suffix ('mlp.down_proj') or a regex from the start "
        "('model.layers.0', '.*self_attn')",
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB; 500MB, 4GiB...)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    from nibblora.quantize.tool import quantize_checkpoint  # torch loads after the arguments are read

    return run_tool(
        "nibblora.quantize",
        lambda: quantize_checkpoint(
            args.model,
            args.out,
            quant_type=args.quant_type,
            blocksize=args.blocksize,
            double_quant=args.double_quant,
            compute_dtype=args.compute_dtype,
            skip_modules=args.skip,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        ),
    )
