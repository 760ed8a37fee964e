"""Merging a rank-16 LoRA (all linear layers) into a ~1B-parameter Llama in bfloat16: nibblora vs peft.

    python bench/bench_merge.py                 # TinyLlama-1.1B shapes (2.2 GB of bf16 weights)
    python bench/bench_merge.py --size 300m     # smaller, quicker

The checkpoint is generated (random tensors in Llama layout, written tensor by tensor with safetensors) so the
benchmark needs no download; transformers loads it from its config. Each contender runs in its own child process
and is timed from start to finished output folder; peak memory is the child's ru_maxrss.
  peft:     AutoModelForCausalLM.from_pretrained -> PeftModel.from_pretrained -> merge_and_unload -> save_pretrained
  nibblora: nibblora.merge.merge_checkpoint (Rust, streaming)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "300m": (1024, 2816, 16, 16, 4, 32000),
    "50m": (512, 1408, 6, 8, 4, 8000),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_shapes(hidden, inter, layers, heads, kv, vocab) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def write_checkpoint(directory: Path, size: str, rank: int) -> tuple[Path, Path, int]:
    from nibblora.checkpoint.writer import SafetensorsWriter, TensorSpec

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    base, adapter = directory / "base", directory / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    shapes = llama_shapes(hidden, inter, layers, heads, kv, vocab)
    g = torch.Generator().manual_seed(0)
    with SafetensorsWriter(
        base / "model.safetensors", [TensorSpec(n, "BF16", s) for n, s in shapes.items()], metadata={"format": "pt"}
    ) as out:
        for name, shape in shapes.items():
            out.write(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    lora = {}
    for name, shape in shapes.items():
        if name.rsplit(".", 2)[-2] in PROJ:
            module = name[: -len(".weight")]
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, shape[1], generator=g) * 0.01
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], rank, generator=g) * 0.01
    from safetensors.torch import save_file

    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "target_modules": PROJ,
                "bias": "none",
                "base_model_name_or_path": str(base),
            },
            indent=2,
        )
    )
    return base, adapter, sum(int(torch.tensor(s).prod()) for s in shapes.values())


PEFT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""
NIBBLORA = """
import sys
from nibblora.merge import merge_checkpoint
base, adapter, out = sys.argv[1:4]
merge_checkpoint(base, [adapter], out, progress=False)
"""


_REPORT_PEAK = """
for _line in open("/proc/self/status"):
    if _line.startswith("VmHWM:"):
        print("NIBBLORA_BENCH_PEAK_KB", _line.split()[1], flush=True)
"""


def run_child(code: str, *args: str) -> tuple[float, int]:
    """(seconds, peak resident bytes) of `python -c code args...` in a fresh process.

    The peak is the child's own VmHWM, read by the child as it ends. Not the ru_maxrss that wait4 reports:
    Linux carries the parent's high-water mark into a child across fork/exec, so a parent that has just
    generated a 2 GB checkpoint would make every child look at least that large."""
    os.sync()  # start each contender with no dirty pages pending: writeback throttling would bill the next one
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + _REPORT_PEAK, *args], stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child failed with exit code {done.returncode}")
    peaks = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("NIBBLORA_BENCH_PEAK_KB")]
    if not peaks:
        raise SystemExit("child did not report its peak memory")
    return seconds, peaks[-1] * 1024


def compare(nib: Path, peft: Path, name: str) -> int:
    """Largest difference, in bf16 rounding steps, between the two outputs' `name`."""
    from safetensors import safe_open

    def get(folder: Path) -> torch.Tensor:
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                if name in st.keys():
                    return st.get_tensor(name)
        raise KeyError(name)

    a, b = get(nib), get(peft)
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b", choices=tuple(SIZES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_merge-", dir=args.workdir))
    try:
        base, adapter, params = write_checkpoint(root, args.size, args.rank)
        print(
            f"checkpoint: {params / 1e9:.2f}B parameters, bf16, "
            f"{os.path.getsize(base / 'model.safetensors') / 1e9:.2f} GB; "
            f"rank-{args.rank} LoRA on {', '.join(PROJ)}; {os.cpu_count()} CPUs"
        )
        nib_s, nib_rss = run_child(NIBBLORA, str(base), str(adapter), str(root / "out_nibblora"))
        print(f"nibblora merge : {nib_s:6.2f} s, peak {nib_rss / 1e9:.2f} GB")
        if not args.skip_peft:
            peft_s, peft_rss = run_child(PEFT, str(base), str(adapter), str(root / "out_peft"))
            print(f"peft merge     : {peft_s:6.2f} s, peak {peft_rss / 1e9:.2f} GB")
            print(f"nibblora is {peft_s / nib_s:.1f}x faster with {nib_rss / peft_rss:.2f}x peft's peak memory")
            steps = compare(root / "out_nibblora", root / "out_peft", "model.layers.0.mlp.down_proj.weight")
            print(f"outputs agree: model.layers.0.mlp.down_proj.weight within {steps} bf16 rounding step(s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
