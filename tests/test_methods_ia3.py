"""IA3 (nibblora.methods.ia3): starts at the base, trains only its vectors, merges exactly, peft's format both ways."""

import json

import pytest
import torch
from helpers_methods import IDS, logits, nib_model, train_steps, twins

from nibblora.errors import AdapterError
from nibblora.methods import (
    ia3_modules,
    inject_ia3,
    load_adapter,
    load_ia3,
    merge_ia3,
    save_adapter,
    save_ia3,
    trainable_parameters,
)

peft = pytest.importorskip("peft", reason="peft is not installed; the interoperability tests need it")


def _randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ia3_modules(model).values():
            m.ia3_l.copy_(1 + 0.5 * torch.randn(m.ia3_l.shape, generator=g))


def test_starts_at_base_and_trains_only_its_vectors(tmp_path):
    model = nib_model(tmp_path)
    before = logits(model)
    layers = inject_ia3(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["down_proj", "k_proj", "v_proj"]
    assert torch.equal(logits(model), before)
    assert set(trainable_parameters(model)) == {f"{n}.ia3_l" for n in layers}
    assert layers["model.layers.0.mlp.down_proj"].ia3_l.shape == (1, 128)  # feed-forward: scales the input
    assert layers["model.layers.0.self_attn.k_proj"].ia3_l.shape == (32, 1)  # 2 kv heads x 16: the output
    losses = train_steps(model, list(trainable_parameters(model).values()), IDS, steps=25, lr=0.1)
    assert losses[-1] < losses[0] - 0.2, losses  # the base is near-uniform (4.85 = ln 128): a clear fall
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == name.endswith("ia3_l"), name


def test_save_load_and_merge_give_identical_logits(tmp_path):
    model = nib_model(tmp_path)
    inject_ia3(model)
    _randomize(model)
    want = logits(model)
    save_adapter(model, tmp_path / "ia3")
    other = nib_model(tmp_path)
    load_adapter(other, tmp_path / "ia3")
    assert torch.equal(logits(other), want)
    merge_ia3(other)
    assert not ia3_modules(other)
    torch.testing.assert_close(logits(other), want, rtol=1e-5, atol=1e-5)


def test_peft_saves_nibblora_loads(tmp_path):
    hf, model = twins(tmp_path)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft_ia3")
    with pm.disable_adapter():
        base = logits(pm)
    assert (logits(pm) - base).abs().max() > 1e-3  # the vectors are not ones: the test can fail
    load_adapter(model, tmp_path / "peft_ia3")
    torch.testing.assert_close(logits(model), logits(pm), rtol=1e-5, atol=1e-5)


def test_nibblora_saves_peft_loads(tmp_path):
    hf, model = twins(tmp_path)
    inject_ia3(model)
    _randomize(model)
    save_ia3(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    torch.testing.assert_close(logits(pm), logits(model), rtol=1e-5, atol=1e-5)
    # peft's own merge agrees with ours
    merged = pm.merge_and_unload()
    merge_ia3(model)
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)


def test_other_methods_adapter_is_refused(tmp_path):
    hf, model = twins(tmp_path)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterError, match="peft_type is 'LORA', not 'IA3'"):
        load_ia3(model, tmp_path / "lora")


def test_wrong_shapes_and_keys_are_refused(tmp_path):
    model = nib_model(tmp_path)
    inject_ia3(model)
    save_ia3(model, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["feedforward_modules"] = []  # now down_proj's [1, in] vector should be [out, 1]
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"down_proj.ia3_l' has shape \[1, 128\], expected \[64, 1\]"):
        load_ia3(nib_model(tmp_path), tmp_path / "a")
    config["feedforward_modules"] = ["gate_proj"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="feedforward_modules.*subset of target_modules"):
        load_ia3(nib_model(tmp_path), tmp_path / "a")
    with pytest.raises(AdapterError, match="selects no linear layer"):
        inject_ia3(nib_model(tmp_path), target_modules=["nope"])
