"""nibblora.merge against the real peft: merge_and_unload on the same base and adapter."""

from __future__ import annotations

import pytest
import torch
from helpers_merge import peft_model, read_safetensors_dir, save_adapter_dir, save_base

from nibblora.merge import merge_checkpoint

CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "patterns_rslora_modules_to_save": dict(
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
        modules_to_save=["lm_head"],
    ),
    "embedding_and_lm_head": dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "lm_head", "up_proj"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_merge_equals_peft_merge_and_unload_bit_for_bit(tmp_path, case):
    base = save_base(tmp_path / "base")
    model = peft_model(**CASES[case])
    adapter = save_adapter_dir(model, tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()

    merge_checkpoint(base, [adapter], tmp_path / "out", progress=False)

    got = read_safetensors_dir(tmp_path / "out")
    assert set(got) == set(expected)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_tied_lm_head_lora_updates_the_shared_embedding_as_peft_does(tmp_path):
    base = save_base(tmp_path / "base", family="llama_tied")
    model = peft_model(family="llama_tied", r=2, lora_alpha=4, target_modules=["lm_head", "q_proj"])
    adapter = save_adapter_dir(model, tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()

    merge_checkpoint(base, [adapter], tmp_path / "out", progress=False)

    got = read_safetensors_dir(tmp_path / "out")
    assert "lm_head.weight" not in got
    assert torch.equal(got["model.embed_tokens.weight"], expected["lm_head.weight"])
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], expected["model.layers.0.self_attn.q_proj.weight"]
    )


def test_two_adapters_linear_equals_peft_merging_both_in_float32(tmp_path):
    base = save_base(tmp_path / "base")
    model = peft_model(r=4, lora_alpha=8, adapter_name="a")
    from peft import LoraConfig

    model.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    save_adapter_dir(model, tmp_path / "ads", "a")
    save_adapter_dir(model, tmp_path / "ads", "b")
    expected = model.merge_and_unload(adapter_names=["a", "b"]).state_dict()

    merge_checkpoint(base, [tmp_path / "ads" / "a", tmp_path / "ads" / "b"], tmp_path / "out", progress=False)

    got = read_safetensors_dir(tmp_path / "out")
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_bfloat16_merge_is_within_one_rounding_of_peft(tmp_path):
    base = save_base(tmp_path / "base", dtype=torch.bfloat16)
    model = peft_model(dtype=torch.bfloat16, r=4, lora_alpha=8)
    adapter = save_adapter_dir(model, tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()

    merge_checkpoint(base, [adapter], tmp_path / "out", progress=False)

    got = read_safetensors_dir(tmp_path / "out")
    for name, want in expected.items():
        assert got[name].dtype == torch.bfloat16
        # adjacent bf16 values differ by one in their bit patterns (same sign): at most one rounding apart
        steps = (got[name].view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert steps.max().item() <= 1, name


def test_dora_merge_matches_peft_to_float32_rounding(tmp_path):
    base = save_base(tmp_path / "base")
    model = peft_model(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])
    adapter = save_adapter_dir(model, tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()

    merge_checkpoint(base, [adapter], tmp_path / "out", progress=False)

    got = read_safetensors_dir(tmp_path / "out")
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=2e-6, atol=1e-7, msg=name)
    q = "model.layers.1.self_attn.q_proj.weight"
    base_q = read_safetensors_dir(base)[q]
    assert not torch.allclose(got[q], base_q), "the DoRA update changed the weight"
