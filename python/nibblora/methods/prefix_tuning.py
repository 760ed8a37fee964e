"""Prefix tuning (Li & Liang 2021): trainable keys and values prepended to every layer's attention.

    tuning = inject_prefix_tuning(model, num_virtual_tokens=8, projection_hidden=64)   # MLP reparameterization
    save_prefix_tuning(model, "out/prefix")      # peft's PREFIX_TUNING format: prompt_embeddings
    load_prefix_tuning(model, "out/prefix")      # [n_virtual, num_layers x 2 x kv_heads x head_dim], float32

The prefix lives in the KV cache: a hook fills an empty (or absent) cache with each layer's prefix keys/values
[batch, kv_heads, n_virtual, head_dim] before the first forward, and prepends n_virtual ones to the attention
mask, exactly as peft hands transformers its `past_key_values`. Keys are not rotated (RoPE applies to real tokens
only), real tokens sit at positions n_virtual, n_virtual + 1, ... (explicit position_ids, which count real tokens
from 0, are shifted by n_virtual), and grouped-query attention stores num_key_value_heads heads per layer, which
is why peft writes token_dim = kv_heads x head_dim and num_attention_heads = kv_heads for GQA models. Generation
needs nothing else: `generate` passes an empty cache, the hook fills it, and decoding appends after the prefix.

The reparameterization (`projection_hidden`): embedding [n, token_dim] -> Linear -> tanh -> Linear to
[n, layers x 2 x token_dim], trained instead of the prefix itself; saving writes its output (peft does the same),
so the MLP never reaches the file and a loaded adapter is the plain prefix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nibblora.errors import AdapterError
from nibblora.lora.adapter_files import CONFIG_NAME, read_method_files
from nibblora.methods.common import (
    expect_peft_type,
    freeze,
    model_name_or_path,
    model_sizes,
    task_type,
    write_peft_folder,
)
from nibblora.methods.virtual_tokens import bind_call, check_context, forward_accepts, prepend_mask, remove_hooks

ATTRIBUTE = "prefix_tuning"

_PEFT_DEFAULTS: dict[str, object] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "encoder_hidden_size": None,
    "inference_mode": True,
    "init_weights": None,
    "modules_to_save": None,
    "num_attention_heads": None,
    "num_layers": None,
    "num_transformer_submodules": 1,
    "num_virtual_tokens": None,
    "peft_type": "PREFIX_TUNING",
    "prefix_projection": False,
    "revision": None,
    "task_type": None,
    "token_dim": None,
}


def _cache_class(model: nn.Module) -> type:
    """The KV cache class of `model`'s own KV-cache path (nibblora's KVCache for its models)."""
    from nibblora.models.llama import KVCache, LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM) or not forward_accepts(model, "past_key_values", "attention_mask"):
        raise AdapterError(
            f"prefix tuning: {type(model).__name__} has no KV-cache path nibblora can fill (its "
            "forward must take past_key_values, a nibblora KVCache); prefix tuning needs "
            "nibblora.models.LlamaForCausalLM (load with nibblora.models.load_model)"
        )
    return KVCache


class PrefixTuning(nn.Module):
    """Per-layer key/value prefixes of one model.

    Plain: `embedding.weight` [n, layers * 2 * token_dim] is the prefix (peft's layout: for each virtual token,
    layer 0 keys, layer 0 values, layer 1 keys, ... each kv_heads x head_dim). With `projection_hidden`:
    `embedding.weight` [n, token_dim] goes through `transform` (Linear, tanh, Linear) to that layout.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        projection_hidden: int | None = None,
    ):
        super().__init__()
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        token_dim = kv_heads * head_dim
        self.token_dim = token_dim
        self.projection_hidden = projection_hidden
        if projection_hidden:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, projection_hidden),
                nn.Tanh(),
                nn.Linear(projection_hidden, num_layers * 2 * token_dim),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, num_layers * 2 * token_dim)
            self.transform = None
        self._handles: list = []
        self._cache_cls: type | None = None
        self._max_positions = 0

    def flat(self) -> torch.Tensor:
        """float32 [num_virtual_tokens, num_layers * 2 * token_dim]: what peft saves as prompt_embeddings."""
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, kv_heads, num_virtual_tokens, head_dim] in `dtype`."""
        n, layers = self.num_virtual_tokens, self.num_layers
        kv = self.flat().to(dtype).view(n, 2 * layers, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # [2L, B, H, n, d]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]

    def attach(self, model: nn.Module) -> None:
        self._cache_cls = _cache_class(model)
        self._max_positions = model_sizes(model, "prefix tuning")[5]
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True)]

    def detach(self) -> None:
        remove_hooks(self._handles)

    def _before(self, model: nn.Module, args: tuple, kwargs: dict):
        call = bind_call(model, args, kwargs)
        ids = call["input_ids"]
        batch, seq = ids.shape
        n = self.num_virtual_tokens
        cache = call.get("past_key_values")
        if cache is None:
            cache = self._cache_cls()
            call["past_key_values"] = cache
        past = cache.get_seq_length()
        if past == 0:
            for layer, (k, v) in enumerate(self.key_values(batch, model.dtype)):
                cache.update(layer, k, v)
        else:
            past -= n  # real tokens already cached
        check_context("prefix tuning", n, past, seq, self._max_positions)
        mask = call.get("attention_mask")
        if mask is not None and mask.shape[-1] == past + seq:
            call["attention_mask"] = prepend_mask(mask, n)  # the caller's mask covers the real tokens only
        positions = call.get("position_ids")
        if positions is not None:
            call["position_ids"] = positions + n
        return (), call

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, projection_hidden={self.projection_hidden}"
        )


def inject_prefix_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    *,
    projection_hidden: int | None = None,
    init: str = "random",
    seed: int | None = None,
) -> PrefixTuning:
    """Freeze `model` and give every attention layer `num_virtual_tokens` trainable key/value prefixes.

    projection_hidden: train through the reparameterization MLP of that width (peft's prefix_projection /
    encoder_hidden_size). init: "random" (normal(0, 1) embedding and torch's Linear init, peft's defaults) or
    "zero" (prefix keys and values all zero: keys of zero give every prefix position the same score, so the
    model does NOT start at the base outputs, the prefix takes part of each softmax). Registered as
    `model.prefix_tuning`; its parameters are the only trainable ones. Returns it.
    """
    if hasattr(model, ATTRIBUTE) or hasattr(model, "prompt_tuning"):
        raise AdapterError(
            f"prefix tuning: {type(model).__name__} already carries virtual tokens; call "
            "remove_prefix_tuning (or remove_prompt_tuning) first"
        )
    _cache_class(model)
    _, layers, _, kv_heads, head_dim, max_pos = model_sizes(model, "prefix tuning")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise AdapterError(f"prefix tuning: num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    check_context("prefix tuning", num_virtual_tokens, 0, 1, max_pos)
    if init not in ("random", "zero"):
        raise AdapterError(f"prefix tuning: init must be 'random' or 'zero', got {init!r}")
    if seed is not None:
        torch.manual_seed(seed)
    tuning = PrefixTuning(num_virtual_tokens, layers, kv_heads, head_dim, projection_hidden)
    if init == "zero":
        with torch.no_grad():
            last = tuning.transform[-1] if tuning.transform is not None else None
            if last is not None:
                last.weight.zero_()
                last.bias.zero_()
            else:
                tuning.embedding.weight.zero_()
    freeze(model)
    tuning.to(next(model.parameters()).device)
    model.add_module(ATTRIBUTE, tuning)
    tuning.attach(model)
    return tuning


def remove_prefix_tuning(model: nn.Module) -> PrefixTuning:
    """Take the prefixes off `model` (hook and submodule); returns them."""
    tuning = getattr(model, ATTRIBUTE, None)
    if not isinstance(tuning, PrefixTuning):
        raise AdapterError(f"prefix tuning: {type(model).__name__} has no prefix tuning to remove")
    tuning.detach()
    delattr(model, ATTRIBUTE)
    return tuning


def save_prefix_tuning(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the prefixes in peft's PREFIX_TUNING format: `prompt_embeddings` [n, layers * 2 * token_dim] float32,
    token_dim = kv_heads * head_dim and num_attention_heads = kv_heads (peft's GQA rewrite; the same numbers as
    hidden / heads for multi-head attention). A reparameterized prefix is saved as its MLP's output, with
    prefix_projection false: the file is the plain prefix, which is what peft loads for inference."""
    tuning = getattr(model, ATTRIBUTE, None)
    if not isinstance(tuning, PrefixTuning):
        raise AdapterError(
            f"saving prefix tuning: {type(model).__name__} has no prefix tuning; call inject_prefix_tuning first"
        )
    config = dict(_PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path or model_name_or_path(model),
        task_type=task_type(model),
        num_virtual_tokens=tuning.num_virtual_tokens,
        token_dim=tuning.token_dim,
        num_layers=tuning.num_layers,
        num_attention_heads=tuning.kv_heads,
    )
    with torch.no_grad():
        flat = tuning.flat().float()
    return write_peft_folder(directory, config, {"prompt_embeddings": flat})


