"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) in one file you can read top to bottom.

    x = embed_tokens(input_ids)                              # [batch, seq, hidden]
    for each layer:
        x = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(...)), v_proj(...)))
        x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))
    logits = lm_head(norm(x))                                # [batch, seq, vocab]

Module names mirror transformers' LlamaForCausalLM (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`,
...), so a Hugging Face state dict loads key for key and PEFT adapter keys
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) find their module. The numerics follow
transformers op for op (RMSNorm in float32, RoPE cos/sin in float32 cast to the activation dtype), which is what
lets the parity tests hold at float32 tolerance.

Generation lives here too, at the end (`generate(model, input_ids, ...)`, also `model.generate(...)`), as in
nanoGPT: greedy or sampled decoding with a KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from nibblora.lora.group import outputs_unused, project_group, swiglu_mlp
from nibblora.models.config import ModelConfig
from nibblora.models.loss import (
    IGNORE_INDEX,
    TokenScores,
    exact_rows,
    linear_cross_entropy,
    logits_scores,
    score_tokens,
    shift_labels,
)
from nibblora.models.offload import NO_OFFLOAD, ActivationOffloader

# Tokens per chunk of the fused lm_head + cross-entropy: None sizes it per batch (models/loss_chunks.py), 0 takes
# the plain path through full logits.
DEFAULT_LOSS_CHUNK_TOKENS: int | None = None


