"""Multi-adapter serving throughput: nibblora's engine against the PEFT baselines and a merged model, offline.

    python bench/bench_serve.py --quick            # a few minutes on a CPU
    python bench/bench_serve.py                    # n in {1, 8, 64, 512}, 256 requests
    python bench/bench_serve.py --device cuda --hidden 2048 --layers 8 ...

The workload taxonomy of the Punica paper, over n adapters of rank 16 on every linear layer:
  identical   every request uses adapter 0
  uniform     sqrt(n) adapters, drawn uniformly
  skewed      Zipf(alpha 1.5) over n adapters
  distinct    request i uses adapter i mod n (every request its own adapter when n >= requests)
Every contender gets the same model (one random Llama saved as a checkpoint), prompts and output lengths (mixed,
drawn once), greedy decoding, EOS off, all requests arriving at t = 0:
  nibblora        nibblora.serve.Engine: continuous batching, segment/gathered batched LoRA (measured)
  peft-per-adapter  transformers + peft, requests grouped by adapter, set_adapter between batches of --batch
                  (the PEFT baseline of S-LoRA's evaluation)
  peft-mixed      transformers + peft, batches of --batch mixed requests, generate(adapter_names=[...])
  merged          one adapter merged into the weights, served by the same nibblora engine as base-only requests
                  (the upper bound for identical: no LoRA work at all)
Static-batch contenders generate up to the longest output of their batch; only requested tokens are counted.
With --repeat R each contender's workload runs R times (after a warm-up) and the fastest run is reported: on a
shared machine the slowest runs measure the neighbours.
Reports output tokens/s, requests/s, p50/p99 request latency and peak memory above the start (CUDA: allocator
peak; CPU: resident-set peak sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

logging.getLogger("transformers").setLevel(logging.ERROR)
logging.getLogger("peft").setLevel(logging.ERROR)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Result:
    contender: str
    workload: str
    n: int
    adapters_used: int
    seconds: float
    output_tokens: int
    requests: int
    latencies: list[float]
    peak_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def row(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "contender": self.contender,
            "workload": self.workload,
            "n": self.n,
            "used": self.adapters_used,
            "tok/s": round(self.tokens_per_s, 1),
            "req/s": round(self.requests / self.seconds, 2),
            "p50 s": round(lat[len(lat) // 2], 3),
            "p99 s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "peak MB": round(self.peak_bytes / 2**20, 1),
        }


# ---- setup ------------------------------------------------------------------------------------------------------
def build_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=1024,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_adapters(base_folder: Path, root: Path, n: int, rank: int) -> list[Path]:
    """n peft LoRA folders (rank `rank`, all linear layers but lm_head) with random non-zero A and B."""
    from safetensors.torch import save_file

    config = json.loads((base_folder / "config.json").read_text())
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = hidden // heads
    kv = config["num_key_value_heads"] * head_dim
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    folders = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for proj, (fan_in, fan_out) in shapes.items():
                parent = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
        folder = root / f"a{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "lora_dropout": 0.0,
                    "target_modules": list(PROJECTIONS),
                    "bias": "none",
                    "use_dora": False,
                    "use_rslora": False,
                    "base_model_name_or_path": None,
                    "fan_in_fan_out": False,
                    "inference_mode": True,
                }
            )
        )
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    return folders


def workload_adapters(kind: str, n: int, requests: int, rng: random.Random) -> list[int]:
    if kind == "identical":
        return [0] * requests
    if kind == "uniform":
        k = max(1, round(math.sqrt(n)))
        return [rng.randrange(k) for _ in range(requests)]
    if kind == "skewed":
        weights = [1.0 / (i + 1) ** 1.5 for i in range(n)]
        return rng.choices(range(n), weights=weights, k=requests)
    if kind == "distinct":
        return [i % n for i in range(requests)]
    raise ValueError(kind)


class PeakMemory:
    """Peak memory above the level at start: CUDA allocator peak, or sampled resident set size on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Self:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc = psutil.Process()
            self.start = self.peak = self.proc.memory_info().rss
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.bytes = max(0, self.peak - self.start)


