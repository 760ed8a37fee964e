"""Prompt tuning (Lester et al. 2021): trainable virtual-token embeddings prepended to every input.

    tuning = inject_prompt_tuning(model, num_virtual_tokens=8, init="text", init_token_ids=tok("Classify:"))
    save_prompt_tuning(model, "out/prompt")       # peft's PROMPT_TUNING format: one tensor, prompt_embeddings
    load_prompt_tuning(model, "out/prompt")       # reads peft's adapters too

On a fresh forward (no cache, or an empty one) the input gets num_virtual_tokens placeholder ids in front, whose
embeddings a hook on the input embedding replaces by the trained ones; the attention mask gets ones, labels get
-100 and position ids are shifted past the virtual tokens (peft's positions: 0 .. n_virtual + seq - 1). The
returned logits cover the real tokens only ([batch, seq, vocab], the virtual positions are dropped); with a KV
cache the virtual tokens stay in the cache, so generation works unchanged. Works on nibblora's
LlamaForCausalLM (any model whose forward takes input_ids, attention_mask, position_ids, past_key_values, labels
and that has `get_input_embeddings()` or `.model.embed_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

INITS = ("random", "sample_vocab", "text")
IGNORE_INDEX = -100
ATTRIBUTE = "prompt_tuning"  # the submodule name the tuning is registered under on the model

_PEFT_DEFAULTS: dict[str, object] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "modules_to_save": None,
    "num_attention_heads": None,
    "num_layers": None,
    "num_transformer_submodules": 1,
    "num_virtual_tokens": None,
    "peft_type": "PROMPT_TUNING",
    "prompt_tuning_init": "RANDOM",
    "prompt_tuning_init_text": None,
    "revision": None,
    "task_type": None,
    "token_dim": None,
    "tokenizer_kwargs": None,
    "tokenizer_name_or_path": None,
}


def input_embedding(model: nn.Module) -> nn.Embedding:
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(emb, nn.Embedding):
        raise AdapterError(
            f"prompt tuning: {type(model).__name__} has no input embedding (get_input_embeddings() "
            "or .model.embed_tokens); use a causal LM such as nibblora.models.LlamaForCausalLM"
        )
    return emb


class PromptTuning(nn.Module):
    """The virtual tokens of one model: `embedding.weight` [num_virtual_tokens, hidden] (peft's
    prompt_encoder.embedding), and the hooks that put them in front of every fresh input."""

    def __init__(
        self,
        num_virtual_tokens: int,
        hidden: int,
        init_text: str | None = None,
        init: str = "random",
        tokenizer_name_or_path: str | None = None,
    ):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, hidden)
        self.init, self.init_text, self.tokenizer_name_or_path = init, init_text, tokenizer_name_or_path
        self._handles: list = []
        self._pending = False
        self._fresh = False
        self._max_positions = 0

    def prompts(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """[batch, num_virtual_tokens, hidden] in `dtype`."""
        return self.embedding.weight.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def attach(self, model: nn.Module) -> None:
        if not forward_accepts(model, "input_ids", "attention_mask", "position_ids", "past_key_values", "labels"):
            raise AdapterError(
                f"prompt tuning: {type(model).__name__}.forward does not take input_ids, "
                "attention_mask, position_ids, past_key_values and labels; use nibblora's "
                "LlamaForCausalLM"
            )
        self._max_positions = model_sizes(model, "prompt tuning")[5]
        emb = input_embedding(model)
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            emb.register_forward_hook(self._embedded),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def detach(self) -> None:
        remove_hooks(self._handles)

    def _before(self, model: nn.Module, args: tuple, kwargs: dict):
        call = bind_call(model, args, kwargs)
        ids = call["input_ids"]
        n = self.num_virtual_tokens
        cache = call.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        fresh = past == 0
        # A cache already holds the virtual tokens (past counts them): the real tokens so far are past - n.
        check_context("prompt tuning", n, past - n if past else 0, ids.shape[1], self._max_positions)
        positions = call.get("position_ids")
        if fresh:
            call["input_ids"] = torch.cat((ids.new_zeros(ids.shape[0], n), ids), dim=1)
            self._pending = True
            if positions is not None:
                head = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(ids.shape[0], -1)
                call["position_ids"] = torch.cat((head, positions + n), dim=1)
            labels = call.get("labels")
            if labels is not None:
                call["labels"] = torch.cat((labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels), dim=1)
                call["loss_rows"] = None  # computed for the unprefixed labels
        elif positions is not None:
            call["position_ids"] = positions + n
        mask = call.get("attention_mask")
        if mask is not None and mask.shape[-1] == past - (0 if fresh else n) + ids.shape[1]:
            call["attention_mask"] = prepend_mask(mask, n)  # the caller's mask covers the real tokens only
        self._fresh = fresh
        return (), call

    def _embedded(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not self._pending:
            return None
        self._pending = False
        n = self.num_virtual_tokens
        return torch.cat((self.prompts(out.shape[0], out.dtype), out[:, n:]), dim=1)

    def _after(self, model: nn.Module, args: tuple, kwargs: dict, out):
        self._pending = False
        n = self.num_virtual_tokens
        if not self._fresh or kwargs.get("labels") is not None:
            return None
        logits = out[0] if isinstance(out, tuple) else out
        if logits.shape[1] != kwargs["input_ids"].shape[1]:
            return None  # logits_to_keep asked for the last positions only: no virtual position is among them
        logits = logits[:, n:]
        return (logits, *out[1:]) if isinstance(out, tuple) else logits

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, hidden={self.embedding.embedding_dim}"


def _check_fresh(model: nn.Module) -> None:
    if hasattr(model, ATTRIBUTE) or hasattr(model, "prefix_tuning"):
        raise AdapterError(
            f"prompt tuning: {type(model).__name__} already carries virtual tokens; call "
            "remove_prompt_tuning (or remove_prefix_tuning) first"
        )


def inject_prompt_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    *,
    init: str = "random",
    init_token_ids: Sequence[int] | None = None,
    init_text: str | None = None,
    tokenizer_name_or_path: str | None = None,
    seed: int | None = None,
) -> PromptTuning:
    """Freeze `model` and prepend `num_virtual_tokens` trainable embeddings to every fresh input.

    init: "random" (normal(0, 1), peft's nn.Embedding default), "sample_vocab" (rows of the input embedding at
    random token ids) or "text" (the embeddings of `init_token_ids`, the tokenized `init_text`, repeated and cut
    to num_virtual_tokens as peft does; init_text and tokenizer_name_or_path are only recorded in the saved
    config, which says RANDOM unless both are given, as peft requires). The tuning is registered as
    `model.prompt_tuning`, so it follows `.to()` and its `embedding.weight` is the only trainable parameter.
    Returns it.
    """
    _check_fresh(model)
    hidden, _, _, _, _, max_pos = model_sizes(model, "prompt tuning")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise AdapterError(f"prompt tuning: num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    check_context("prompt tuning", num_virtual_tokens, 0, 1, max_pos)
    if init not in INITS:
        raise AdapterError(f"prompt tuning: init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    emb = input_embedding(model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tuning = PromptTuning(
        num_virtual_tokens, hidden, init_text=init_text, init=init, tokenizer_name_or_path=tokenizer_name_or_path
    )
    with torch.no_grad():
        if init == "random":
            tuning.embedding.weight.normal_(0.0, 1.0, generator=generator)
        elif init == "sample_vocab":
            ids = torch.randint(0, emb.num_embeddings, (num_virtual_tokens,), generator=generator)
            tuning.embedding.weight.copy_(emb.weight[ids.to(emb.weight.device)].float())
        else:
            ids = list(init_token_ids or [])
            if not ids:
                raise AdapterError("prompt tuning: init='text' needs init_token_ids (the tokenized init text)")
            bad = [i for i in ids if not 0 <= int(i) < emb.num_embeddings]
            if bad:
                raise AdapterError(
                    f"prompt tuning: init_token_ids holds {bad[:5]}, outside the vocabulary of "
                    f"{emb.num_embeddings} tokens"
                )
            ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
            tuning.embedding.weight.copy_(emb.weight[torch.tensor(ids, device=emb.weight.device)].float())
    freeze(model)
    tuning.to(emb.weight.device)
    model.add_module(ATTRIBUTE, tuning)
    tuning.attach(model)
    return tuning


def remove_prompt_tuning(model: nn.Module) -> PromptTuning:
    """Take the virtual tokens off `model` (hooks and submodule); returns them."""
    tuning = getattr(model, ATTRIBUTE, None)
    if not isinstance(tuning, PromptTuning):
        raise AdapterError(f"prompt tuning: {type(model).__name__} has no prompt tuning to remove")
    tuning.detach()
    delattr(model, ATTRIBUTE)
    return tuning


def save_prompt_tuning(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the virtual tokens in peft's PROMPT_TUNING format: `prompt_embeddings` [num_virtual_tokens, hidden]."""
    tuning = getattr(model, ATTRIBUTE, None)
    if not isinstance(tuning, PromptTuning):
        raise AdapterError(
            f"saving prompt tuning: {type(model).__name__} has no prompt tuning; call inject_prompt_tuning first"
        )
    _, layers, heads, _, _, _ = model_sizes(model, "saving prompt tuning")
    # peft refuses a TEXT init without its text and tokenizer; the init only matters before training (the saved
    # tensor replaces it), so without them the file says RANDOM.
    text_known = tuning.init == "text" and tuning.init_text and tuning.tokenizer_name_or_path
    init = tuning.init if tuning.init != "text" or text_known else "random"
    text = tuning.init_text if init == "text" else None
    config = dict(_PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path or model_name_or_path(model),
        task_type=task_type(model),
        num_virtual_tokens=tuning.num_virtual_tokens,
        token_dim=tuning.embedding.embedding_dim,
        num_layers=layers,
        num_attention_heads=heads,
        prompt_tuning_init=init.upper(),
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tuning.tokenizer_name_or_path if init == "text" else None,
    )
    return write_peft_folder(directory, config, {"prompt_embeddings": tuning.embedding.weight})


