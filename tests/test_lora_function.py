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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_cpu_4bit_weight_is_used_a_slice_of_rows_at_a_time_with_the_same_results(monkeypatch, dtype):
    """On a CPU the dequantized base weight is never whole: rows are dequantized into one reused buffer and used at
    once. Forward, the input gradient and a full QLoRA layer's gradients equal the whole-weight path's."""
    import nibblora.lora.function as function
    from nibblora.lora.function import base_grad_input, base_linear

    gen = torch.Generator().manual_seed(3)
    out_features, in_features = 200, 192  # 192 columns: slices start on 64-element blocks every row
    q = quantize_4bit(torch.randn(out_features, in_features, generator=gen), "nf4", 64, double_quant=True)
    x = torch.randn(7, in_features, generator=gen).to(dtype)
    g = torch.randn(7, out_features, generator=gen).to(dtype)
    whole_y = base_linear(x, q.packed, q.state, dtype)
    whole_gx = base_grad_input(g, q.packed, q.state, dtype)
    dense = dequantize_base(q.packed, q.state, dtype)
    torch.testing.assert_close(whole_y, x @ dense.t(), rtol=0, atol=0)

    # Slices of 24 rows forward (9 of them), of 64 columns (3) for the input gradient.
    monkeypatch.setattr(function, "SLICE_BYTES", 24 * in_features * dtype.itemsize)
    assert function._cpu_slices(q.packed, q.state, dtype, 0) == [(i, min(i + 24, 200)) for i in range(0, 200, 24)]
    assert function._cpu_slices(q.packed, q.state, dtype, 1) == [(0, 64), (64, 128), (128, 192)]

    def no_whole_weight(*args, **kwargs):
        raise AssertionError("the whole weight was dequantized")

    monkeypatch.setattr(function, "dequantize_base", no_whole_weight)
    sliced_y = base_linear(x, q.packed, q.state, dtype)
    sliced_gx = base_grad_input(g, q.packed, q.state, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(sliced_y, whole_y, **tol)
    torch.testing.assert_close(sliced_gx, whole_gx, **tol)
    into = torch.ones(7, in_features, dtype=dtype)
    torch.testing.assert_close(base_grad_input(g, q.packed, q.state, dtype, out=into), whole_gx + 1, **tol)

    # A whole QLoRA layer with dropout: loss and every gradient as with the whole weight.
    results = []
    for slice_bytes in (24 * in_features * dtype.itemsize, 1 << 40):
        monkeypatch.setattr(function, "SLICE_BYTES", slice_bytes)
        if slice_bytes > 1 << 30:
            monkeypatch.setattr(function, "dequantize_base", dequantize_base)
        xi = x.clone().requires_grad_(True)
        a = (torch.randn(4, in_features, generator=torch.Generator().manual_seed(5)) * 0.1).to(dtype).requires_grad_()
        b = (torch.randn(out_features, 4, generator=torch.Generator().manual_seed(6)) * 0.1).to(dtype).requires_grad_()
        y = LoRALinearFunction.apply(xi, q.packed, q.state, None, a, b, 2.0, 0.25, 77)
        (y.float() ** 2).sum().backward()
        results.append((y, xi.grad, a.grad, b.grad))
    layer_tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tol  # sums of 200 rounded terms
    for sliced, whole in zip(*results):
        torch.testing.assert_close(sliced, whole, **layer_tol)


def test_weight_slices_fall_on_block_boundaries_and_are_skipped_where_they_cannot_be_used(monkeypatch):
    import nibblora.lora.function as function
    from nibblora.quant.api import dequantize_4bit_part

    monkeypatch.setattr(function, "SLICE_BYTES", 1)
    q = quantize_4bit(torch.randn(10, 96), "nf4", 64)  # 96 columns: only even rows start on a block
    dense = dequantize_base(q.packed, q.state, torch.float32)
    assert function._cpu_slices(q.packed, q.state, torch.float32, 0) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert function._cpu_slices(q.packed, q.state, torch.float32, 1) is None  # rows do not start on blocks
    assert dequantize_4bit_part(q, (1, 3), None, torch.float32) is None  # row 1 starts mid-block
    assert dequantize_4bit_part(q, (0, 11), None, torch.float32) is None
    assert dequantize_4bit_part(q, (0, 10), (0, 64), torch.float32) is None
    buffer = torch.full((400,), 7.0)
    rows = dequantize_4bit_part(q, (2, 4), None, torch.float32, out=buffer)
    assert rows.data_ptr() == buffer.data_ptr() and torch.equal(rows, dense[2:4])
    with pytest.raises(ValueError, match="contiguous CPU bfloat16 tensor of at least 192 elements"):
        dequantize_4bit_part(q, (2, 4), None, torch.bfloat16, out=buffer)
    wide = quantize_4bit(torch.randn(6, 256), "fp4", 64, double_quant=True)
    for rows, columns in [((0, 6), (64, 192)), ((1, 4), (0, 64)), ((5, 6), (192, 256))]:
        block = dequantize_4bit_part(wide, rows, columns, torch.bfloat16)
        expected = dequantize_base(wide.packed, wide.state, torch.bfloat16)[rows[0] : rows[1], columns[0] : columns[1]]
        assert torch.equal(block, expected)
    assert dequantize_4bit_part(wide, (0, 6), (32, 96), torch.float32) is None  # columns off the blocks
    # Dense weights, float64 (gradcheck goes through float32) and weights that fit one slice are used whole.
    assert function._cpu_slices(torch.randn(10, 96), None, torch.float32, 0) is None
    assert function._cpu_slices(q.packed, q.state, torch.float64, 0) is None
    monkeypatch.setattr(function, "SLICE_BYTES", 1 << 30)
    assert function._cpu_slices(q.packed, q.state, torch.float32, 0) is None


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_drop_out_equals_the_product_with_the_mask_and_a_bool_mask_makes_no_float_copy(mask_dtype):
    from nibblora.lora.function import drop_out

    x = torch.randn(64, 33)
    keep = (torch.rand(64, 33) > 0.3).to(mask_dtype)
    expected = x * keep.to(x.dtype) * 1.25
    torch.testing.assert_close(drop_out(x, keep, 1.25), expected, rtol=0, atol=0)
    buffer = x.clone()
    assert drop_out(buffer, keep, 1.25, inplace=True).data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)


def test_the_native_dequantizer_into_a_buffer_refuses_a_wrong_buffer_and_leaves_it_untouched():
    import numpy as np

    from nibblora import _native
    from nibblora.errors import InputError

    q = quantize_4bit(torch.randn(4, 64), "nf4", 64)
    packed, absmax = q.packed.reshape(-1).numpy(), q.state.absmax_float32().numpy()
    wrong_dtype = np.full(256, 7, dtype=np.int32)
    with pytest.raises(InputError, match="float32 array"):
        _native.dequantize_4bit_to(packed, absmax, "nf4", 64, wrong_dtype, "float32")
    with pytest.raises(InputError, match="uint16 array"):
        _native.dequantize_4bit_to(packed, absmax, "nf4", 64, np.zeros(256, np.float32), "bfloat16")
    too_long = np.full(300, 7.0, dtype=np.float32)  # more values than the codes hold
    with pytest.raises(ValueError):
        _native.dequantize_4bit_to(packed, absmax, "nf4", 64, too_long, "float32")
    assert (too_long == 7.0).all() and (wrong_dtype == 7).all()
    out = np.zeros(256, np.float32)
    _native.dequantize_4bit_to(packed, absmax, "nf4", 64, out, "float32")
    assert np.array_equal(out, dequantize_base(q.packed, q.state, torch.float32).reshape(-1).numpy())
