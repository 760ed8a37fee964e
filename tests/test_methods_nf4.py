"""Every method over a 4-bit (NF4) base, QLoRA-style: starts where promised, trains only its own parameters."""

import pytest
import torch
from helpers_methods import IDS, logits, train_steps
from helpers_models import hf_tiny_model, save_hf

from nibblora.lora.layers import NF4Linear
from nibblora.methods import (
    dora_modules,
    inject_bottleneck,
    inject_dora,
    inject_ia3,
    inject_prefix_tuning,
    inject_prompt_tuning,
    trainable_parameters,
)
from nibblora.models import load_model

INJECT = {
    "ia3": (lambda m: inject_ia3(m), True),
    "dora": (lambda m: inject_dora(m, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8), True),
    "bottleneck": (lambda m: inject_bottleneck(m, "houlsby", 8), True),
    "prompt": (lambda m: inject_prompt_tuning(m, 4, seed=0), False),
    "prefix": (lambda m: inject_prefix_tuning(m, 4, seed=0), False),
}


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    return save_hf(hf_tiny_model("llama", seed=0), tmp_path_factory.mktemp("nf4_base"))


@pytest.mark.parametrize("method", sorted(INJECT))
def test_method_over_nf4_base(nf4_dir, method):
    model = load_model(nf4_dir, quantize="nf4")
    assert isinstance(model.model.layers[0].self_attn.k_proj, NF4Linear)
    before = logits(model)
    inject, starts_at_base = INJECT[method]
    inject(model)
    if starts_at_base:
        assert torch.equal(logits(model), before)
    params = trainable_parameters(model)
    own = ("ia3_l", ".lora.", ".magnitude", ".bottleneck.", "prompt_tuning.", "prefix_tuning.")
    assert params and all(any(mark in n for mark in own) for n in params), sorted(params)
    losses = train_steps(model, list(params.values()), IDS, steps=12, lr=0.05 if method != "dora" else 0.02)
    assert losses[-1] < losses[0], losses
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in params), name
    if method == "dora":
        assert all(isinstance(m.base, NF4Linear) for m in dora_modules(model).values())
