"""The command line of `python -m nibblora.memory`: the lesson's table with no arguments, else one estimate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nibblora.memory.estimate import DTYPE_BYTES, MODES, OPTIMIZERS, estimate_memory, lesson_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nibblora.memory",
        description="Estimate training memory by component. With no --model, print the 1B/7B/13B/70B table.",
    )
    parser.add_argument("--model", help="a preset (llama-2-7b, llama-3-8b, ...) or a config.json / model folder")
    parser.add_argument("--mode", default="qlora", choices=MODES)
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--targets", default="all-linear", help="all-linear or a comma list, e.g. q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPE_BYTES))
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument(
        "--keep-mlp-layers",
        type=int,
        default=0,
        metavar="N",
        help="selective checkpointing: N layers (-1: all) keep their MLP activations and recompute only attention",
    )
    parser.add_argument(
        "--offload-activations",
        action="store_true",
        help="with checkpointing on CUDA, layer inputs but the last wait in pinned host memory until backward",
    )
    parser.add_argument(
        "--pure-16bit",
        dest="mixed_precision",
        action="store_false",
        help="full FT without fp32 master weights (what nibblora.train does)",
    )
    parser.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens per chunk of the fused loss (default: the model's rule, sized per batch)",
    )
    parser.add_argument("--paged-optimizer", action="store_true", help="optimizer states in host memory")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where training runs (the framework's fixed bytes and the RMSNorm kernel differ)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None:
        print(lesson_table(batch_size=args.batch_size, seq_len=args.seq_len))
        return 0
    targets = "all-linear" if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    try:
        estimate = estimate_memory(
            args.model,
            args.mode,
            r=args.r,
            target_modules=targets,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            dtype=args.dtype,
            optimizer=args.optimizer,
            gradient_checkpointing=args.gradient_checkpointing,
            keep_mlp_layers=args.keep_mlp_layers,
            offload_activations=args.offload_activations,
            loss_chunk_tokens=args.loss_chunk_tokens,
            mixed_precision=args.mixed_precision,
            paged_optimizer=args.paged_optimizer,
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"nibblora.memory: error: {err}", file=sys.stderr)
        return 2
    print(estimate.format())
    return 0
