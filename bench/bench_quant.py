"""Quantization speed: nibblora against bitsandbytes (CPU) and torchao's NF4, side by side in one run.

    python bench/bench_quant.py [--rows 4096 --cols 11008] [--repeat 5] [--threads N]

Times, on one weight (default 4096 x 11008, a Llama-2-7B MLP projection) in bfloat16 and float32:
  quantize   NF4, blocksize 64, with double quantization of the scales
  dequantize back to the input dtype
and prints Mparam/s and nibblora's speed-up over each anchor. Best of --repeat runs after a warm-up.
"nibblora" dequantizes into its output pool (freed results are reused, as a layer would); "nibblora-nopool"
turns the pool off so every call pays for fresh memory, as bitsandbytes and torchao do.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from nibblora.quant import dequantize_4bit, quantize_4bit, set_output_pool_limit

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: caches, lazy tables, thread pools
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def contenders(weight: torch.Tensor):
    """name -> (quantize(), dequantize()) closures; anchors that are not installed are left out."""
    out = {}
    q = quantize_4bit(weight, "nf4", 64, True)
    out["nibblora"] = (lambda: quantize_4bit(weight, "nf4", 64, True), lambda: dequantize_4bit(q))

    def dequantize_without_pool():
        set_output_pool_limit(0)
        try:
            return dequantize_4bit(q)
        finally:
            set_output_pool_limit(1 << 30)

    if weight.device.type == "cpu":
        out["nibblora-nopool"] = (None, dequantize_without_pool)
    try:
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        out["bitsandbytes"] = (
            lambda: bnb_f.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4"),
            lambda: bnb_f.dequantize_4bit(packed, state),
        )
    except ImportError:
        print("bitsandbytes not installed: skipped")
    try:
        try:
            from torchao.dtypes.nf4tensor import to_nf4
        except ImportError:  # torchao >= 0.15 moved it
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        nf4 = to_nf4(weight, 64, 256)
        out["torchao"] = (lambda: to_nf4(weight, 64, 256), lambda: nf4.get_original_weight())
    except Exception as err:  # torchao's NF4 rejects some dtypes/shapes; say so and go on
        print(f"torchao NF4 unavailable for {weight.dtype}: {err}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to time the GPU paths")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.rows * args.cols
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, torch threads {torch.get_num_threads()}"
    )
    print(f"weight {args.rows} x {args.cols} = {n / 1e6:.1f} Mparam, NF4 blocksize 64, double quant; {where}")
    print(f"{'dtype':<9} {'op':<11} {'library':<13} {'ms':>9} {'Mparam/s':>10} {'nibblora x':>11}")
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
        weight = weight.to(args.device)
        results = {}
        for name, (quant, dequant) in contenders(weight).items():
            quant_seconds = best_seconds(quant, args.repeat) if quant else None
            results[name] = (quant_seconds, best_seconds(dequant, args.repeat))
        for op_index, op in enumerate(("quantize", "dequantize")):
            ours = results["nibblora"][op_index]
            for name, times in results.items():
                seconds = times[op_index]
                if seconds is None:
                    continue
                ratio = seconds / ours
                print(
                    f"{str(dtype).removeprefix('torch.'):<9} {op:<11} {name:<13} {seconds * 1e3:>9.1f} "
                    f"{n / seconds / 1e6:>10.0f} {ratio:>10.1f}x"
                )


if __name__ == "__main__":
    main()