def load_prefix_tuning(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> PrefixTuning:
    """Attach the prefixes of a peft PREFIX_TUNING folder to `model` (frozen). num_layers, token_dim and
    num_attention_heads must describe the model's key/value layout (kv_heads x head_dim per layer). Raises
    AdapterError naming the file and what disagrees."""
    directory = Path(directory)
    config, files = read_method_files(directory)
    expect_peft_type(config, "PREFIX_TUNING", directory)
    _cache_class(model)
    _, layers, heads, kv_heads, head_dim, _ = model_sizes(model, "loading prefix tuning")
    where = f"loading adapter: {files.weights_path}"
    token_dim = kv_heads * head_dim
    if config.num_layers not in (None, layers):
        raise AdapterError(
            f"{where}: num_layers {config.num_layers} in {CONFIG_NAME} is not the model's "
            f"{layers} layers; is this adapter for another model?"
        )
    if config.token_dim not in (None, token_dim) or config.num_attention_heads not in (None, kv_heads):
        raise AdapterError(
            f"{where}: token_dim {config.token_dim} / num_attention_heads {config.num_attention_heads} "
            f"in {CONFIG_NAME} do not describe the model's keys and values ({kv_heads} key/value heads "
            f"x head_dim {head_dim} = {token_dim}; {heads} query heads). peft before 0.13 wrote the "
            "query layout for grouped-query models; re-train or re-save the prefix with a newer peft"
        )
    if set(files.tensors) != {"prompt_embeddings"}:
        raise AdapterError(
            f"{where}: holds {sorted(files.tensors)[:4]}; a prefix-tuning adapter holds exactly one "
            "tensor, 'prompt_embeddings'"
        )
    shape = (config.num_virtual_tokens, layers * 2 * token_dim)
    got = files.tensors["prompt_embeddings"].shape
    if got != shape:
        raise AdapterError(
            f"{where}: 'prompt_embeddings' has shape {list(got)}, expected {list(shape)} "
            f"(num_virtual_tokens x num_layers {layers} x 2 x token_dim {token_dim})"
        )
    tuning = inject_prefix_tuning(model, config.num_virtual_tokens)
    with torch.no_grad():
        tuning.embedding.weight.copy_(files.read("prompt_embeddings"))
    tuning.requires_grad_(trainable)  # frozen unless training continues
    return tuning
