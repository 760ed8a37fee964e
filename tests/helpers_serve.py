"""Fixtures for the serving tests: a tiny random Llama saved as a checkpoint, and random peft LoRA folders."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from nibblora.lora import load_adapter
from nibblora.models.config import ModelConfig
from nibblora.models.llama import LlamaForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=None,
)
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(ModelConfig(**{**TINY, **overrides})).eval()


def module_shapes(model: LlamaForCausalLM) -> dict[str, tuple[int, int]]:
    """{name: (in, out)} of every decoder linear."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for proj, parent in PROJECTIONS.items():
            m = getattr(getattr(layer, parent), proj)
            out[f"model.layers.{i}.{parent}.{proj}"] = (m.in_features, m.out_features)
    return out


def write_adapter(
    folder: Path,
    shapes: dict[str, tuple[int, int]],
    r: int,
    targets: list[str],
    *,
    seed: int,
    alpha: float = 16.0,
    rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    extra_config: dict | None = None,
    tensor_edit=None,
) -> Path:
    """A peft LoRA folder with random (non-zero) A and B for every module whose last name part is in targets."""
    gen = torch.Generator().manual_seed(seed)
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        if name.rsplit(".", 1)[1] not in targets:
            continue
        rank = next((v for k, v in rank_pattern.items() if name.endswith(k)), r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.2
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.2
    if tensor_edit is not None:
        tensor_edit(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "use_rslora": rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "use_dora": False,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        **(extra_config or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, sort_keys=True))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def random_adapters(root: Path, shapes: dict[str, tuple[int, int]], count: int, seed: int = 0) -> dict[str, Path]:
    """`count` adapters with ranks spread over 1..64, random target subsets, some with rsLoRA or patterns."""
    rng = random.Random(seed)
    names = list(PROJECTIONS)
    ranks = [1, 2, 3, 4, 8, 16, 32, 64]
    out = {}
    for i in range(count):
        targets = sorted(rng.sample(names, rng.randint(1, len(names))))
        r = ranks[i % len(ranks)] if i < len(ranks) else rng.randint(1, 64)
        kwargs = {}
        if i % 5 == 1:
            kwargs["rslora"] = True
        if i % 7 == 2:
            kwargs["rank_pattern"] = {targets[0]: max(1, r // 2)}
            kwargs["alpha_pattern"] = {targets[-1]: 3.0}
        out[f"ad{i}"] = write_adapter(
            root / f"ad{i}", shapes, r, targets, seed=1000 + i, alpha=float(rng.choice([1, 8, 16, 32])), **kwargs
        )
    return out


def reference_model(base: LlamaForCausalLM, adapter_dir: Path | None) -> LlamaForCausalLM:
    """The plain model with one adapter loaded by nibblora.lora.load_adapter (the single-adapter reference)."""
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, check_base_model=False)
    return model.eval()


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_served_model(folder: Path, seed: int = 0) -> tuple[LlamaForCausalLM, Path]:
    """A tiny Llama checkpoint with a trained byte-level tokenizer and a ChatML template, as the server reads it.
    Returns (the model, folder)."""
    from helpers_data import byte_level_tokenizer

    byte_level_tokenizer(folder, eos="<|im_end|>")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|im_end|>")
    model = tiny_model(seed, vocab_size=640, eos_token_id=eos, max_position_embeddings=4096)
    with torch.no_grad():  # a larger output scale, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20.0)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        **{k: v for k, v in TINY.items() if k != "eos_token_id"},
        "vocab_size": 640,
        "max_position_embeddings": 4096,
        "eos_token_id": eos,
        "rms_norm_eps": model.config.rms_norm_eps,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return model, folder