def load_prompt_tuning(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> PromptTuning:
    """Attach the virtual tokens of a peft PROMPT_TUNING folder to `model` (frozen). The folder's only tensor is
    `prompt_embeddings` [num_virtual_tokens, hidden]. Raises AdapterError naming the file and what disagrees."""
    directory = Path(directory)
    config, files = read_method_files(directory)
    expect_peft_type(config, "PROMPT_TUNING", directory)
    hidden = model_sizes(model, "loading prompt tuning")[0]
    where = f"loading adapter: {files.weights_path}"
    if set(files.tensors) != {"prompt_embeddings"}:
        raise AdapterError(
            f"{where}: holds {sorted(files.tensors)[:4]}; a prompt-tuning adapter holds exactly one "
            "tensor, 'prompt_embeddings'"
        )
    if config.token_dim not in (None, hidden):
        raise AdapterError(
            f"{where}: token_dim {config.token_dim} in {CONFIG_NAME} is not the model's hidden size "
            f"{hidden}; is this adapter for another model?"
        )
    shape = (config.num_virtual_tokens, hidden)
    if files.tensors["prompt_embeddings"].shape != shape:
        raise AdapterError(
            f"{where}: 'prompt_embeddings' has shape {list(files.tensors['prompt_embeddings'].shape)}, "
            f"expected {list(shape)} (num_virtual_tokens x the model's hidden size)"
        )
    tuning = inject_prompt_tuning(model, config.num_virtual_tokens)
    tuning.init, tuning.init_text = config.prompt_tuning_init.lower(), config.prompt_tuning_init_text
    tuning.tokenizer_name_or_path = config.raw.get("tokenizer_name_or_path")
    with torch.no_grad():
        tuning.embedding.weight.copy_(files.read("prompt_embeddings"))
    tuning.requires_grad_(trainable)  # frozen unless training continues
    return tuning
