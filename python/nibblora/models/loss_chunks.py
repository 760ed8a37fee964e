"""How many tokens one chunk of the fused lm_head + cross-entropy takes (torch-free: the memory estimate uses it).

A chunk's float32 logits are [tokens, vocab] x 4 bytes and are the largest tensor of the loss, so the chunk is
sized by bytes, not by a fixed token count: about 32 MiB of logits (256 tokens at a 32k vocabulary, 65 at 128k),
never fewer than 32 tokens (small matmuls waste the device) nor more than 4096.
"""

CHUNK_LOGIT_BYTES = 32 << 20
MIN_CHUNK_TOKENS = 32
MAX_CHUNK_TOKENS = 4096


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary of `vocab_size`."""
    return max(MIN_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, CHUNK_LOGIT_BYTES // (4 * max(vocab_size, 1))))
