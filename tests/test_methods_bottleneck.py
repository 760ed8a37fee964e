"""Bottleneck adapters (nibblora.methods.bottleneck): Houlsby / Pfeiffer placement, zero start, training, and
nibblora's own file format round trip."""

import json

import pytest
import torch
from helpers_methods import IDS, logits, nib_model, train_steps, twins

from nibblora.errors import AdapterError
from nibblora.methods import (
    bottleneck_modules,
    inject_bottleneck,
    load_adapter,
    load_bottleneck,
    load_ia3,
    remove_bottleneck,
    save_adapter,
    trainable_parameters,
)


@pytest.mark.parametrize("variant,count", [("houlsby", 4), ("pfeiffer", 2)])
def test_starts_at_base_trains_only_adapters_and_round_trips(tmp_path, variant, count):
    model = nib_model(tmp_path)
    before = logits(model)
    adapters = inject_bottleneck(model, variant, bottleneck_size=8)
    assert len(adapters) == count  # 2 layers x (attention, MLP) or x (MLP)
    assert all(n.endswith(("self_attn", "mlp")) for n in adapters)
    assert torch.equal(logits(model), before)
    assert "model.layers.0.mlp.down_proj.weight" in dict(model.named_parameters())  # base names unchanged
    losses = train_steps(model, list(trainable_parameters(model).values()), IDS, steps=25, lr=0.01)
    assert losses[-1] < losses[0] - 0.2, losses
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".bottleneck." in name), name
    want = logits(model)
    save_adapter(model, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["variant"] == variant
    other = nib_model(tmp_path)
    load_adapter(other, tmp_path / "b")
    assert torch.equal(logits(other), want)
    remove_bottleneck(other)
    assert not bottleneck_modules(other) and torch.equal(logits(other), before)


def test_works_on_a_transformers_model(tmp_path):
    hf, _ = twins(tmp_path)
    before = logits(hf)
    inject_bottleneck(hf, "houlsby", 4, non_linearity="silu")
    assert torch.equal(logits(hf), before)


def test_refusals(tmp_path):
    model = nib_model(tmp_path)
    with pytest.raises(AdapterError, match="variant must be 'houlsby' or 'pfeiffer'"):
        inject_bottleneck(model, "lora")
    inject_bottleneck(model, "pfeiffer", 8)
    save_adapter(model, tmp_path / "b")
    with pytest.raises(AdapterError, match="peft_type is 'BOTTLENECK', not 'IA3'"):
        load_ia3(nib_model(tmp_path), tmp_path / "b")
    config_path = tmp_path / "b" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["bottleneck_size"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"down.weight' has shape \[8, 64\], expected \[4, 64\]"):
        load_bottleneck(nib_model(tmp_path), tmp_path / "b")
    config["variant"] = "adapterhub"
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="key 'variant' must be one of"):
        load_adapter(nib_model(tmp_path), tmp_path / "b")
