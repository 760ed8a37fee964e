"""linear_cross_entropy equals the plain lm_head + cross_entropy loss and its gradients, chunk by chunk."""

import pytest
import torch
import torch.nn.functional as F

from nibblora.models.loss import IGNORE_INDEX, linear_cross_entropy, shift_labels, supervised_rows


def _inputs(batch=3, seq=7, hidden=16, vocab=50, dtype=torch.float32, seed=0, ignored=0.4):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignored] = IGNORE_INDEX
    return h, w, labels


def _plain(h, w, labels):
    logits = (h @ w.t()).float()
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("train_weight", [False, True])
def test_loss_and_gradients_equal_the_plain_path_in_float32(chunk, train_weight):
    h, w, labels = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_(train_weight)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_(train_weight)
    loss1, n1 = _plain(h1, w1, labels)
    loss2, n2 = linear_cross_entropy(h2, w2, labels, chunk_tokens=chunk)
    assert n1 == n2 and n1 > 0
    torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=1e-5)
    (loss1 * 0.5).backward()
    (loss2 * 0.5).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    if train_weight:
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)
    else:
        assert w2.grad is None


def test_bfloat16_matches_the_plain_path_to_bf16_rounding():
    h, w, labels = _inputs(batch=4, seq=16, hidden=32, vocab=300, dtype=torch.bfloat16, seed=3)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss1, _ = _plain(h1, w, labels)
    loss2, _ = linear_cross_entropy(h2, w, labels, chunk_tokens=5)
    assert loss2.dtype == torch.float32
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-4)
    loss1.backward()
    loss2.backward()
    assert h2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), rtol=2e-2, atol=2e-3)


def test_gradcheck_in_float64():
    h, w, labels = _inputs(batch=2, seq=3, hidden=5, vocab=7, dtype=torch.float64, seed=5)
    h.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, labels, chunk_tokens=2)[0], (h, w))


def test_every_token_ignored_gives_zero_loss_and_zero_gradients():
    h, w, labels = _inputs()
    labels[:] = IGNORE_INDEX
    h.requires_grad_()
    loss, n = linear_cross_entropy(h, w, labels)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0


def test_precomputed_rows_and_shifted_labels_give_the_next_token_loss():
    h, w, labels = _inputs(seed=9)
    shifted = shift_labels(labels)
    rows = supervised_rows(shifted)
    loss, n = linear_cross_entropy(h, w, shifted, rows=rows, chunk_tokens=3)
    logits = (h @ w.t()).float()
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)


def test_mismatched_shapes_and_bad_chunk_are_refused():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="pair row for row"):
        linear_cross_entropy(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, labels, chunk_tokens=0)


@pytest.mark.cuda
def test_cuda_bfloat16_matches_the_plain_path():
    h, w, labels = _inputs(batch=4, seq=64, hidden=64, vocab=1000, dtype=torch.bfloat16, seed=11)
    h, w, labels = h.cuda(), w.cuda(), labels
    rows = supervised_rows(labels)  # on the CPU, as the trainer does
    labels = labels.cuda()
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss1, _ = _plain(h1, w, labels)
    loss2, _ = linear_cross_entropy(h2, w, labels, rows=rows, chunk_tokens=100)
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-3)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), rtol=2e-2, atol=2e-3)


def test_default_chunk_follows_liger_rule_above_a_floor_of_rows():
    from nibblora.models.loss_chunks import MIN_CHUNK_TOKENS, loss_chunk_tokens

    assert MIN_CHUNK_TOKENS == 256
    assert loss_chunk_tokens(8192, 4096, 128_256) == 256  # ceil(128256 / 4096) = 32: 8192 / 32 = 256
    assert loss_chunk_tokens(65536, 4096, 128_256) == 2048  # the rule, above the floor
    assert loss_chunk_tokens(512, 2048, 32000) == 256  # the rule says 32 (512 / 16); the floor lifts it
    assert loss_chunk_tokens(100, 2048, 32000) == 100  # fewer tokens than the floor: one chunk of all of them
    for tokens, hidden, vocab in [(512, 2048, 32000), (8192, 4096, 128_256), (7, 16, 50), (100, 64, 50), (1, 8, 10**6)]:
        chunk = loss_chunk_tokens(tokens, hidden, vocab)
        assert 1 <= chunk
        if chunk > min(MIN_CHUNK_TOKENS, tokens):
            # above the floor, the rule: a power of two, float32 logits of one chunk at most about twice
            # (power-of-two rounding) the float32 hidden states
            assert chunk & (chunk - 1) == 0
            assert chunk * vocab <= 2 * tokens * hidden
        else:
            assert chunk == min(MIN_CHUNK_TOKENS, tokens)
