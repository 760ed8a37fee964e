"""Byte-for-byte parity with the real bitsandbytes package (its CPU path), both directions."""

import json

import pytest
import torch

from nibblora.quant import dequantize_4bit, from_bnb_state_dict, quantize_4bit, to_bnb_state_dict
from nibblora.quant.state import QuantizedTensor, QuantState

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def bnb_quantize(x, quant_type, blocksize, double_quant):
    return bnb_functional.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def assert_same_as_bnb(x, quant_type, blocksize, double_quant=True):
    packed, state = bnb_quantize(x, quant_type, blocksize, double_quant)
    ours = quantize_4bit(x, quant_type, blocksize, double_quant)
    assert torch.equal(ours.packed, packed), "packed 4-bit codes differ"
    assert torch.equal(ours.state.absmax, state.absmax), "absmax (or its 8-bit codes) differ"
    assert torch.equal(ours.state.code, state.code)
    if double_quant:
        assert torch.equal(ours.state.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.state.nested_code, state.state2.code), "nested quant map differs"
        assert ours.state.offset.item() == state.offset.item(), "double-quant offset differs"
    return ours, packed, state


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_random_tensors_quantize_to_the_same_bytes_as_bitsandbytes(dtype, blocksize, quant_type):
    torch.manual_seed(blocksize)
    x = (torch.randn(96, 257) * 0.05).to(dtype)  # 24,672 elements: several nested blocks at small blocksizes
    assert_same_as_bnb(x, quant_type, blocksize, double_quant=True)
    assert_same_as_bnb(x, quant_type, blocksize, double_quant=False)


@pytest.mark.parametrize("n", [1, 2, 3, 31, 33, 63, 65, 1001, 70_001])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_and_ragged_element_counts_match_bitsandbytes(n, dtype):
    torch.manual_seed(n)
    x = (torch.randn(n) * 3).to(dtype)
    for quant_type in ("nf4", "fp4"):
        assert_same_as_bnb(x, quant_type, 64, double_quant=True)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_exactly_on_midpoints_match_bitsandbytes(quant_type):
    code = bnb_functional.get_4bit_type(quant_type, device="cpu")
    ordered = torch.sort(code).values
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    # A block of 64 whose absmax is exactly 1.0, so scaled values equal the raw values.
    block = torch.zeros(64)
    block[0] = 1.0
    block[1 : 1 + midpoints.numel()] = midpoints
    block[20 : 20 + midpoints.numel()] = -midpoints
    x = block.repeat(300)  # and enough blocks for a real nested quantization
    assert_same_as_bnb(x, quant_type, 64)


def test_all_zero_blocks_and_an_all_zero_tensor_match_bitsandbytes():
    torch.manual_seed(0)
    x = torch.randn(64 * 600 + 10)
    x[64 * 3 : 64 * 7] = 0.0
    x[-10:] = 0.0  # an all-zero tail block
    assert_same_as_bnb(x, "nf4", 64)
    assert_same_as_bnb(x, "fp4", 64)
    ours, *_ = assert_same_as_bnb(torch.zeros(64 * 300), "nf4", 64)
    assert torch.equal(dequantize_4bit(ours), torch.zeros(64 * 300))


