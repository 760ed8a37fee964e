"""DoRA training (nibblora.methods.dora): starts at the base, trains A, B and the magnitude, merges exactly, and
peft's DoRA adapters both ways."""

import json

import pytest
import torch
from helpers_methods import IDS, logits, nib_model, train_steps, twins
from safetensors import safe_open

from nibblora.errors import AdapterError
from nibblora.methods import (
    dora_modules,
    inject_dora,
    load_adapter,
    load_dora,
    merge_dora,
    save_adapter,
    trainable_parameters,
)

peft = pytest.importorskip("peft", reason="peft is not installed; the interoperability tests need it")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _perturb(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dora_modules(model).values():
            m.lora.lora_B.normal_(0, 0.1, generator=g)
            m.magnitude.mul_(1 + 0.2 * torch.randn(m.magnitude.shape, generator=g))


def test_starts_at_base_trains_its_parameters_and_merges(tmp_path):
    model = nib_model(tmp_path)
    before = logits(model)
    layers = inject_dora(model, TARGETS, r=4, alpha=8)
    assert torch.equal(logits(model), before)
    assert set(trainable_parameters(model)) == {
        f"{n}.{p}" for n in layers for p in ("lora.lora_A", "lora.lora_B", "magnitude")
    }
    losses = train_steps(model, list(trainable_parameters(model).values()), IDS, steps=20, lr=0.02)
    assert losses[-1] < losses[0] - 0.2, losses
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable_parameters(model)), name
    want = logits(model)
    merge_dora(model)
    assert not dora_modules(model)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


def test_save_load_identical_logits(tmp_path):
    model = nib_model(tmp_path)
    inject_dora(model, TARGETS, r=4, alpha=8)
    _perturb(model)
    want = logits(model)
    save_adapter(model, tmp_path / "d")
    other = nib_model(tmp_path)
    load_adapter(other, tmp_path / "d")
    assert torch.equal(logits(other), want)
    assert not trainable_parameters(other)


def test_peft_saves_nibblora_loads(tmp_path):
    hf, model = twins(tmp_path)
    torch.manual_seed(0)
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False
    )
    pm = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)  # a magnitude away from ||W + s B A||, so the magnitude path is exercised
    pm.save_pretrained(tmp_path / "peft_dora")
    load_adapter(model, tmp_path / "peft_dora")
    assert dora_modules(model)
    torch.testing.assert_close(logits(model), logits(pm), rtol=1e-5, atol=1e-5)


def test_nibblora_saves_peft_loads(tmp_path):
    hf, model = twins(tmp_path)
    inject_dora(model, TARGETS, r=4, alpha=8)
    _perturb(model)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
        assert f.get_tensor(key).shape == (64,)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    torch.testing.assert_close(logits(pm), logits(model), rtol=1e-5, atol=1e-5)


def test_plain_lora_folder_is_refused(tmp_path):
    hf, model = twins(tmp_path)
    peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])).save_pretrained(
        tmp_path / "lora"
    )
    with pytest.raises(AdapterError, match="use_dora is false"):
        load_dora(model, tmp_path / "lora")
