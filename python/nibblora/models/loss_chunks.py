"""How many tokens one chunk of the fused lm_head + cross-entropy takes (torch-free: the memory estimate uses it).

A chunk's float32 logits, [tokens, vocab] x 4 bytes, are the largest tensor of the loss. Liger-Kernel's rule sizes
the chunk so that they are no larger than the float32 hidden states of all the tokens the loss scores: the next
power of two of tokens / ceil(vocab / hidden). The loss then never needs more memory than one more copy of the
hidden states, whatever the batch, and a large batch still gets large matmuls (8192 tokens at hidden 4096 and a
128k vocabulary: chunks of 256; 512 tokens at hidden 2048 and a 32k vocabulary: chunks of 32).
"""


def loss_chunk_tokens(tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk when the loss scores `tokens` rows of `hidden_size` against `vocab_size` classes."""
    rows_per_hidden = -(-max(vocab_size, 1) // max(hidden_size, 1))  # ceil(vocab / hidden)
    chunks = -(-max(tokens, 1) // rows_per_hidden)
    return 1 << (chunks - 1).bit_length()
