"""Text generation with a KV cache: greedy decoding or sampling (temperature, top-k, top-p).

    out = generate(model, input_ids, max_new_tokens=32)                                  # greedy
    out = generate(model, input_ids, max_new_tokens=32, do_sample=True, temperature=0.7,
                   top_p=0.9, seed=0)                                                    # reproducible sampling

The prompt is run once (prefill) to fill the cache; then each step feeds only the newest token. Batches may be
left-padded: pass the attention_mask and positions are counted from each row's first real token. The filters
follow transformers' logits warpers in the same order (temperature, top-k, top-p), so greedy output matches
`transformers.generate` token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nibblora.models.llama import KVCache, LlamaForCausalLM


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Scale and mask next-token logits [batch, vocab] for sampling; removed tokens get -inf."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth_best = torch.topk(logits, k).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Drop the least likely tokens whose probabilities together stay within 1 - top_p; always keep the best one.
        sorted_logits, sorted_index = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _eos_ids(model: LlamaForCausalLM, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend each prompt by up to `max_new_tokens` tokens.

    input_ids: int64 [batch, prompt_len]; attention_mask: [batch, prompt_len], 0 on (left) padding.
    do_sample: False picks the most likely token (greedy); True samples from the filtered distribution
        (`temperature` > 0, `top_k` tokens, nucleus `top_p`).
    eos_token_id: one id or several; None uses the model config's; [] never stops early. A row that has emitted
        one is finished: its later positions hold `pad_token_id` (default: config pad, else the first EOS id, else 0).
        Generation stops when every row is finished.
    seed / generator: make sampling reproducible (a torch.Generator on the model's device, or a seed for one).
    Returns int64 [batch, prompt_len + generated] (prompt included; generated <= max_new_tokens).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
    device = model.device
    input_ids = input_ids.to(device)
    eos = torch.tensor(_eos_ids(model, eos_token_id), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    if do_sample and generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()

    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    # Each row's positions start at its first real token, so left padding does not shift RoPE.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    cache = KVCache()
    sequences = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    step_ids, step_positions = input_ids, positions
    try:
        for _ in range(max_new_tokens):
            logits = model(
                step_ids,
                attention_mask=mask if attention_mask is not None else None,
                position_ids=step_positions,
                past_key_values=cache,
                logits_to_keep=1,
            )[:, -1, :].float()
            if do_sample:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                next_token = logits.argmax(dim=-1)
            emitted = torch.where(unfinished, next_token, torch.full_like(next_token, pad_token_id))
            sequences = torch.cat((sequences, emitted[:, None]), dim=-1)
            if eos.numel():
                unfinished &= ~torch.isin(emitted, eos)
                if not bool(unfinished.any()):
                    break
            # Finished rows keep decoding (their output is discarded); feeding the predicted token rather than the
            # pad keeps the input a valid id whatever pad_token_id is.
            step_ids = next_token[:, None]
            step_positions = step_positions[:, -1:] + 1
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=-1)
    finally:
        model.train(was_training)
    return sequences
