"""LoRALinear and NF4Linear: initialisation, scaling, dropout placement, merge, multi-adapter, 4-bit storage."""

import math

import pytest
import torch
from torch import nn

from nibblora.lora import LoRALinear, NF4Linear
from nibblora.quant import dequantize_4bit, quantize_4bit

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def linear(in_features=48, out_features=32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def randomize_B(layer, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.adapter.lora_B.normal_()


def test_output_at_init_equals_dense_base_exactly():
    base = linear()
    x = torch.randn(4, 7, 48)
    expected = base(x)
    layer = LoRALinear(base, r=8, alpha=16).train()
    assert torch.equal(layer(x), expected)


def test_output_at_init_equals_nf4_base_exactly():
    base = NF4Linear.from_linear(linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    expected = base(x)
    assert torch.equal(LoRALinear(base, r=4, dropout=0.1).train()(x), expected)


def test_lora_A_init_matches_peft_kaiming_uniform():
    base = linear(bias=False)
    torch.manual_seed(3)
    layer = LoRALinear(base, r=6)
    torch.manual_seed(3)
    expected = torch.empty(6, 48)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    assert torch.equal(layer.adapter.lora_A, expected)
    assert torch.equal(layer.adapter.lora_B, torch.zeros(32, 6))


def test_gaussian_init_uses_std_one_over_r():
    torch.manual_seed(0)
    layer = LoRALinear(linear(in_features=4096, bias=False), r=4, init="gaussian")
    assert abs(layer.adapter.lora_A.std().item() - 0.25) < 0.01


@pytest.mark.parametrize("rslora, expected", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(rslora, expected):
    layer = LoRALinear(linear(), r=16, alpha=32, rslora=rslora)
    assert layer.adapter.scaling == expected


def test_forward_equals_base_plus_scaled_low_rank_path():
    base = linear()
    layer = LoRALinear(base, r=4, alpha=12)
    randomize_B(layer)
    x = torch.randn(3, 48)
    a, b = layer.adapter.lora_A, layer.adapter.lora_B
    torch.testing.assert_close(layer(x), base(x) + 3.0 * (x @ a.t() @ b.t()), rtol=1e-5, atol=1e-5)


def test_dropout_touches_only_the_lora_path():
    base = linear()
    layer = LoRALinear(base, r=4, dropout=0.5).train()
    randomize_B(layer)
    with torch.no_grad():
        layer.adapter.lora_A.zero_()  # LoRA path is zero: any change would come from dropout on the base
    x = torch.randn(16, 48)
    assert torch.equal(layer(x), base(x))


def test_dropout_is_off_in_eval_and_on_in_train():
    layer = LoRALinear(linear(), r=4, dropout=0.5)
    randomize_B(layer)
    x = torch.randn(16, 48)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))


def test_frozen_base_and_trainable_adapter_and_bias_flags():
    layer = LoRALinear(linear(), r=4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B"}
    with_bias = LoRALinear(linear(), r=4, train_bias=True)
    assert {n for n, p in with_bias.named_parameters() if p.requires_grad} == trainable | {"base.bias"}


def test_trainable_bias_gets_gradient_through_custom_function():
    layer = LoRALinear(linear(), r=4, train_bias=True)
    x = torch.randn(6, 48)
    layer(x).sum().backward()
    assert torch.equal(layer.base.bias.grad, torch.full((32,), 6.0))
    assert layer.base.weight.grad is None


def test_train_bias_without_bias_is_a_clear_error():
    with pytest.raises(ValueError, match="base layer has no bias"):
        LoRALinear(linear(bias=False), r=4, train_bias=True)


def test_merged_output_equals_adapter_output_and_unmerge_restores_weight():
    base = linear()
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8)
    randomize_B(layer)
    x = torch.randn(5, 48)
    adapted = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.weight, original + 2.0 * layer.adapter.lora_B @ layer.adapter.lora_A)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)


def test_merge_into_4bit_base_is_refused_with_reason():
    layer = LoRALinear(NF4Linear.from_linear(linear()), r=4)
    with pytest.raises(TypeError, match="4-bit base"):
        layer.merge()


