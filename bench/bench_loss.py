"""The chunked lm_head + cross-entropy (nibblora.models.loss) against the plain full-logits loss, in one run.

    python bench/bench_loss.py                                   # CPU: batch 2 x 1024, hidden 512, vocab 32000, fp32
    python bench/bench_loss.py --device cuda --batch 4 --seq 2048 --hidden 4096 --vocab 128256 --dtype bf16

Both compute sum(cross_entropy(hidden @ W.T)) over every token and its gradient with respect to the hidden states
(a frozen lm_head, as in LoRA). Reported: best forward + backward time, and the peak above what was allocated
before (CUDA: max_memory_allocated; CPU: malloc's in-use bytes sampled by nibblora.memory.MemoryMeter).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F

from nibblora.models.loss import linear_cross_entropy

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def plain(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float().flatten(0, 1), labels.flatten(), reduction="sum")


def chunked(hidden, weight, labels, chunk):
    return linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)[0]


def measure(fn, args, device: str, repeat: int) -> tuple[float, int]:
    hidden = args[0]

    def step():
        hidden.grad = None
        fn(*args).backward()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    gc.collect()
    hidden.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        from nibblora.memory.measure import MemoryMeter

        meter = MemoryMeter(torch.device("cpu"))
        step()
        peak = meter.read()["mem_peak_bytes"]
        meter.stop()
    return min(times), peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="tokens per chunk (default: the model's rule in nibblora.models.loss_chunks: a chunk's logits no larger "
        "than the hidden states, at least 256 tokens)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.hidden, generator=gen).to(args.device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5).to(args.device, dtype)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    with torch.no_grad():
        a, b = plain(hidden, weight, labels), chunked(hidden, weight, labels, args.chunk)
    rel = abs(float(a) - float(b)) / abs(float(a))
    print(
        f"loss: batch {args.batch} x {args.seq}, hidden {args.hidden}, vocab {args.vocab}, {args.dtype} on "
        f"{args.device}, chunk {args.chunk} tokens; relative difference of the two losses {rel:.1e}"
    )
    rows = {
        "plain (full logits)": measure(plain, (hidden, weight, labels), args.device, args.repeat),
        "nibblora chunked": measure(chunked, (hidden, weight, labels, args.chunk), args.device, args.repeat),
    }
    print(f"{'loss':<20} {'best s':>8} {'peak MiB':>9}")
    for name, (seconds, peak) in rows.items():
        print(f"{name:<20} {seconds:>8.3f} {peak / 2**20:>9.1f}")
    (ts, ps), (tc, pc) = rows.values()
    print(f"chunked / plain: time {tc / ts:.2f}x, peak {pc / ps:.2f}x")


if __name__ == "__main__":
    main()
