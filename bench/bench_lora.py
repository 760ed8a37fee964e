"""LoRA / QLoRA training step: nibblora against peft (dense) and peft + bitsandbytes (4-bit), in one run.

    python bench/bench_lora.py                      # hidden 2048, 2 layers, seq 512, vocab 32000, r 16, bf16, CPU
    python bench/bench_lora.py --device cuda --batch 8
    python bench/bench_lora.py --quick              # tiny sizes, a smoke test

One transformers LlamaForCausalLM built from a config (random weights, same seed for every contender), LoRA on
all linear layers but lm_head. "nibblora ... (own model)" runs the same weights in nibblora's LlamaForCausalLM, the
model `python -m nibblora.train` trains: q/k/v and the SwiGLU MLP through the group-level LoRA functions, the loss
through the chunked lm_head + cross-entropy. The other nibblora rows put nibblora's LoRA layers into the
transformers model (its loss keeps full logits, like peft's). `--checkpointing` turns gradient checkpointing on
for every contender (non-reentrant). For each contender:
  best s          fastest wall time of forward + backward (loss on the input ids as labels) after warm-up;
                  the timed steps of all contenders are interleaved (median s is printed too)
  tok/s           batch * seq / best step time
  saved MB        bytes kept for backward, summed over saved_tensors_hooks with each storage counted once,
                  excluding storages of the model's parameters and buffers (resident anyway): activations
  LoRA MB         the part of `saved MB` first saved inside the LoRA layers themselves
  +params MB      the same sum including parameter/buffer storages (weights a contender saves for backward)
  peak MB         allocator peak during one step, above what was allocated before it: CUDA max_memory_allocated,
                  CPU malloc's in-use bytes (mallinfo2) sampled every 2 ms by nibblora.memory.MemoryMeter, with
                  nibblora's dequantization buffer pool emptied first (what it keeps during the step counts)
  device MB       CUDA only: device memory taken by the step (torch.cuda.mem_get_info before and after, the
                  cache emptied first), which also sees paged / managed allocations the allocator does not
Ratios compare nibblora QLoRA with peft + bitsandbytes and nibblora LoRA with peft.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Result:
    name: str
    step_s: float
    median_s: float
    tokens_per_s: float
    saved_bytes: int
    lora_saved_bytes: int
    saved_with_params_bytes: int
    peak_bytes: int | None = None
    device_bytes: int | None = None  # CUDA: device memory taken during the step (torch.cuda.mem_get_info)
    notes: list[str] = field(default_factory=list)


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    # On a GPU the random init runs there (a 1.5 B-parameter model inits in seconds instead of a minute on CPUs);
    # every contender draws the same weights either way.
    with torch.device(args.device if args.device.startswith("cuda") else "cpu"):
        model = LlamaForCausalLM(config).to(DTYPES[args.dtype])
    return model.to(args.device).train()


def lora_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_nibblora_model(
    args: argparse.Namespace, quantize: bool, fused: bool = True, keep_mlp_layers: int | None = None
) -> tuple[nn.Module, tuple[type, ...]]:
    """The same weights in nibblora's own LlamaForCausalLM (what nibblora.train runs), adapters injected.
    fused=False: every projection runs as its own module (the path before the group-level functions), forced by
    a no-op forward hook on each, which makes the group functions step aside."""
    from nibblora.lora import inject_lora
    from nibblora.models import LlamaForCausalLM, ModelConfig

    reference = build_model(args)
    config = ModelConfig.from_hf_dict({**reference.config.to_dict(), "model_type": "llama"})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(reference.state_dict(), assign=True)
    del reference
    model.to(args.device, DTYPES[args.dtype]).train()
    inject_lora(
        model, "all-linear", r=args.r, alpha=args.alpha, dropout=args.dropout, quantize_base="nf4" if quantize else None
    )
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.model.keep_mlp_layers = args.keep_mlp_layers if keep_mlp_layers is None else keep_mlp_layers
    model.model.offload_activations = args.offload_activations
    if args.loss_chunk:
        model.loss_chunk_tokens = args.loss_chunk
    if not fused:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"):
                module.register_forward_hook(lambda *hook_args: None)
    return model.to(args.device), ()


def make_nibblora(args: argparse.Namespace, quantize: bool) -> tuple[nn.Module, tuple[type, ...]]:
    from nibblora.lora import LoRALinear, inject_lora

    model = build_model(args)
    inject_lora(
        model, "all-linear", r=args.r, alpha=args.alpha, dropout=args.dropout, quantize_base="nf4" if quantize else None
    )
    enable_checkpointing(model, args)
    return model.to(args.device), (LoRALinear,)


def enable_checkpointing(model: nn.Module, args: argparse.Namespace) -> None:
    """transformers' gradient checkpointing, non-reentrant (peft's recommended setting; the inputs need no grad)."""
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def peft_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=lora_targets(), task_type="CAUSAL_LM"
    )


def make_peft(args: argparse.Namespace) -> tuple[nn.Module, tuple[type, ...]]:
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(build_model(args), peft_config(args))
    enable_checkpointing(model, args)
    return model, (LoraLayer,)


def make_peft_bnb(args: argparse.Namespace) -> tuple[nn.Module, tuple[type, ...]]:
    """peft over bitsandbytes Linear4bit (NF4, double quant, compute dtype = model dtype), the usual QLoRA."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from nibblora.quant import quantize_4bit, to_bnb_state_dict

    model = build_model(args)
    dtype = DTYPES[args.dtype]
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in lora_targets():
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        # Same bytes as bitsandbytes' own quantizer (nibblora.quant is byte-compatible), built the way
        # transformers rebuilds a saved 4-bit checkpoint.
        state = to_bnb_state_dict(quantize_4bit(module.weight.detach().cpu(), "nf4", 64, True), "weight")
        stats = {k.removeprefix("weight."): v for k, v in state.items() if k != "weight"}
        layer.weight = bnb.nn.Params4bit.from_prequantized(
            state["weight"], stats, requires_grad=False, device=args.device
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model = get_peft_model(model, peft_config(args))
    enable_checkpointing(model, args)
    return model.to(args.device), (LoraLayer,)


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def measure_saved(model: nn.Module, lora_types: tuple[type, ...], run_step: Callable[[], torch.Tensor]):
    """(activation bytes, of which first saved inside LoRA layers, bytes including parameters) kept for backward."""
    resident = {storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, tuple[int, bool]] = {}
    depth = [0]

    def enter(module, inputs):
        depth[0] += 1

    def leave(module, inputs, output):
        depth[0] -= 1

    handles = []
    for module in model.modules():
        if isinstance(module, lora_types):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))

    def pack(t):
        if t.device.type != "meta":
            ptr, nbytes = storage_key(t)
            if ptr not in seen:
                seen[ptr] = (nbytes, depth[0] > 0)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run_step()
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    activations = sum(n for ptr, (n, _) in seen.items() if ptr not in resident)
    in_lora = sum(n for ptr, (n, lora) in seen.items() if ptr not in resident and lora)
    total = sum(n for n, _ in seen.values())
    return activations, in_lora, total


