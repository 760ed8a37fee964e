"""How many tokens one chunk of the fused lm_head + cross-entropy takes (torch-free: the memory estimate uses it).

A chunk's float32 logits, [tokens, vocab] x 4 bytes, are the largest tensor of the loss. Liger-Kernel's rule sizes
the chunk so that they are no larger than the float32 hidden states of all the tokens the loss scores: the next
power of two of tokens / ceil(vocab / hidden). The loss then never needs more memory than one more copy of the
hidden states, whatever the batch, and a large batch still gets large matmuls (8192 tokens at hidden 4096 and a
128k vocabulary: chunks of 256).

A chunk is never smaller than MIN_CHUNK_TOKENS (or all the tokens, if fewer): each chunk reads the whole lm_head
twice (logits, then the hidden states' gradient), and with few rows those matmuls run at the speed of memory, not
of arithmetic. Measured on a CPU (bench/bench_loss.py, 512 tokens, hidden 2048, vocabulary 32,000, float32): chunks
of 32 tokens took 2.1x the time of the plain full-logits loss, chunks of 256 1.15x. The floor costs at most
256 x vocab x 4 bytes of logits (131 MB at a 128k vocabulary) where the rule alone would give less.
"""

MIN_CHUNK_TOKENS = 256


def loss_chunk_tokens(tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk when the loss scores `tokens` rows of `hidden_size` against `vocab_size` classes."""
    rows_per_hidden = -(-max(vocab_size, 1) // max(hidden_size, 1))  # ceil(vocab / hidden)
    chunks = -(-max(tokens, 1) // rows_per_hidden)
    return max(1 << (chunks - 1).bit_length(), min(MIN_CHUNK_TOKENS, max(tokens, 1)))