class RMSNorm(nn.Module):
    """x / rms(x) * weight. The mean of squares is taken in float32 so bf16/fp16 activations do not overflow."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and (x.dtype == torch.float32 or x.is_cuda):
            # PyTorch's rms_norm: the same bits as below in float32 (tested); on CUDA one fused kernel that keeps only
            # the input and the reciprocal rms for backward (bf16 results may differ from transformers in the last bit:
            # the weight multiply is done before rounding, not after).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight multiply, as transformers does, so results match in half precision too.
        return self.weight * x.to(input_dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """float32 [head_dim // 2]: the rotation speed of each pair of channels, after any frequency scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        # Position interpolation: every position is squeezed by `factor`.
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths (low frequencies) are stretched by `factor` to reach a longer context,
        # short ones (which encode local order) are kept, and the band in between is blended smoothly.
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos and sin of position * frequency, [batch, seq, head_dim], for the rotary position embedding.

    The frequencies are a plain float32 attribute, not a buffer: `model.to(torch.bfloat16)` must not round them,
    and a model built on the meta device still has real ones. They follow the positions' device on first use.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.inv_freq = rope_inverse_frequencies(config)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        # Angles in float32: positions in the tens of thousands lose whole radians in bf16.
        freqs = position_ids[..., None].float() * self.inv_freq  # [batch, seq, head_dim // 2]
        # Llama rotates channel i with channel i + head_dim/2 (not neighbours), hence the duplicated halves.
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by the angles in cos/sin [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# The attention kernel, chosen explicitly on CUDA: cuDNN's fused attention first (the fastest on Hopper), then flash,
# then memory-efficient; the math kernel last (it materializes [heads, seq, seq] scores). SDPA skips each one that
# cannot take the call (an explicit mask, fp32, a head size) and tries the next. On a CPU PyTorch's own choice stays:
# its flash kernel for causal or masked calls keeps only the log-sum-exp for backward, where math would keep the
# whole [heads, seq, seq] probabilities (measured: forcing math costs memory and time there).
CUDA_ATTENTION_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention with the backend order above on CUDA (same arguments)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(CUDA_ATTENTION_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class KVCache:
    """Keys and values of every layer seen so far, each [batch, kv_heads, seq, head_dim], grown by concatenation.

    Pass one to `model(..., past_key_values=cache)`; each forward appends the new tokens' keys and values.
    The whole history is kept (a sliding window is applied by the attention mask, not by dropping entries).
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's key/value for `layer_idx` and return the full history of that layer."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_len: int,
    past_len: int,
    sliding_window: int | None,
    device: torch.device,
    documents: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """bool [batch or 1, 1, query_len, past_len + query_len], True where a query may look at a key.

    Returns None when plain causal attention is exact (no padding, no cache, no window reached, one document per
    row): then SDPA runs with is_causal=True, which lets it pick its fastest kernel.

    Key j is visible to query i (at absolute index past_len + i) when it is not in the future, not padding
    (attention_mask[b, j] == 1), with a sliding window w closer than w: (past_len + i) - j < w, and, given
    `documents` (int64 [batch, query_len] document ids of packed rows, no cache), in the query's document.
    Without `documents`, positions are sequence indices, not position_ids, so packed sequences attend causally
    across the row (what transformers' SDPA path does).
    """
    kv_len = past_len + query_len
    window_reached = sliding_window is not None and kv_len > sliding_window
    if attention_mask is None and past_len == 0 and not window_reached and documents is None:
        return None
    query_index = torch.arange(past_len, kv_len, device=device)[:, None]
    key_index = torch.arange(kv_len, device=device)[None, :]
    allowed = key_index <= query_index
    if sliding_window is not None:
        allowed = allowed & (key_index > query_index - sliding_window)
    allowed = allowed[None, None]
    if documents is not None:
        allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, but cache + input hold {kv_len}: "
                "pass the mask of the whole sequence so far"
            )
        allowed = allowed & attention_mask[:, None, None, :].bool()
        # A left-padding query sees no key at all; an empty softmax row would be NaN and poison the batch
        # through the backward pass. Let such rows attend everywhere: their outputs are padding, never used.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int64 [batch, seq]: which packed document each token belongs to, counted from 0 per row. A document starts
    wherever the position does not continue the previous token's (position_ids restart per document)."""
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return torch.cat([torch.zeros_like(position_ids[:, :1]), starts.long().cumsum(dim=1)], dim=1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as SDPA's additive float mask (0 where allowed, the dtype's lowest value elsewhere). Built once
    per forward: SDPA saves a float mask for backward as it is (the same storage for every layer), where a bool
    mask would be converted, and kept, once per layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class Attention(nn.Module):
    """Grouped-query self-attention: num_attention_heads query heads share num_key_value_heads key/value heads."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.sliding_window = config.sliding_window if config.layer_uses_sliding_window[layer_idx] else None
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # One fused call when q, k and v are frozen-base (LoRA) projections (x saved once); else module by module.
        q, k, v = project_group(x, (self.q_proj, self.k_proj, self.v_proj))
        # [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim], the layout SDPA expects.
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            # Keys are cached after RoPE, so earlier tokens never need re-rotating.
            k, v = cache.update(self.layer_idx, k, v)
        # enable_gqa lets SDPA share each key/value head across its query group without copying it.
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and seq > 1,
            scale=self.head_dim**-0.5,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Frozen-base (LoRA) projections: one function that keeps gate(x) and up(x) and recomputes their product.
        return swiglu_mlp(x, self.gate_proj, self.up_proj, self.down_proj)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP, each added back onto the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        return self.mlp_block(self.attention_block(x, cos, sin, mask, cache))

    def attention_block(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        """x + attention(norm(x)): the first half of the layer."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(norm(x)): the second half, two thirds of a Llama layer's matmul FLOPs."""
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the output head (transformers' `LlamaModel`, found at `.model`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # padding_idx only keeps the pad row's gradient at zero; some configs name a pad id outside the vocabulary.
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # Selective checkpointing: with gradient_checkpointing, the first this-many layers (-1: all) recompute only
        # their attention half in backward and keep their MLP's activations: a third of the recompute FLOPs for
        # tokens x (2 x intermediate + ...) saved elements per such layer.
        self.keep_mlp_layers = 0
        # Packed rows (position_ids given, restarting per document; no cache, no attention mask): each token
        # attends only within its own document. Off by default, as in transformers' SDPA path; the trainer turns it
        # on (data.packed_attention = "document").
        self.separate_documents = False
        # Activation offloading (models/offload.py): with gradient_checkpointing, each layer's checkpointed input
        # waits in host memory until its backward; the offloader keeps the host buffer pool across steps.
        self.offload_activations = False
        self.activation_offloader = ActivationOffloader()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states [batch, seq, hidden] (after the last norm)."""
        x = self.embed_tokens(input_ids)
        batch, seq = input_ids.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        documents = None
        if self.separate_documents and position_ids is not None and cache is None and attention_mask is None:
            documents = document_ids(position_ids)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=x.device).unsqueeze(0).expand(batch, -1)
        cos, sin = self.rotary_emb(x, position_ids)
        # One mask per distinct window (full attention, and the sliding window if any layer uses it).
        masks = {
            window: build_attention_mask(attention_mask, seq, past_len, window, x.device, documents)
            for window in {layer.self_attn.sliding_window for layer in self.layers}
        }
        if documents is not None:
            masks = {window: additive_mask(mask, x.dtype) for window, mask in masks.items()}
        # Recomputing a layer in backward must not append to the cache twice, so checkpointing skips cached runs.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        keep_mlp = len(self.layers) if self.keep_mlp_layers < 0 else self.keep_mlp_layers
        # The last layer is never recomputed: its backward is the first to run, right after the loss, so it would be
        # rebuilt at once. Keeping its activations costs memory only while the loss runs, next to one chunk of logits;
        # the backward of any recomputed layer holds as much.
        last = len(self.layers) - 1
        # Activation offloading: `offload.layer_input(x, i)` around a checkpoint call moves the input it saves to
        # host memory until backward (every checkpointed layer; models/offload.py).
        offload = NO_OFFLOAD
        if recompute and self.offload_activations:
            offload = self.activation_offloader.forward_pass(len(self.layers))
        for i, layer in enumerate(self.layers):
            mask = masks[layer.self_attn.sliding_window]
            if i == last:
                x = layer(x, cos, sin, mask, cache)
                offload.last_layer_output(x)
            elif recompute and i < keep_mlp:
                # Selective: recompute the attention half, keep what the MLP saves (its matmuls are not redone).
                with offload.layer_input(x, i):
                    x = checkpoint(layer.attention_block, x, cos, sin, mask, None, use_reentrant=False)
                x = layer.mlp_block(x)
            elif recompute:
                # Keep only each layer's input; its activations are recomputed in backward. use_reentrant=False
                # so gradients reach parameters even when the input (frozen embeddings) needs no grad.
                with offload.layer_input(x, i):
                    x = checkpoint(_first_call_output(layer), x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def _first_call_output(layer: nn.Module):
    """`layer` for non-reentrant checkpointing: the first call is the forward pass; the second, the recomputation in
    backward, only rebuilds what the layer's functions save (checkpoint drops its output), so it runs under
    `outputs_unused` and the MLP skips the down projection's matmul."""
    calls = 0

    def run(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            return layer(*args)
        with outputs_unused():
            return layer(*args)

    return run


class LlamaForCausalLM(nn.Module):
    """Decoder + lm_head. `model(input_ids)` -> logits [batch, seq, vocab] in the model's dtype.

    Build from a ModelConfig (random init), or load a Hugging Face checkpoint with `nibblora.models.load_model`.
    """

    def __init__(self, config: ModelConfig, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()
        if not self.lm_head.weight.is_meta:
            self.init_weights()
        self.model.gradient_checkpointing = gradient_checkpointing
        # Tokens per chunk of the fused lm_head + cross-entropy when forward gets labels (None: sized per batch;
        # 0: plain full logits).
        self.loss_chunk_tokens = DEFAULT_LOSS_CHUNK_TOKENS

    def tie_weights(self) -> None:
        """Share one matrix between the input embedding and the output head (tie_word_embeddings)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' init: normal(0, initializer_range) for linears and embeddings, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in backward instead of storing its activations (training mode only)."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        loss_rows: torch.Tensor | None = None,
        score: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache] | tuple[torch.Tensor, int] | TokenScores:
        """Next-token logits, or with `labels` the training loss.

        input_ids: int64 [batch, seq].
        attention_mask: [batch, past + seq], 1 for real tokens and 0 for padding; covers the cached tokens too.
        position_ids: int64 [batch, seq] RoPE positions; default past, past+1, ... (restart them per packed document).
        past_key_values: a KVCache, extended in place with this call's keys and values.
        use_cache: return (logits, cache) instead of logits, creating a cache when none was passed.
        logits_to_keep: if > 0, compute logits for the last that many positions only (saves memory in generation).
        labels: int64 [batch, seq], -100 where the loss must not look. Instead of logits, return (sum of the
            next-token cross-entropy over supervised positions as a float32 scalar, their number), computed in
            chunks by `linear_cross_entropy` (no [tokens, vocab] logits kept for backward) while the lm_head is a
            plain nn.Linear and `loss_chunk_tokens` is not 0 (None: sized per batch by `loss_chunk_tokens`),
            else from full logits.
        loss_rows: `supervised_rows(shift_labels(labels))` computed ahead on the CPU (spares CUDA a host sync).
        score: with labels, evaluate instead (no autograd): return TokenScores (the loss sum, the supervised token
            count, and per sequence whether every supervised token was the greedy choice).
        Returns logits [batch, seq (or logits_to_keep), vocab].
        """
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values)
        if labels is not None and score:
            return self._scores(hidden, labels, loss_rows)
        if labels is not None:
            return self._loss_sum(hidden, labels, loss_rows)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if use_cache:
            return logits, past_key_values
        return logits

    def _loss_sum(
        self, hidden: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        targets = shift_labels(labels)
        if self.loss_chunk_tokens != 0 and type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(
                hidden, self.lm_head.weight, targets, rows=rows, chunk_tokens=self.loss_chunk_tokens
            )
        logits = self.lm_head(hidden).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int((targets != IGNORE_INDEX).sum())

    @torch.no_grad()
    def _scores(self, hidden: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None) -> TokenScores:
        targets = shift_labels(labels)
        if self.loss_chunk_tokens != 0 and type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            loss, rows, hits = score_tokens(
                hidden, self.lm_head.weight, targets, rows=rows, chunk_tokens=self.loss_chunk_tokens
            )
        else:
            loss, rows, hits = logits_scores(self.lm_head(hidden), targets)
        exact, scored = exact_rows(rows, hits, *targets.shape)
        return TokenScores(loss, rows.shape[0], exact, scored)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """`generate(self, input_ids, **kwargs)`: see the function below."""
        return generate(self, input_ids, **kwargs)


# Text generation with a KV cache: greedy decoding or sampling (temperature, top-k, top-p).
#
#     out = generate(model, input_ids, max_new_tokens=32)                                  # greedy
#     out = generate(model, input_ids, max_new_tokens=32, do_sample=True, temperature=0.7,
#                    top_p=0.9, seed=0)                                                    # reproducible sampling
#
# The prompt is run once (prefill) to fill the cache; then each step feeds only the newest token. Batches may be
# left-padded: pass the attention_mask and positions are counted from each row's first real token. The filters
# follow transformers' logits warpers in the same order (temperature, top-k, top-p), so greedy output matches
# `transformers.generate` token for token.


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