def test_constant_block_scales_double_quantize_like_bitsandbytes():
    # Every block has the same absmax, so (absmax - offset) is zero everywhere: bitsandbytes stores code 0.
    x = torch.tensor([1.0, -0.5, 0.25, 0.0]).repeat(16 * 700)
    assert_same_as_bnb(x, "nf4", 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_we_dequantize_bitsandbytes_bytes_to_their_values(dtype, quant_type):
    torch.manual_seed(1)
    x = torch.randn(300, 130).to(dtype)
    packed, state = bnb_quantize(x, quant_type, 64, True)
    theirs = bnb_functional.dequantize_4bit(packed, state)
    ours = QuantizedTensor(
        packed,
        QuantState(
            quant_type=quant_type,
            blocksize=64,
            dtype=dtype,
            shape=x.shape,
            absmax=state.absmax,
            code=state.code,
            offset=state.offset,
            nested_absmax=state.state2.absmax,
            nested_code=state.state2.code,
        ),
    )
    assert torch.equal(dequantize_4bit(ours), theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_dequantizes_our_bytes_to_our_values(dtype, double_quant):
    torch.manual_seed(2)
    x = torch.randn(64, 257).to(dtype)
    ours = quantize_4bit(x, "nf4", 128, double_quant)
    saved = to_bnb_state_dict(ours, prefix="weight")
    del saved["weight"]  # QuantState.from_dict takes only the state entries
    their_state = bnb_functional.QuantState.from_dict(saved, device="cpu")
    theirs = bnb_functional.dequantize_4bit(ours.packed, their_state)
    assert torch.equal(theirs.reshape(-1), dequantize_4bit(ours).reshape(-1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_keys_and_json_match_bitsandbytes(quant_type, double_quant):
    torch.manual_seed(3)
    x = torch.randn(128, 96, dtype=torch.bfloat16)
    packed, state = bnb_quantize(x, quant_type, 64, double_quant)
    theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = to_bnb_state_dict(quantize_4bit(x, quant_type, 64, double_quant), prefix="weight")
    assert list(ours) == sorted(ours, key=list(theirs).index), "same keys"
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    json_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    assert bytes(ours[json_key].numpy()) == bytes(theirs[json_key].numpy())
    meta = json.loads(bytes(ours[json_key].numpy()))
    expected_order = ["quant_type", "blocksize", "dtype", "shape"]
    if double_quant:
        expected_order += ["nested_blocksize", "nested_dtype", "nested_offset"]
    assert list(meta) == expected_order


def test_a_state_dict_saved_by_bitsandbytes_loads_and_dequantizes_identically():
    torch.manual_seed(4)
    x = torch.randn(64, 200, dtype=torch.float16)
    packed, state = bnb_quantize(x, "nf4", 64, True)
    saved = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = from_bnb_state_dict(saved, prefix="w")
    assert ours.shape == x.shape and ours.dtype == torch.float16
    assert torch.equal(dequantize_4bit(ours), bnb_functional.dequantize_4bit(packed, state))


def test_linear4bit_layer_state_dict_round_trips_through_our_format():
    bnb_nn = pytest.importorskip("bitsandbytes.nn")
    torch.manual_seed(5)
    layer = bnb_nn.Linear4bit(96, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    weight = torch.randn(64, 96)
    layer.weight = bnb_nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else layer.weight
    saved = layer.state_dict()
    ours = from_bnb_state_dict(saved, prefix="weight")
    expected = quantize_4bit(weight, "nf4", 64, True)
    assert torch.equal(ours.packed, expected.packed)
    assert torch.equal(dequantize_4bit(ours), dequantize_4bit(expected))


def test_blocks_wider_than_a_row_dequantize_like_bitsandbytes_reference_not_its_avx512_kernel():
    """bitsandbytes 0.50's AVX-512 CPU dequantizer picks the wrong scale when blocksize > the last dimension
    (a [16, 64] weight at blocksize 128 comes back with errors above 1.0). Its own torch reference is right;
    we match the reference, so nibblora's values do not depend on the CPU's instruction set."""
    reference = pytest.importorskip("bitsandbytes.backends.default.ops")
    torch.manual_seed(6)
    x = torch.randn(16, 64)
    packed, state = bnb_quantize(x, "nf4", 128, False)
    expected = reference._dequantize_4bit_compute(
        packed.reshape(-1), state.absmax, state.code, 128, x.shape, torch.float32
    )
    ours = quantize_4bit(x, "nf4", 128, False)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(dequantize_4bit(ours), expected)
    assert (dequantize_4bit(ours) - x).abs().max() < 0.6


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_signed_zeros_and_tiny_values_dequantize_with_bitsandbytes_signs(quant_type, dtype, double_quant):
    """Issue 13 #20: -0.0, +0.0 and values that round to a zero code get bitsandbytes' codes and values, and the
    sign bits of its reference dequantizer (torch.equal treats -0.0 == +0.0, so sign bits are compared on their
    own). The reference, not its native CPU kernels: those disagree with each other on FP4's code 8 ("-0") —
    the AVX2 build's float32 and bfloat16 kernels give -0.0, its float16 kernel and the AVX-512 build +0.0 — so
    their sign bits depend on the machine; the reference's do not (the CUDA kernel's are checked below)."""
    reference = pytest.importorskip("bitsandbytes.backends.default.ops")
    x = torch.tensor([-0.0, 0.0, -1e-9, 1e-9, -1.0, 0.5, -0.0, -1e-30] * 16, dtype=torch.float32).to(dtype)
    all_negative_zero = torch.full((64,), -0.0, dtype=dtype)
    for values in (x, all_negative_zero, x.reshape(4, 32)):
        packed, state = bnb_quantize(values, quant_type, 64, double_quant)
        ours = quantize_4bit(values, quant_type, 64, double_quant=double_quant)
        assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1)), "packed codes differ"
        mine = dequantize_4bit(ours).reshape(-1)
        assert torch.equal(mine, bnb_functional.dequantize_4bit(packed, state).reshape(-1))
        absmax = state.absmax
        if state.nested:
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        theirs = reference._dequantize_4bit_compute(
            packed.reshape(-1), absmax.float(), state.code, 64, values.shape, dtype
        ).reshape(-1)
        assert torch.equal(torch.signbit(mine), torch.signbit(theirs)), (mine[:8], theirs[:8])
        assert torch.equal(mine, theirs)


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_signed_zero_codes_dequantize_on_cuda_with_the_kernels_signs(quant_type):
    """bitsandbytes' CUDA kernel applies FP4's sign bit to code 8 ("-0"), giving -0.0 (issue 13 #20)."""
    x = torch.tensor([-0.0, 0.0, -1e-9, 1e-9, -1.0, 0.5, -1e-30, 2.0] * 16, device="cuda")
    packed, state = bnb_quantize(x, quant_type, 64, False)
    ours = quantize_4bit(x, quant_type, 64, double_quant=False)
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
    theirs = bnb_functional.dequantize_4bit(packed, state).reshape(-1)
    assert torch.equal(torch.signbit(dequantize_4bit(ours).reshape(-1)), torch.signbit(theirs))