# ---- contenders ---------------------------------------------------------------------------------------------------
def run_nibblora(args, base_folder, adapter_folders, prompts, outputs, adapter_ids, device, merged=False) -> tuple:
    from nibblora.models import load_model
    from nibblora.serve import Engine, EngineConfig, SamplingParams

    model = load_model(base_folder, dtype=args.dtype, device=device)
    if merged:  # fold adapter 0 into the weights: the engine then runs base-only requests
        from nibblora.lora import load_adapter

        layers = load_adapter(model, adapter_folders[0], check_base_model=False)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.merge()
                parent, attr = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), attr, layer.base)
    used = sorted(set(adapter_ids))
    engine = Engine(
        model,
        EngineConfig(
            max_loras=min(args.max_loras, max(1, len(used))),
            max_cpu_loras=max(args.max_loras, len(used)),
            max_lora_rank=args.rank,
            max_num_seqs=args.batch,
            max_num_batched_tokens=args.token_budget,
            kv_cache_tokens=args.batch * 256,
            max_model_len=1024,
        ),
    )
    # Register the adapters the workload uses (peft loads the same set), all held in host memory.
    names = [None] * len(adapter_ids)
    if not merged:
        for i in used:
            engine.add_adapter(f"a{i}", adapter_folders[i])
        names = [f"a{i}" for i in adapter_ids]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outputs]
    engine.generate(prompts[:2], params[:2], names[:2])  # warm-up (allocator, kernel choice for small shapes)
    best = None
    for _ in range(args.repeat):
        with PeakMemory(device) as mem:
            start = time.monotonic()
            results = engine.generate(prompts, params, names)
            _sync(device)
            seconds = time.monotonic() - start
        run = (seconds, sum(len(r.token_ids) for r in results), [r.finished_at - start for r in results], mem.bytes)
        best = run if best is None or run[0] < best[0] else best
    engine.close()
    return best


def _hf_model(base_folder, adapter_folders, used, device, dtype):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_folder, dtype=dtype).to(device).eval()
    model = PeftModel.from_pretrained(model, adapter_folders[used[0]], adapter_name=f"a{used[0]}")
    for i in used[1:]:
        model.load_adapter(adapter_folders[i], adapter_name=f"a{i}")
    return model.eval()


