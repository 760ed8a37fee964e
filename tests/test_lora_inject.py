"""inject_lora on plain modules and on a tiny transformers Llama: targets, freezing, summary, QLoRA training."""

import pytest
import torch
from torch import nn

from nibblora.lora import LoRALinear, NF4Linear, find_target_modules, inject_lora, lora_modules, set_adapter

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_all_linear_targets_every_projection_but_not_lm_head():
    names = find_target_modules(tiny_llama(), "all-linear")
    assert len(names) == 14 and "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == set(SEVEN)


def test_inject_keeps_logits_exactly_at_init():
    model = tiny_llama()
    expected = model(IDS).logits
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    model.eval()
    assert torch.equal(model(IDS).logits, expected)


def test_inject_freezes_everything_but_adapters_and_counts_them():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    summary = inject_lora(model, ["q_proj", "v_proj"], r=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.{p}.adapters.default.lora_{ab}"
        for i in (0, 1)
        for p in ("q_proj", "v_proj")
        for ab in "AB"
    }
    # q: 8 * (64 + 64); v: 8 * (64 + 32) per layer
    assert [row.trainable for row in summary.rows] == [1024, 768, 1024, 768]
    assert summary.trainable_params == 3584
    assert summary.total_params == total_before + 3584
    assert summary.trainable_fraction == 3584 / (total_before + 3584)


def test_summary_prints_a_table_with_totals():
    summary = inject_lora(tiny_llama(), ["q_proj"], r=2)
    text = str(summary)
    assert text.splitlines()[0].split() == ["module", "shape", "[out,", "in]", "r", "base", "trainable"]
    assert "model.layers.1.self_attn.q_proj" in text
    assert text.splitlines()[-1].startswith("trainable 512 of ")
    assert text.splitlines()[-1].endswith("in 2 LoRA modules")


def test_regex_targets_match_full_names_like_peft():
    names = find_target_modules(tiny_llama(), r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_rank_pattern_overrides_rank_per_module():
    model = tiny_llama()
    inject_lora(model, ["q_proj", "v_proj"], r=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4})
    layers = lora_modules(model)
    assert layers["model.layers.0.self_attn.v_proj"].adapter.r == 2
    assert layers["model.layers.0.self_attn.q_proj"].adapter.scaling == 4 / 8


def test_no_matching_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] matched no linear layer"):
        inject_lora(tiny_llama(), ["qkv"], r=4)


def test_inject_works_on_a_plain_module_tree():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    summary = inject_lora(model, "all-linear", r=2)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
    assert summary.trainable_params == 2 * (8 + 16) + 2 * (16 + 4)


def test_quantize_base_replaces_targets_by_nf4_and_keeps_lm_head_dense():
    model = tiny_llama(torch.bfloat16)
    summary = inject_lora(model, "all-linear", r=4, quantize_base="nf4")
    layers = lora_modules(model)
    assert all(isinstance(layer.base, NF4Linear) for layer in layers.values())
    assert all(layer.base.compute_dtype == torch.bfloat16 for layer in layers.values())
    assert isinstance(model.lm_head, nn.Linear)
    assert all(row.quantized for row in summary.rows)


def test_qlora_training_steps_lower_the_loss():
    model = tiny_llama()
    inject_lora(model, "all-linear", r=4, alpha=8, quantize_base="nf4", compute_dtype=torch.float32)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.adapter.lora_B.normal_(std=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_second_inject_adds_a_named_adapter_and_set_adapter_switches():
    model = tiny_llama().eval()
    base_logits = model(IDS).logits
    inject_lora(model, ["q_proj"], r=4, adapter_name="a")
    inject_lora(model, ["q_proj"], r=2, adapter_name="b")
    layer = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    assert sorted(layer.adapters) == ["a", "b"] and layer.active_adapter == "b"
    with torch.no_grad():
        layer.adapters["a"].lora_B.fill_(0.1)
    set_adapter(model, "b")
    assert torch.equal(model(IDS).logits, base_logits)
    set_adapter(model, "a")
    assert not torch.allclose(model(IDS).logits, base_logits)
