"""The command line of `python -m nibblora.serve`: load the base, register adapters, serve HTTP until stopped."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from nibblora.errors import ConfigError, NibbloraError
from nibblora.quant.names import BNB_QUANT_TYPES
from nibblora.threads import add_threads_argument, apply_threads

DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nibblora.serve",
        description="Serve one base model and many LoRA adapters, batched together, behind an OpenAI-compatible "
        "HTTP API. The request's `model` names the adapter; the base model's own name serves the base alone.",
    )
    p.add_argument("--model", required=True, help="base model folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--served-model-name", help="name of the base model in the API (default: the folder's name)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="parameter / compute dtype (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument("--quantize", choices=BNB_QUANT_TYPES, help="quantize the decoder's linears to 4-bit as it loads")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="register an adapter folder under NAME; repeat for more",
    )
    p.add_argument(
        "--adapter-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="register every subfolder holding adapter_config.json, named after the subfolder",
    )
    p.add_argument("--max-loras", type=int, default=8, help="adapters on the device at once (default 8)")
    p.add_argument("--max-cpu-loras", type=int, default=64, help="adapters kept in host memory (default 64)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default 64)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch at most (default 64)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="tokens computed per step at most: decodes first, prefill chunks from the rest",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="KV cache capacity in tokens (default: 80%% of free GPU memory, 1 GiB on the CPU)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument(
        "--lora-kernel",
        choices=("auto", "segment", "gathered", "native"),
        default="auto",
        help="batched LoRA path (default auto: measured per batch shape; native: the Rust kernel, CPU float32)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument(
        "--runs-dir",
        default=None,
        help="write a registry file there so qlora-tui finds this server (default: $NIBBLORA_RUNS_DIR "
        "or ./runs when it exists)",
    )
    add_threads_argument(p)
    return p


def parse_adapters(specs: list[str], folders: list[str]) -> dict[str, Path]:
    """{name: folder} from --adapter NAME=DIR and --adapter-dir DIR."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter sql=adapters/sql")
        out[name] = Path(folder)
    for root in folders:
        root_path = Path(root)
        if not root_path.is_dir():
            raise ConfigError(f"--adapter-dir {root}: not a directory")
        for sub in sorted(root_path.iterdir()):
            if (sub / "adapter_config.json").is_file():
                out.setdefault(sub.name, sub)
    return out


def build_server(args: argparse.Namespace):
    """(FastAPI app, AsyncEngine, model name) from parsed arguments: loads the model and every adapter."""
    import torch

    from nibblora.models import load_model
    from nibblora.serve.async_engine import AsyncEngine
    from nibblora.serve.engine import Engine, EngineConfig
    from nibblora.serve.server import create_app
    from nibblora.serve.text import TextCodec

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        apply_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    adapters = parse_adapters(args.adapter, args.adapter_dir)
    model = load_model(args.model, dtype=getattr(torch, dtype_name), quantize=args.quantize, device=device)
    codec = TextCodec(args.model) if (Path(args.model) / "tokenizer.json").is_file() else None
    name = args.served_model_name or Path(args.model).resolve().name
    try:
        config = EngineConfig(
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            kv_cache_tokens=args.kv_cache_tokens,
            max_model_len=args.max_model_len,
            lora_kernel=args.lora_kernel,
        )
        engine = Engine(model, config, tokenizer=None if codec is None else codec.tokenizer, model_name=name)
    except ValueError as err:
        raise ConfigError(f"engine settings: {err}") from None
    for adapter_name, folder in adapters.items():
        engine.add_adapter(adapter_name, folder)
    async_engine = AsyncEngine(engine, max_queue=args.max_queue)
    app = create_app(async_engine, codec, model_name=name, model_root=str(args.model), api_key=args.api_key)
    return app, async_engine, name


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "python -m nibblora.serve"
    try:
        app, _async_engine, name = build_server(args)
    except (NibbloraError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    from nibblora.serve.registry import ServerRegistration

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    registration = ServerRegistration.create(args.runs_dir, args.host, args.port, name, args.model)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        registration.remove()
    return 0
