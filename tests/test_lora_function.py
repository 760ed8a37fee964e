"""LoRALinearFunction: exact gradients (gradcheck, float64), parity with plain modules, and what it saves."""

import pytest
import torch

from nibblora.lora.function import LoRALinearFunction, dequantize_base, dequantize_pairs, lora_linear
from nibblora.quant import quantize_4bit

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]
IN, OUT, R = 40, 24, 4


def make_inputs(device, dtype, quantized, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=gen)
    x = torch.randn(2, 3, IN, generator=gen).to(device, dtype).requires_grad_(True)
    lora_A = (torch.randn(R, IN, generator=gen) * 0.3).to(device, dtype).requires_grad_(True)
    lora_B = (torch.randn(OUT, R, generator=gen) * 0.3).to(device, dtype).requires_grad_(True)
    bias = torch.randn(OUT, generator=gen).to(device, dtype).requires_grad_(True)
    if quantized:
        q = quantize_4bit(weight, "nf4", 64, double_quant=True).to(device)
        return x, q.packed, q.state, bias, lora_A, lora_B
    return x, weight.to(device, dtype), None, bias, lora_A, lora_B


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_gradcheck_float64(device, quantized, dropout_p):
    x, weight, state, bias, lora_A, lora_B = make_inputs(device, torch.float64, quantized)

    def f(x, bias, lora_A, lora_B):
        return LoRALinearFunction.apply(x, weight, state, bias, lora_A, lora_B, 0.7, dropout_p, 1234)

    assert torch.autograd.gradcheck(f, (x, bias, lora_A, lora_B), eps=1e-6, atol=1e-5)


def reference(x, weight, state, bias, lora_A, lora_B, scaling, mask=None):
    w = weight if state is None else dequantize_base(weight, state, x.dtype)
    xd = x if mask is None else x * mask
    return torch.nn.functional.linear(x, w, bias) + scaling * (xd @ lora_A.t() @ lora_B.t())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_matches_plain_composition_forward_and_grads(device, quantized, dropout_p):
    inputs = make_inputs(device, torch.float32, quantized)
    ref_inputs = [
        t.detach().clone().requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
        else t
        for t in inputs
    ]
    x, weight, state, bias, lora_A, lora_B = inputs
    y = lora_linear(x, weight, state, bias, lora_A, lora_B, 0.5, dropout_p, 99)
    mask = None
    if dropout_p:
        from nibblora.lora.function import dropout_keep

        keep, scale = dropout_keep(x.detach().reshape(-1, IN), dropout_p, 99)
        mask = (keep * scale).view(x.shape)
        assert 0 < int((mask == 0).sum()) < mask.numel()
    y_ref = reference(*ref_inputs, 0.5, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for ours, theirs in zip((x, bias, lora_A, lora_B), (ref_inputs[0], *ref_inputs[3:])):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def test_frozen_base_gets_no_gradient_and_frozen_bias_none():
    x, weight, state, bias, lora_A, lora_B = make_inputs("cpu", torch.float32, False)
    weight.requires_grad_(False)
    frozen_bias = bias.detach()
    y = lora_linear(x, weight, None, frozen_bias, lora_A, lora_B, 1.0)
    y.sum().backward()
    assert weight.grad is None and frozen_bias.grad is None
    assert lora_A.grad is not None and lora_B.grad is not None and x.grad is not None


def saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dropout_p", [0.0, 0.5], ids=["no_dropout", "dropout"])
def test_nf4_saves_input_packed_weight_and_adapters_only(dropout_p):
    x, packed, state, _, lora_A, lora_B = make_inputs("cpu", torch.float32, True)
    y, saved = saved_tensors(lambda: lora_linear(x, packed, state, None, lora_A, lora_B, 2.0, dropout_p, 5))
    tokens = x.shape[0] * x.shape[1]
    assert [tuple(t.shape) for t in saved] == [tuple(x.shape), tuple(packed.shape), (R, IN), (OUT, R), (tokens, R)]
    assert saved[0] is x and saved[1] is packed and saved[2] is lora_A and saved[3] is lora_B
    assert not any(t.data_ptr() == y.data_ptr() for t in saved)  # never the output


def test_dense_base_saves_the_weight_itself_not_a_copy():
    x, weight, _, _, lora_A, lora_B = make_inputs("cpu", torch.float32, False)
    _, saved = saved_tensors(lambda: lora_linear(x, weight, None, None, lora_A, lora_B, 2.0))
    assert saved[1] is weight
    assert sum(t.numel() for t in saved) == x.numel() + weight.numel() + lora_A.numel() + lora_B.numel() + 6 * R


def test_dropout_mask_is_redrawn_identically_from_its_seed():
    from nibblora.lora.function import dropout_keep

    like = torch.empty(64, 32)
    (first, scale), (second, _) = dropout_keep(like, 0.2, 7), dropout_keep(like, 0.2, 7)
    assert torch.equal(first, second) and first.dtype == torch.bool and first.shape == (64, 32)
    assert scale == 65536 / (65536 - 13107)  # p rounded to a multiple of 1/65536
    assert not torch.equal(first, dropout_keep(like, 0.2, 8)[0])


@pytest.mark.parametrize("method", ["uniform16", "bernoulli"])
def test_dropout_keeps_the_expected_fraction_and_is_reproducible(method):
    from nibblora.lora.function import dropout_keep

    like = torch.empty(1000, 1000)
    keep, scale = dropout_keep(like, 0.1, 3, method)
    assert torch.equal(keep, dropout_keep(like, 0.1, 3, method)[0])
    assert abs(keep.float().mean().item() - 0.9) < 0.002
    assert abs(keep.float().mean().item() * scale - 1.0) < 0.003


def test_lora_linear_rejects_half_an_adapter():
    x, weight, _, _, lora_A, _ = make_inputs("cpu", torch.float32, False)
    with pytest.raises(ValueError, match="lora_A and lora_B must both be given"):
        lora_linear(x, weight, None, None, lora_A, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(24, 40), (7, 9)], ids=["whole_blocks", "odd_tail"])
def test_device_dequantize_equals_quant_api_bit_for_bit(device, quant_type, dtype, shape):
    from nibblora.quant import dequantize_4bit

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    q = quantize_4bit(weight, quant_type, 32, double_quant=True)
    expected = dequantize_4bit(q, dtype)
    got = dequantize_pairs(q.packed.to(device), q.state.to(device), dtype).cpu()
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitsandbytes_kernel_path_equals_quant_api_bit_for_bit(device, quant_type, dtype):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from nibblora.lora.function import dequantize_with_bitsandbytes
    from nibblora.quant import dequantize_4bit

    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    q = quantize_4bit(weight, quant_type, 64, double_quant=True)
    got = dequantize_with_bitsandbytes(q.packed.to(device), q.state.to(device), dtype).cpu()
    assert got.shape == (24, 40) and torch.equal(got, dequantize_4bit(q, dtype))