class Contender:
    """A built model and its step closure; timed steps of all contenders are interleaved so that a noisy
    machine (other processes, turbo, thermal) hits them alike."""

    def __init__(self, name: str, factory, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.model, self.lora_types = factory(args)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        self.ids = ids.to(args.device)
        self.times: list[float] = []

    def forward_loss(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, labels=self.ids)
        if isinstance(out, tuple):  # nibblora's model: (sum over supervised tokens, their number)
            return out[0] / out[1]
        return out.loss

    def step(self) -> None:
        self.forward_loss().backward()
        for p in self.model.parameters():
            p.grad = None

    def sync(self) -> None:
        if self.args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed_step(self) -> None:
        self.sync()
        start = time.perf_counter()
        self.step()
        self.sync()
        self.times.append(time.perf_counter() - start)

    def peak_bytes(self) -> int | None:
        if not self.args.device.startswith("cuda"):
            from nibblora.memory.measure import MemoryMeter
            from nibblora.quant import output_pool_stats, set_output_pool_limit

            # Dequantized weights come from the Rust core's buffer pool. Buffers it kept from earlier steps would sit
            # in the baseline although the step uses them: empty it, so what the step takes (and what the pool keeps
            # while the step runs) counts toward the step's peak.
            limit = output_pool_stats()["limit_bytes"]
            set_output_pool_limit(0)
            set_output_pool_limit(limit)
            gc.collect()
            meter = MemoryMeter(torch.device("cpu"))  # baseline: what is allocated now (model, inputs)
            try:
                self.step()
                return meter.read()["mem_peak_bytes"]
            finally:
                meter.stop()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the cache then grows to the step's reserved high-water mark and keeps it
        before = torch.cuda.memory_allocated()
        free_before = torch.cuda.mem_get_info()[0]
        torch.cuda.reset_peak_memory_stats()
        self.step()
        torch.cuda.synchronize()
        # Device memory in use, so that paged / managed allocations (which max_memory_allocated does not see) count.
        self.device_bytes = free_before - torch.cuda.mem_get_info()[0]
        return torch.cuda.max_memory_allocated() - before

    def result(self) -> Result:
        # Best of the timed steps: on a shared machine other processes only ever add time.
        step_s, median_s = min(self.times), statistics.median(self.times)
        self.device_bytes = None
        peak = self.peak_bytes()
        saved, lora_saved, with_params = measure_saved(self.model, self.lora_types, self.forward_loss)
        for p in self.model.parameters():
            p.grad = None
        tokens_per_s = self.args.batch * self.args.seq / step_s
        return Result(
            self.name, step_s, median_s, tokens_per_s, saved, lora_saved, with_params, peak, self.device_bytes
        )


def format_results(results: dict[str, Result], args: argparse.Namespace) -> str:
    mb = 1e6
    head = (
        f"{'contender':<27} {'best s':>8} {'median s':>8} {'tok/s':>9} {'saved MB':>9} {'LoRA MB':>8} "
        f"{'+params MB':>10}"
    )
    head += f" {'peak MB':>9}"
    cuda = args.device.startswith("cuda")
    head += f" {'device MB':>9}" if cuda else ""
    lines = [head]
    for r in results.values():
        line = (
            f"{r.name:<27} {r.step_s:>8.3f} {r.median_s:>8.3f} {r.tokens_per_s:>9.0f} {r.saved_bytes / mb:>9.1f} "
            f"{r.lora_saved_bytes / mb:>8.1f} {r.saved_with_params_bytes / mb:>10.1f}"
        )
        line += f" {r.peak_bytes / mb:>9.1f}" if r.peak_bytes is not None else ""
        line += f" {r.device_bytes / mb:>9.1f}" if r.device_bytes is not None else ""
        lines.append(line)

    def ratio(ours: str, anchor: str) -> None:
        if ours not in results or anchor not in results:
            return
        a, b = results[ours], results[anchor]
        parts = [
            f"step time {a.step_s / b.step_s:.2f}x",
            f"tok/s {a.tokens_per_s / b.tokens_per_s:.2f}x",
            f"saved {a.saved_bytes / b.saved_bytes:.2f}x",
            f"LoRA-layer saved {a.lora_saved_bytes / max(b.lora_saved_bytes, 1):.2f}x",
            f"saved+params {a.saved_with_params_bytes / b.saved_with_params_bytes:.2f}x",
        ]
        if a.peak_bytes and b.peak_bytes:
            parts.append(f"peak {a.peak_bytes / b.peak_bytes:.2f}x")
        if a.device_bytes and b.device_bytes:
            parts.append(f"device memory {a.device_bytes / b.device_bytes:.2f}x")
        lines.append(f"{ours} / {anchor}: " + ", ".join(parts))

    ratio("nibblora QLoRA (own model)", "peft+bnb QLoRA")  # ratios use the best step times
    ratio("nibblora LoRA (own model)", "peft LoRA")
    ratio("nibblora QLoRA (own model)", "nibblora QLoRA (own, unfused)")
    ratio("nibblora LoRA (own model)", "nibblora LoRA (own, unfused)")
    ratio("nibblora QLoRA", "peft+bnb QLoRA")
    ratio("nibblora QLoRA", "peft LoRA")
    ratio("nibblora LoRA", "peft LoRA")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on, for everyone")
    parser.add_argument(
        "--keep-mlp-layers",
        type=int,
        default=0,
        help="own model, with --checkpointing: this many layers (-1: all) keep their MLP activations and recompute "
        "only attention (selective checkpointing)",
    )
    parser.add_argument(
        "--offload-activations",
        action="store_true",
        help="own model, with --checkpointing: layer inputs but the last wait in host memory until backward "
        "(pinned, on a side stream, on CUDA); saved MB then leaves out what checkpoint saves (the offload hooks "
        "see it, not the bench's), peak MB and device MB count what stays on the device",
    )
    parser.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        help="tokens per chunk of nibblora's chunked loss (own model; default: the model's)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="contenders to run: nibblora-model-qlora nibblora-model-lora nibblora-qlora "
        "nibblora-lora peft peft-bnb (default: these), nibblora-model-qlora-unfused "
        "nibblora-model-lora-unfused (the own model without the group-level functions), "
        "nibblora-model-qlora-keepmlp (the own model, every layer keeping its MLP activations: selective "
        "checkpointing with --checkpointing)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 128, 256, 2, 4, 4
        args.vocab, args.seq, args.r, args.steps, args.warmup = 512, 64, 8, 2, 1
    return args


CONTENDERS = {
    "nibblora-model-qlora": ("nibblora QLoRA (own model)", lambda a: make_nibblora_model(a, True)),
    "nibblora-model-lora": ("nibblora LoRA (own model)", lambda a: make_nibblora_model(a, False)),
    "nibblora-model-qlora-unfused": ("nibblora QLoRA (own, unfused)", lambda a: make_nibblora_model(a, True, False)),
    "nibblora-model-lora-unfused": ("nibblora LoRA (own, unfused)", lambda a: make_nibblora_model(a, False, False)),
    "nibblora-model-qlora-keepmlp": (
        "nibblora QLoRA (own, MLP kept)",
        lambda a: make_nibblora_model(a, True, keep_mlp_layers=-1),
    ),
    "nibblora-qlora": ("nibblora QLoRA", lambda a: make_nibblora(a, True)),
    "peft-bnb": ("peft+bnb QLoRA", make_peft_bnb),
    "nibblora-lora": ("nibblora LoRA", lambda a: make_nibblora(a, False)),
    "peft": ("peft LoRA", make_peft),
}


def main(argv: list[str] | None = None) -> dict[str, Result]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"LlamaForCausalLM hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, heads "
        f"{args.heads}/{args.kv_heads}, vocab {args.vocab}, batch {args.batch} x seq {args.seq}; LoRA r {args.r} "
        f"alpha {args.alpha:g} dropout {args.dropout} on all linear layers but lm_head; {args.dtype} on "
        f"{args.device} ({torch.get_num_threads()} threads); {args.steps} interleaved timed steps; gradient "
        f"checkpointing {'on' if args.checkpointing else 'off'}"
    )
    contenders: list[Contender] = []
    for key, (name, factory) in CONTENDERS.items():
        if (key not in args.only) if args.only else key.endswith(("-unfused", "-keepmlp")):
            continue
        try:
            contenders.append(Contender(name, factory, args))
        except ImportError as err:
            print(f"{name}: skipped ({err})")
    for c in contenders:
        for _ in range(args.warmup):
            c.step()
    for i in range(args.steps):
        for c in contenders:
            c.timed_step()
        print(
            f"  step {i + 1}/{args.steps}: " + ", ".join(f"{c.name} {c.times[-1]:.3f}s" for c in contenders), flush=True
        )
    results = {c.name: c.result() for c in contenders}
    print(format_results(results, args))
    return results


if __name__ == "__main__":
    main()
