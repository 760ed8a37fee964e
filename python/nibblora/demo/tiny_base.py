"""Pretrain a tiny Llama-architecture model on the Python standard library's own source, from scratch.

    python examples/pretrain_tiny.py --out build/tiny-base [--steps 300]    # or pretrain(out, steps) from here

Writes a Hugging Face checkpoint (config.json, model.safetensors) plus tokenizer.json: a byte-level BPE trained
by the `tokenizers` package on the same text, with ChatML's special tokens and one token per digit. Every step is
seeded, so the same Python version gives the same model. Held-out stdlib files (every 10th, by sorted path) never
enter pretraining: they are the demo's "general text".
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nibblora.models import LlamaForCausalLM, ModelConfig

SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ~1.1 M parameters: pretrains in about a minute and a half on two CPU cores.
MODEL_SHAPE = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(pretraining files, held-out files): the stdlib's .py files outside test folders, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in p.parts)
    )
    return [p for i, p in enumerate(files) if i % 10], [p for i, p in enumerate(files) if i % 10 == 0]


def read_text(files: list[Path], limit_chars: int) -> str:
    parts, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return "\n<|endoftext|>\n".join(parts)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one (so arithmetic and dates are learnable), then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return tokenizer


def hf_config(config: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def save_checkpoint(model: LlamaForCausalLM, tokenizer: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))


def pretrain(
    out: Path,
    steps: int = 300,
    seq_len: int = 64,
    batch_size: int = 16,
    lr: float = 3e-3,
    text_chars: int = 600_000,
    seed: int = 0,
    log_every: int = 100,
) -> Path:
    torch.manual_seed(seed)
    train_files, _ = stdlib_files()
    text = read_text(train_files, text_chars)
    tokenizer = train_tokenizer(text, MODEL_SHAPE["vocab_size"])
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)
    print(f"pretraining on {len(text) / 1e6:.1f} M characters of stdlib source = {len(ids) / 1e6:.2f} M tokens")
    config = ModelConfig(
        **MODEL_SHAPE, eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=tokenizer.token_to_id("<pad>")
    )
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(
            (s + 1) / warmup,
            0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup)))) * 0.9 + 0.1,
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        offsets = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[o : o + seq_len + 1] for o in offsets.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            rate = step * batch_size * seq_len / (time.perf_counter() - start)
            print(f"  pretrain step {step}/{steps} loss {loss.item():.3f} ({rate:.0f} tokens/s)", flush=True)
    save_checkpoint(model, tokenizer, out)
    return out


def is_pretrained_base(directory: Path) -> bool:
    """True when `directory` holds a base this module wrote with today's shape: config.json of MODEL_SHAPE,
    model.safetensors and tokenizer.json with the special tokens (so a stale or foreign folder is not reused)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
        tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    except Exception:  # OSError, JSON errors, and tokenizers' bare Exception for an unreadable tokenizer.json
        return False
    return (
        (Path(directory) / "model.safetensors").is_file()
        and all(config.get(k) == v for k, v in MODEL_SHAPE.items())
        and all(tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/tiny-base"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    pretrain(args.out, args.steps)
    print(f"wrote {args.out}")
