"""The memory calculator against real runs: `python -m nibblora.train` on a grid of configurations, the measured
peak (nibblora.memory.MemoryMeter, as the run store records it) next to `estimate_memory`'s total.

    python bench/memory_grid.py                    # the whole grid (CPU, a few minutes on 2 cores)
    python bench/memory_grid.py --only demo-qlora-b16 tiny-lora-b2
    python bench/memory_grid.py --device cuda      # the same grid on a GPU (bf16)

Each configuration trains 2 steps from a generated random-weight checkpoint in its own process; the ratio is
estimate / measured peak (the promise: within 0.85..1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The demo's model (nibblora.demo.tiny_base) and a 106 M-parameter one; "tiny" is the test suite's share.
MODELS = {
    "demo": dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "tiny": dict(
        vocab_size=4000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "106m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=9,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
}


@dataclass(frozen=True)
class GridPoint:
    model: str
    mode: str
    batch: int
    seq: int
    checkpointing: bool
    dtype: str = "float32"
    keep_mlp_layers: int = 0  # selective checkpointing (model.keep_mlp_layers)

    @property
    def name(self) -> str:
        return (
            f"{self.model}-{self.mode}-b{self.batch}-s{self.seq}"
            + ("-ckpt" if self.checkpointing else "")
            + ("-bf16" if self.dtype == "bfloat16" else "")
            + (f"-keepmlp{self.keep_mlp_layers}" if self.keep_mlp_layers else "")
        )


GRID = [
    GridPoint("demo", "qlora", 16, 128, False),
    GridPoint("demo", "lora", 16, 256, False),
    GridPoint("demo", "full", 8, 128, True),
    GridPoint("106m", "full", 2, 256, False),
    GridPoint("106m", "lora", 4, 256, False),
    GridPoint("106m", "lora", 4, 256, True),
    GridPoint("106m", "qlora", 2, 512, False),
    GridPoint("106m", "qlora", 4, 512, True),
    GridPoint("106m", "qlora", 1, 1024, False),
    GridPoint("106m", "qlora", 2, 512, False, "bfloat16"),
    GridPoint("106m", "lora", 4, 256, True, "bfloat16"),
    GridPoint("106m", "qlora", 4, 512, True, keep_mlp_layers=-1),
    GridPoint("106m", "full", 2, 256, True, keep_mlp_layers=4),
]
# What `make test` runs (tests/test_memory.py): small and quick, one per mode.
QUICK = [
    GridPoint("tiny", "full", 2, 128, False),
    GridPoint("tiny", "qlora", 8, 128, False),
    GridPoint("tiny", "lora", 8, 128, True),
    GridPoint("tiny", "qlora", 8, 128, True, keep_mlp_layers=-1),
]


def write_checkpoint(shape: dict, folder: Path) -> None:
    import torch
    from safetensors.torch import save_model

    from nibblora.models import LlamaForCausalLM, ModelConfig

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **shape,
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(config))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_model(model, str(folder / "model.safetensors"))


def run_point(point: GridPoint, work: Path, device: str = "cpu", threads: int = 1) -> dict:
    """Train 2 steps of `point` in a fresh process; {measured, estimate, ratio, ...} from the run store."""
    from nibblora.runs import open_run

    shape = MODELS[point.model]
    model_dir = work / f"model-{point.model}"
    if not (model_dir / "model.safetensors").is_file():
        write_checkpoint(shape, model_dir)
    vocab = shape["vocab_size"]
    data = work / f"data-{point.seq}-{vocab}.jsonl"
    rows = [{"input_ids": [(i * 131 + j * 7) % vocab for j in range(point.seq)]} for i in range(32)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / f"run-{point.name}"
    config = work / f"{point.name}.toml"
    config.write_text(f"""
output_dir = "{out}"
[model]
path = "{model_dir}"
dtype = "{point.dtype}"
gradient_checkpointing = {str(point.checkpointing).lower()}
keep_mlp_layers = {point.keep_mlp_layers}
[lora]
r = 16
alpha = 32.0
dropout = 0.05
target_modules = "all-linear"
[data]
train = "{data}"
batch_size = {point.batch}
[train]
mode = "{point.mode}"
max_steps = 2
grad_accum = 1
device = "{device}"
threads = {threads}
[checkpoint]
every = 0
""")
    import nibblora

    # The child imports the nibblora this process runs (the worktree's, or an installed wheel on a GPU machine).
    env = dict(os.environ, PYTHONPATH=str(Path(nibblora.__file__).resolve().parents[1]), OMP_NUM_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, "-m", "nibblora.train", str(config), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{point.name}: nibblora.train failed:\n{done.stderr[-2000:]}")
    with open_run(out) as store:
        last = store.metrics()[max(store.metrics())]
    measured, estimate = last["mem_peak_bytes"], last["mem_estimate_bytes"]
    return {"name": point.name, "measured": measured, "estimate": estimate, "ratio": estimate / measured}


def format_table(results: list[dict]) -> str:
    lines = [
        "| configuration | measured peak MiB | estimate MiB | estimate / measured |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['measured'] / 2**20:.1f} | {r['estimate'] / 2**20:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="grid point names")
    parser.add_argument("--quick", action="store_true", help="the test suite's small grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else GRID
    if args.device != "cpu":
        grid = [GridPoint(p.model, p.mode, p.batch, p.seq, p.checkpointing, "bfloat16") for p in grid]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for point in grid:
            if args.only and point.name not in args.only:
                continue
            results.append(run_point(point, Path(tmp), args.device, args.threads))
            r = results[-1]
            print(
                f"{r['name']:<28} measured {r['measured'] / 2**20:8.1f} MiB  estimate {r['estimate'] / 2**20:8.1f} "
                f"MiB  ratio {r['ratio']:.2f}",
                flush=True,
            )
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