def test_second_adapter_is_selected_per_request():
    base = linear()
    layer = LoRALinear(base, r=4)
    randomize_B(layer)
    second = layer.add_adapter("second", r=2, alpha=2)
    torch.manual_seed(5)
    with torch.no_grad():
        second.lora_B.normal_()
    x = torch.randn(3, 48)
    y_second = layer(x)
    torch.testing.assert_close(y_second, base(x) + x @ second.lora_A.t() @ second.lora_B.t(), rtol=1e-5, atol=1e-5)
    layer.set_adapter("default")
    assert not torch.allclose(layer(x), y_second)
    layer.set_adapter(None)
    assert torch.equal(layer(x), base(x))
    with pytest.raises(KeyError, match="no adapter named 'third'"):
        layer.set_adapter("third")


def test_nf4_from_quantized_holds_the_given_codes_without_a_dense_copy():
    weight = torch.randn(32, 48)
    q = quantize_4bit(weight, "nf4", 64, double_quant=True)
    layer = NF4Linear.from_quantized(q, compute_dtype=torch.float32)
    assert layer.weight is q.packed and layer.absmax is q.state.absmax
    assert not any(t.is_floating_point() and t.numel() >= weight.numel() for t in layer.state_dict().values())
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer(x), x @ dequantize_4bit(q, torch.float32).t(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_state_dict_uses_bitsandbytes_keys(quant_type):
    layer = NF4Linear.from_linear(linear(), quant_type=quant_type)
    assert list(layer.state_dict()) == [
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        f"weight.quant_state.bitsandbytes__{quant_type}",
        "bias",
    ]


def test_nf4_state_dict_round_trips_through_an_empty_layer():
    source = NF4Linear.from_linear(linear(), compute_dtype=torch.float32)
    target = NF4Linear(48, 32, bias=True, compute_dtype=torch.float32)
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 48)
    assert torch.equal(target(x), source(x))


def test_nf4_state_dict_loads_into_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    source = NF4Linear.from_linear(linear(in_features=64, out_features=32), compute_dtype=torch.float32)
    state = source.state_dict()
    target = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    # What transformers does with a saved 4-bit checkpoint: rebuild Params4bit from bitsandbytes' keys.
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    target.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, requires_grad=False, device="cpu")
    target.bias = nn.Parameter(state["bias"])
    x = torch.randn(3, 64)
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)


def test_nf4_load_refuses_a_dense_weight_with_instructions():
    target = NF4Linear(48, 32, bias=True)
    with pytest.raises(RuntimeError, match="no bitsandbytes quant state"):
        target.load_state_dict(linear().state_dict())


def test_nf4_to_dtype_keeps_float32_scales_and_casts_bias():
    layer = NF4Linear.from_linear(linear()).to(torch.bfloat16)
    assert layer.quant_map.dtype == torch.float32 and layer.nested_absmax.dtype == torch.float32
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16


def test_nf4_compute_dtype_must_be_a_float_type():
    with pytest.raises(ValueError, match="compute_dtype must be bfloat16, float16 or float32"):
        NF4Linear.from_linear(linear(), compute_dtype=torch.int8)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_nf4_lora_moves_to_device_and_matches_cpu(device):
    layer = LoRALinear(NF4Linear.from_linear(linear(), compute_dtype=torch.float32), r=4)
    randomize_B(layer)
    x = torch.randn(3, 48)
    moved = layer.to(device)
    assert moved.base.weight.device.type == device and moved.base.absmax.device.type == device
    torch.testing.assert_close(moved(x.to(device)).cpu(), layer.cpu()(x), rtol=1e-5, atol=1e-5)


def test_adapters_injected_into_an_eval_model_are_in_eval_mode_so_dropout_stays_off():
    from nibblora.lora import inject_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    inject_lora(model, ["0", "2"], r=4, alpha=8, dropout=0.5)
    for module in model.modules():
        assert not module.training, module
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)  # a non-zero B, so dropout would show
    x = torch.randn(4, 16)
    assert torch.equal(model(x), model(x))
    model.train()
    assert all(m.training for m in model.modules())
