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
Each (n, workload, contender) cell runs in its own subprocess, so one contender's memory peak cannot hide
another's and every contender starts from a clean allocator. Inside it the workload runs --repeat times after a
warm-up; with --rounds K the whole sweep is run K times over, cells interleaved, so a burst of load from a
neighbour on a shared machine falls on different cells each round. The fastest run of a cell is reported (the
slow ones measure the neighbours).
Reports output tokens/s, requests/s, p50/p99 request latency and peak memory: on the CPU the process's resident
set high-water mark (VmHWM) minus its resident set after the imports (model, adapters, KV cache, activations);
on CUDA torch.cuda.max_memory_allocated over the whole cell, plus the device memory in use at the end
(mem_get_info) in the JSON rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
    memory: dict
    cpu_seconds: float = 0.0

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
            "tok/cpu-s": round(self.output_tokens / self.cpu_seconds, 1) if self.cpu_seconds else None,
            "memory": self.memory,
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


def _proc_status_bytes(field: str) -> int | None:
    """A `VmRSS` / `VmHWM` line of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of this process, which runs one contender only (so peaks do not mix).

    start() after the imports and before the model loads; report() at the end. CPU: `peak_bytes` is the resident
    set high-water mark (VmHWM, or ru_maxrss) minus the resident set at start(). CUDA: the allocator's peak
    (max_memory_allocated since start(), which resets it), and the device memory in use at the end from
    mem_get_info (allocator cache, CUDA context and other processes included).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_start = 0

    def start(self) -> None:
        gc.collect()
        self.rss_start = _proc_status_bytes("VmRSS") or 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def report(self) -> dict:
        hwm = _proc_status_bytes("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        memory = {"host_peak_rss_bytes": hwm, "host_rss_at_start_bytes": self.rss_start}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            memory["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            memory["cuda_in_use_at_end_bytes"] = total - free
            memory["peak_bytes"] = memory["cuda_max_allocated_bytes"]
        else:
            memory["peak_bytes"] = max(0, hwm - self.rss_start)
        return memory


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
    slots = min(args.max_loras, max(1, len(used)))
    engine = Engine(
        model,
        EngineConfig(
            max_loras=slots,
            # Default: every adapter the workload uses fits in host memory (S-LoRA's setting); --max-cpu-loras
            # bounds it, and requests for evicted adapters then wait for a background read.
            max_cpu_loras=max(slots, args.max_cpu_loras or len(used)),
            max_lora_rank=args.rank,
            max_num_seqs=args.batch,
            max_num_batched_tokens=args.token_budget,
            kv_cache_tokens=args.batch * 256,
            lora_kernel=args.lora_kernel,
            max_model_len=1024,
        ),
    )
    # Register the adapters the workload uses (peft loads the same set), or with --known every one of the n.
    names = [None] * len(adapter_ids)
    if not merged:
        known = range(len(adapter_folders)) if args.known_all else used
        for i in known:
            engine.add_adapter(f"a{i}", adapter_folders[i])
        names = [f"a{i}" for i in adapter_ids]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outputs]
    engine.generate(prompts[:2], params[:2], names[:2])  # warm-up (allocator, kernel choice for small shapes)
    best = None
    for _ in range(args.repeat):
        start, cpu = time.monotonic(), time.process_time()
        results = engine.generate(prompts, params, names)
        _sync(device)
        seconds = time.monotonic() - start
        tokens = sum(len(r.token_ids) for r in results)
        run = (seconds, tokens, [r.finished_at - start for r in results], time.process_time() - cpu)
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
        start, cpu = time.monotonic(), time.process_time()
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
        run = (seconds, sum(outputs), latencies, time.process_time() - cpu)
        best = run if best is None or run[0] < best[0] else best
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument(
        "--max-cpu-loras", type=int, default=None, help="nibblora: host LRU size (default: every adapter used fits)"
    )
    p.add_argument("--known-all", action="store_true", help="nibblora: register all n adapters, not only the used ones")
    p.add_argument("--lora-kernel", default="auto", help="nibblora: auto, segment, gathered or native")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128])
    p.add_argument("--output-len", type=int, nargs=2, default=[8, 64])
    p.add_argument("--repeat", type=int, default=1, help="timed runs per cell and round; the fastest is reported")
    p.add_argument("--rounds", type=int, default=1, help="sweeps over every cell, interleaved (best of all rounds)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--in-process", action="store_true", help="run every cell in this process (peaks then mix)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one cell described by this JSON file
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 256, 688, 2, 4, 4
        args.vocab = 2048
        args.requests, args.n = args.requests or 64, args.n or [1, 8, 64]
        args.prompt_len, args.output_len, args.batch = [8, 48], [4, 24], 16
    args.requests, args.n = args.requests or 256, args.n or [1, 8, 64, 512]
    return args


def plan_cells(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """(n, workload, contender) in sweep order, workload by workload, so the n of one workload run back to back
    (their ratio is then taken under the same load); merged runs once (identical, the first n)."""
    cells, done_merged = [], False
    for kind in args.workloads:
        for n in args.n:
            if kind != "identical" and n == 1:
                continue  # every workload is "identical" with one adapter
            for contender in args.contenders:
                if contender == "merged":
                    if kind != "identical" or done_merged:
                        continue
                    done_merged = True
                cells.append((n, kind, contender))
    return cells


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    device = torch.device(args.device)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(1, args.vocab) for _ in range(rng.randint(*args.prompt_len))] for _ in range(args.requests)
    ]
    outputs = [rng.randint(*args.output_len) for _ in range(args.requests)]
    cells = plan_cells(args)
    best: dict[tuple[int, str, str], Result] = {}
    history: dict[tuple[int, str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_checkpoint(args, Path(tmp) / "base")
        adapters = write_adapters(base, Path(tmp) / "adapters", max(args.n), args.rank)
        print(
            f"model hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, {args.dtype or 'default'} on "
            f"{device}; {args.requests} requests, prompts {args.prompt_len}, outputs {args.output_len}, rank "
            f"{args.rank}, batch {args.batch}, threads {args.threads or torch.get_num_threads()}, "
            f"{args.rounds} round(s) x {args.repeat} run(s) per cell, "
            f"{'in process' if args.in_process else 'one process per cell'}",
            flush=True,
        )
        for round_index in range(args.rounds):
            for n, kind, contender in cells:
                ids = workload_adapters(kind, n, args.requests, random.Random(n))
                spec = {
                    "contender": contender,
                    "workload": kind,
                    "n": n,
                    "base": str(base),
                    "adapters": [str(a) for a in adapters[:n]],
                    "prompts": prompts,
                    "outputs": outputs,
                    "ids": ids,
                }
                result = run_cell(args, spec, Path(tmp) / "cell.json")
                key = (n, kind, contender)
                history.setdefault(key, []).append(result)
                if key not in best or result.seconds < best[key].seconds:
                    if key in best:  # the peak is a property of the cell, not of the fastest round
                        result.peak_bytes = max(result.peak_bytes, best[key].peak_bytes)
                    best[key] = result
                print(f"[round {round_index + 1}/{args.rounds}] " + _format_row(result.row()), flush=True)
    rows = [best[key].row() for key in cells]
    print()
    print(_summary(rows))
    if args.rounds > 1:
        print(_paired_ratios(history, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def run_cell(args: argparse.Namespace, spec: dict, spec_path: Path) -> Result:
    """One cell: in a fresh subprocess (the default) or here."""
    if args.in_process:
        return run_spec(args, spec)
    spec_path.write_text(json.dumps(spec))
    argv = [a for a in sys.argv[1:] if a != "--in-process"]
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", str(spec_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark cell {spec['contender']} / {spec['workload']} / n={spec['n']} failed "
            f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return Result(**json.loads(lines[-1].removeprefix("RESULT ")))


def run_worker(args: argparse.Namespace) -> None:
    """Subprocess side of run_cell: run one cell and print its Result as one `RESULT {json}` line."""
    spec = json.loads(Path(args.worker).read_text())
    result = run_spec(args, spec)
    print("RESULT " + json.dumps(result.__dict__), flush=True)


def run_spec(args: argparse.Namespace, spec: dict) -> Result:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cell_args = argparse.Namespace(**{**vars(args), "dtype": dtype})
    _import_contender(spec["contender"])  # so the memory baseline holds the code, and the peak only the data
    memory = PeakMemory(device)
    memory.start()
    seconds, tokens, latencies, cpu_seconds = run_contender(
        spec["contender"],
        cell_args,
        Path(spec["base"]),
        [Path(a) for a in spec["adapters"]],
        spec["prompts"],
        spec["outputs"],
        spec["ids"],
        device,
    )
    report = memory.report()
    gc.collect()
    return Result(
        spec["contender"],
        spec["workload"],
        spec["n"],
        len(set(spec["ids"])),
        seconds,
        tokens,
        len(spec["prompts"]),
        latencies,
        report["peak_bytes"],
        report,
        cpu_seconds,
    )


def _import_contender(contender: str) -> None:
    import torch._dynamo  # noqa: F401  (loading a model pulls it in, with sympy: ~150 MB of code, not data)

    if contender in ("nibblora", "merged"):
        import nibblora.lora
        import nibblora.models
        import nibblora.serve  # noqa: F401
    else:
        import peft  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401


def run_contender(contender, args, base, adapters, prompts, outputs, ids, device) -> tuple:
    if contender in ("nibblora", "merged"):
        return run_nibblora(args, base, adapters, prompts, outputs, ids, device, merged=contender == "merged")
    if contender in ("peft-per-adapter", "peft-mixed"):
        return run_peft(args, base, adapters, prompts, outputs, ids, device, mixed=contender == "peft-mixed")
    raise ValueError(f"unknown contender {contender!r}: use nibblora, peft-per-adapter, peft-mixed or merged")


def _paired_ratios(history: dict[tuple[int, str, str], list[Result]], args: argparse.Namespace) -> str:
    """Per workload, nibblora's n=max / n=8 ratio taken within each round (the two cells ran back to back), and
    its median over rounds: on a shared machine steadier than a ratio of two best-of runs."""
    lines = []
    small, large = 8, max(args.n)
    for kind in ("identical", "uniform", "skewed", "distinct"):
        a, b = history.get((small, kind, "nibblora")), history.get((large, kind, "nibblora"))
        if not a or not b or large == small:
            continue
        wall = sorted(y.tokens_per_s / x.tokens_per_s for x, y in zip(a, b, strict=False))
        cpu = sorted(
            (y.output_tokens / y.cpu_seconds) / (x.output_tokens / x.cpu_seconds)
            for x, y in zip(a, b, strict=False)
            if x.cpu_seconds and y.cpu_seconds
        )
        line = (
            f"{kind}: n={large} / n={small} per round (wall) {[round(r, 2) for r in wall]}, median {_median(wall):.2f}"
        )
        if cpu:
            line += f"; per CPU-second {[round(r, 2) for r in cpu]}, median {_median(cpu):.2f}"
        lines.append(line)
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _format_row(row: dict) -> str:
    return "  ".join(f"{k}={v}" for k, v in row.items() if k != "memory")


def _summary(rows: list[dict]) -> str:
    """Markdown table plus the ratios the issue sets targets for."""
    keys = [k for k in rows[0] if k != "memory"]
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