def _hf_generate(model, prompts, max_new, device, **kwargs):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def run_peft(args, base_folder, adapter_folders, prompts, outputs, adapter_ids, device, mixed: bool) -> tuple:
    used = sorted(set(adapter_ids))
    model = _hf_model(base_folder, adapter_folders, used, device, args.dtype)
    order = list(range(len(prompts)))
    if not mixed:  # per adapter: group requests by adapter, FIFO within a group
        order.sort(key=lambda i: adapter_ids[i])
    batches = []
    for i in order:
        if batches and len(batches[-1]) < args.batch and (mixed or adapter_ids[batches[-1][0]] == adapter_ids[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    _hf_generate(model, [prompts[0]], 2, device)  # warm-up
    best = None
    for _ in range(args.repeat):
        latencies = [0.0] * len(prompts)
        with PeakMemory(device) as mem:
            start = time.monotonic()
            for batch in batches:
                kwargs = {}
                if mixed:
                    kwargs["adapter_names"] = [f"a{adapter_ids[i]}" for i in batch]
                else:
                    model.set_adapter(f"a{adapter_ids[batch[0]]}")
                _hf_generate(model, [prompts[i] for i in batch], max(outputs[i] for i in batch), device, **kwargs)
                _sync(device)
                done = time.monotonic() - start
                for i in batch:
                    latencies[i] = done
            seconds = time.monotonic() - start
        run = (seconds, sum(outputs), latencies, mem.bytes)
        best = run if best is None or run[0] < best[0] else best
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, 64 requests, n in {1, 8, 64}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="default 256 (quick: 64)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="adapter counts (default 1 8 64 512; quick: 1 8 64)")
    p.add_argument("--workloads", nargs="+", default=["identical", "uniform", "skewed", "distinct"])
    p.add_argument("--contenders", nargs="+", default=["nibblora", "peft-per-adapter", "peft-mixed", "merged"])
    p.add_argument("--batch", type=int, default=32, help="max sequences per batch, every contender")
    p.add_argument("--token-budget", type=int, default=1024, help="nibblora: tokens per step")
    p.add_argument("--max-loras", type=int, default=32, help="nibblora: device slots")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128])
    p.add_argument("--output-len", type=int, nargs=2, default=[8, 64])
    p.add_argument("--repeat", type=int, default=1, help="timed runs per contender; the fastest is reported")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 256, 688, 2, 4, 4
        args.vocab = 2048
        args.requests, args.n = args.requests or 64, args.n or [1, 8, 64]
        args.prompt_len, args.output_len, args.batch = [8, 48], [4, 24], 16
    args.requests, args.n = args.requests or 256, args.n or [1, 8, 64, 512]
    device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = random.Random(0)
    prompts = [
        [rng.randrange(1, args.vocab) for _ in range(rng.randint(*args.prompt_len))] for _ in range(args.requests)
    ]
    outputs = [rng.randint(*args.output_len) for _ in range(args.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_checkpoint(args, Path(tmp) / "base")
        adapters = write_adapters(base, Path(tmp) / "adapters", max(args.n), args.rank)
        print(
            f"model hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, {args.dtype}, {device}; "
            f"{args.requests} requests, prompts {args.prompt_len}, outputs {args.output_len}, rank {args.rank}, "
            f"batch {args.batch}, threads {torch.get_num_threads()}"
        )
        done_merged = False
        for n in args.n:
            for kind in args.workloads:
                if kind != "identical" and n == 1:
                    continue  # every workload is "identical" with one adapter
                ids = workload_adapters(kind, n, args.requests, random.Random(n))
                for contender in args.contenders:
                    if contender == "merged":
                        if kind != "identical" or done_merged:
                            continue
                        done_merged = True
                    seconds, tokens, latencies, peak = run_contender(
                        contender, args, base, adapters, prompts, outputs, ids, device
                    )
                    result = Result(contender, kind, n, len(set(ids)), seconds, tokens, args.requests, latencies, peak)
                    rows.append(result.row())
                    print(_format_row(rows[-1]), flush=True)
                    gc.collect()
    print()
    print(_summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def run_contender(contender, args, base, adapters, prompts, outputs, ids, device) -> tuple:
    if contender in ("nibblora", "merged"):
        return run_nibblora(args, base, adapters, prompts, outputs, ids, device, merged=contender == "merged")
    if contender in ("peft-per-adapter", "peft-mixed"):
        return run_peft(args, base, adapters, prompts, outputs, ids, device, mixed=contender == "peft-mixed")
    raise ValueError(f"unknown contender {contender!r}: use nibblora, peft-per-adapter, peft-mixed or merged")


def _format_row(row: dict) -> str:
    return "  ".join(f"{k}={v}" for k, v in row.items())


def _summary(rows: list[dict]) -> str:
    """Markdown table plus the ratios the issue sets targets for."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]

    def tps(contender, workload, n):
        for r in rows:
            if (r["contender"], r["workload"], r["n"]) == (contender, workload, n):
                return r["tok/s"]
        return None

    ns = sorted({r["n"] for r in rows})
    merged = next((r["tok/s"] for r in rows if r["contender"] == "merged"), None)
    lines.append("")
    for n in ns:
        ours, peft = tps("nibblora", "distinct", n), tps("peft-per-adapter", "distinct", n)
        if ours and peft:
            lines.append(f"distinct n={n}: nibblora / peft-per-adapter = {ours / peft:.2f}x (target >= 4x at n=64)")
        mixed = tps("peft-mixed", "distinct", n)
        if ours and mixed:
            lines.append(f"distinct n={n}: nibblora / peft-mixed = {ours / mixed:.2f}x")
    for n in ns:
        ours = tps("nibblora", "identical", n)
        if ours and merged:
            lines.append(f"identical n={n}: nibblora / merged = {ours / merged:.2f}x (target >= 0.85x)")
    small, large = (8, max(ns)) if 8 in ns else (None, None)
    if small and large != small:
        for kind in ("uniform", "skewed", "distinct"):
            a, b = tps("nibblora", kind, small), tps("nibblora", kind, large)
            if a and b:
                lines.append(f"{kind}: nibblora n={large} / n={small} = {b / a:.2f} (target >= 0.80)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
