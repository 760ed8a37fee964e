"""One forward pass over a step's flat batch: tokens of many sequences (prefill chunks and single decode tokens),
each with its own adapter, attending to their own blocks of the paged KV cache.

The decoder's own modules do the work (embeddings, norms, projections, MLP, lm_head of nibblora.models.llama);
only the attention's cache reads and writes are done here, because the model's KVCache is one dense tensor per
batch while the server needs blocks per sequence. The numerics follow LlamaModel op for op (same RoPE, same
SDPA scale and GQA sharing), which is what lets a batched request equal the same request run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nibblora.models.llama import Attention, LlamaForCausalLM, apply_rotary, build_attention_mask
from nibblora.serve.kv_cache import PagedKVCache
from nibblora.serve.lora_ops import LoRABatch, LoRAContext


@dataclass
class BatchItem:
    """One sequence's share of a step: `token_ids` at positions start, start+1, ... with its adapter slot."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    slot: int  # -1: base model only
    need_logits: bool


class ModelRunner:
    """Runs a LlamaForCausalLM (whose adaptable linears are BatchedLoRALinear) over BatchItems."""

    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, context: LoRAContext) -> None:
        self.model, self.cache, self.context = model, cache, context
        self.device = model.device

    def build_lora_batch(self, items: list[BatchItem]) -> LoRABatch:
        """Segments of consecutive tokens with the same adapter (items are sorted by slot by the scheduler)."""
        segments: list[tuple[int, int, int]] = []
        token_slots: list[int] = []
        pos = 0
        for item in items:
            n = len(item.token_ids)
            token_slots.extend([item.slot] * n)
            if item.slot >= 0:
                if segments and segments[-1][2] == item.slot and segments[-1][1] == pos:
                    segments[-1] = (segments[-1][0], pos + n, item.slot)
                else:
                    segments.append((pos, pos + n, item.slot))
            pos += n
        return LoRABatch(segments, torch.tensor(token_slots, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def forward(self, items: list[BatchItem], lora_batch: LoRABatch) -> torch.Tensor:
        """Float32 logits [rows, vocab], one row per item with need_logits, in item order."""
        device = self.device
        bs = self.cache.block_size
        ids, positions, slot_mapping = [], [], []
        for item in items:
            n = len(item.token_ids)
            ids.extend(item.token_ids)
            pos = range(item.start, item.start + n)
            positions.extend(pos)
            slot_mapping.extend(item.block_table[p // bs] * bs + p % bs for p in pos)
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)[None]
        position_ids = torch.tensor(positions, dtype=torch.long, device=device)[None]
        slots = torch.tensor(slot_mapping, dtype=torch.long, device=device)
        attention = _AttentionPlan(items, device)

        inner = self.model.model
        x = inner.embed_tokens(input_ids)  # [1, T, hidden]
        cos, sin = inner.rotary_emb(x, position_ids)
        self.context.batch = lora_batch
        try:
            for index, layer in enumerate(inner.layers):
                h = self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, index, slots, attention)
                x = x + h
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            x = inner.norm(x)
            last = torch.tensor(attention.logit_rows, dtype=torch.long, device=device)
            return self.model.lm_head(x[0, last]).float()  # lm_head is never adapted
        finally:
            self.context.batch = None

    def _attention(
        self,
        attn: Attention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        slot_mapping: torch.Tensor,
        plan: _AttentionPlan,
    ) -> torch.Tensor:
        """Self-attention of the flat tokens x [1, T, hidden] against each sequence's cached history."""
        T = x.shape[1]
        heads, kv_heads, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = attn.q_proj(x).view(1, T, heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, kv_heads, d).transpose(1, 2)
        v = attn.v_proj(x).view(1, T, kv_heads, d).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Keys are cached after RoPE, as in the model's own KVCache.
        self.cache.write(layer, slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
        out = torch.empty(T, heads, d, dtype=q.dtype, device=q.device)
        gqa = kv_heads != heads
        window = attn.sliding_window
        if plan.decode_rows:
            # Every single-token row at once: gather each row's blocks, mask the keys past its length.
            rows = plan.decode_token_index
            keys, values = self.cache.gather(layer, plan.decode_tables)
            key_index = torch.arange(keys.shape[2], device=q.device)[None, :]
            lengths = plan.decode_lengths[:, None]
            allowed = key_index < lengths
            if window is not None:
                allowed = allowed & (key_index > lengths - 1 - window)
            qd = q[0, :, rows].transpose(0, 1)[:, :, None]  # [rows, heads, 1, d]
            o = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=allowed[:, None, None, :], scale=d**-0.5, enable_gqa=gqa
            )
            out[rows] = o[:, :, 0]
        for start, end, item in plan.prefill_items:
            n = end - start
            context = item.start + n
            table = torch.tensor(item.block_table, dtype=torch.long, device=q.device)[None]
            keys, values = self.cache.gather(layer, table)
            keys, values = keys[:, :, :context], values[:, :, :context]
            mask = build_attention_mask(None, n, item.start, window, q.device)
            o = F.scaled_dot_product_attention(
                q[:, :, start:end],
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None and n > 1,
                scale=d**-0.5,
                enable_gqa=gqa,
            )
            out[start:end] = o[0].transpose(0, 1)
        return attn.o_proj(out.view(1, T, heads * d))


class _AttentionPlan:
    """Where each item's tokens sit in the flat batch, split into batched decode rows and per-item prefills."""

    def __init__(self, items: list[BatchItem], device: torch.device) -> None:
        self.prefill_items: list[tuple[int, int, BatchItem]] = []
        self.logit_rows: list[int] = []
        decode_rows, tables, lengths = [], [], []
        pos = 0
        for item in items:
            n = len(item.token_ids)
            if n == 1:
                decode_rows.append(pos)
                tables.append(item.block_table)
                lengths.append(item.start + 1)
            else:
                self.prefill_items.append((pos, pos + n, item))
            if item.need_logits:
                self.logit_rows.append(pos + n - 1)
            pos += n
        self.decode_rows = decode_rows
        if decode_rows:
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]  # block 0 as filler: masked out by length
            self.decode_tables = torch.tensor(padded, dtype=torch.long, device=device)
            self.decode_lengths = torch.tensor(lengths, dtype=torch.long, device=device)
            self.decode_token_index = torch.tensor(decode_rows, dtype=torch.long, device=device)
