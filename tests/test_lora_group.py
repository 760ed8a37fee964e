"""Group-level LoRA functions (q/k/v in one call, the SwiGLU MLP with its product recomputed): exact gradients
(gradcheck, float64), equality with the per-projection path in a whole model, and what the MLP saves."""

import pytest
import torch

from nibblora.lora import inject_lora
from nibblora.lora.group import LoRAGroupFunction, LoRASwiGLUFunction
from nibblora.models import ModelConfig
from nibblora.models.llama import LlamaForCausalLM
from nibblora.quant import quantize_4bit

IN, R = 24, 3


def make_projection(in_features, out, quantized, seed, dropout_p):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, in_features, generator=gen)
    lora_A = (torch.randn(R, in_features, generator=gen) * 0.3).double().requires_grad_(True)
    lora_B = (torch.randn(out, R, generator=gen) * 0.3).double().requires_grad_(True)
    bias = torch.randn(out, generator=gen).double().requires_grad_(True)
    if quantized:
        q = quantize_4bit(weight, "nf4", 64, double_quant=True)
        w, state = q.packed, q.state
    else:
        w, state = weight.double(), None
    return [w, state, bias, lora_A, lora_B, 0.7, dropout_p, 100 + seed, False], [bias, lora_A, lora_B]


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_group_gradcheck_float64(quantized, dropout_p):
    specs = [make_projection(IN, out, quantized, i, dropout_p) for i, out in enumerate((16, 8, 8))]
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    trainable = [t for _, ts in specs for t in ts]

    def f(x, *tensors):
        flat = []
        for i, (args, _) in enumerate(specs):
            args = list(args)
            args[2], args[3], args[4] = tensors[3 * i : 3 * i + 3]
            flat += args
        return LoRAGroupFunction.apply(x, *flat)

    assert torch.autograd.gradcheck(f, (x, *trainable), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_swiglu_gradcheck_float64(quantized, dropout_p):
    inter = 32
    specs = [
        make_projection(IN, inter, quantized, 0, dropout_p),
        make_projection(IN, inter, quantized, 1, dropout_p),
        make_projection(inter, IN, quantized, 2, dropout_p),
    ]
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    trainable = [t for _, ts in specs for t in ts]

    def f(x, *tensors):
        flat = []
        for i, (args, _) in enumerate(specs):
            args = list(args)
            args[2], args[3], args[4] = tensors[3 * i : 3 * i + 3]
            flat += args
        return LoRASwiGLUFunction.apply(x, *flat)

    assert torch.autograd.gradcheck(f, (x, *trainable), eps=1e-6, atol=1e-5)


def tiny_model(quantize, dropout, targets="all-linear", seed=0):
    config = ModelConfig.from_hf_dict(
        dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
        )
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    inject_lora(model, targets, r=4, alpha=8, dropout=dropout, quantize_base=quantize)
    with torch.no_grad():  # B is zero at init: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.train()


def per_projection(model):
    """Force the module-by-module path: a (no-op) forward hook makes a projection opt out of the fused call."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"):
            module.register_forward_hook(lambda *args: None)


def loss_and_grads(model, seed=5):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)  # dropout seeds are drawn from the global generator, in module order
    loss, n = model(ids, labels=ids)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["all", "qv"])
def test_fused_model_equals_per_projection_path(quantize, dropout, targets):
    fused = tiny_model(quantize, dropout, targets)
    plain = tiny_model(quantize, dropout, targets)
    per_projection(plain)
    loss_f, grads_f = loss_and_grads(fused)
    loss_p, grads_p = loss_and_grads(plain)
    assert torch.equal(loss_f, loss_p)  # forward: the very same ops
    assert grads_f.keys() == grads_p.keys() and grads_f
    for key in grads_f:
        # backward: the input gradients are summed in another order (one buffer instead of autograd's sum)
        torch.testing.assert_close(grads_f[key], grads_p[key], rtol=1e-5, atol=1e-6, msg=key)


def saved_bytes(module, x):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_mlp_saves_two_intermediate_tensors_not_four():
    model = tiny_model(None, 0.0)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 50, 64, requires_grad=True)
    fused = saved_bytes(mlp, x)
    per_projection(model)
    plain = saved_bytes(mlp, x)
    tokens, inter, r = 100, 160, 4
    assert fused == 4 * tokens * (64 + 2 * inter + 3 * r)  # x, gate(x), up(x), three x A^T
    assert plain - fused == 4 * tokens * 2 * inter  # silu(gate) and the product no longer kept


def test_trainable_base_takes_the_module_path():
    model = tiny_model(None, 0.0)
    attn = model.model.layers[0].self_attn
    attn.q_proj.base.weight.requires_grad_(True)
    _, grads = loss_and_grads(model)
    assert "model.layers.0.self_attn.q_proj.base.weight" in grads


def test_bf16_compute_with_float32_input_keeps_the_module_path_for_the_mlp():
    from nibblora.lora.group import _all_args

    model = tiny_model("nf4", 0.0)
    for m in model.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.bfloat16
    mlp = model.model.layers[0].mlp
    assert _all_args((mlp.gate_proj, mlp.up_proj, mlp.down_proj), torch.float32) is None
    assert _all_args((mlp.gate_proj, mlp.up_proj, mlp.down_proj), torch.bfloat16) is not None


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_fused_and_per_projection_loss_curves_agree_for_50_steps(quantize):
    """Issue 12: same seed, float32, dropout on, AdamW: the group-level functions train as the module path does
    (every loss within 1e-3 relative over 50 steps)."""
    curves = []
    for fused in (True, False):
        model = tiny_model(quantize, 0.1)
        if not fused:
            per_projection(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, foreach=False)
        torch.manual_seed(11)
        losses = []
        for step in range(50):
            ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(step))
            loss, n = model(ids, labels=ids)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach() / n))
        curves.append(losses)
    fused_curve, plain_curve = curves
    for step, (a, b) in enumerate(zip(fused_curve, plain_curve)):
        assert a == pytest.approx(b, rel=1e-3), step
    assert fused_curve[-1] < fused_curve[0]
