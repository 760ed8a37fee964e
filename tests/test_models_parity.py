"""nibblora's Llama-family model gives transformers' logits, from the checkpoints transformers saves."""

import json

import pytest
import torch
from helpers_models import FAMILIES, MISTRAL_WINDOW, hf_logits, hf_tiny_model, random_ids, save_hf

from nibblora.models import KVCache, LlamaForCausalLM, ModelConfig, load_model, rope_inverse_frequencies

ATOL = 1e-4
SEQ = 20  # longer than the Mistral window (8) and the llama3 test's original context would matter at


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(family) -> (transformers model, its checkpoint directory, nibblora model loaded from it), built once."""
    built = {}

    def get(family):
        if family not in built:
            hf = hf_tiny_model(family)
            directory = save_hf(hf, tmp_path_factory.mktemp(family))
            built[family] = (hf, directory, load_model(directory))
        return built[family]

    return get


@pytest.fixture(params=FAMILIES)
def family_model(request, tiny):
    hf, _, ours = tiny(request.param)
    return request.param, hf, ours


def test_logits_match_transformers_for_each_family(family_model):
    _, hf, ours = family_model
    ids = random_ids(2, SEQ)
    with torch.no_grad():
        logits = ours(ids)
    expected = hf_logits(hf, ids)
    assert logits.shape == (2, SEQ, 128)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_loaded_state_dict_keys_equal_transformers_keys(family_model):
    _, hf, ours = family_model
    assert set(ours.state_dict()) == set(hf.state_dict())


def test_sharded_checkpoint_loads_the_same_logits(tmp_path):
    hf = hf_tiny_model("qwen2")
    directory = save_hf(hf, tmp_path, max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (directory / "model.safetensors").exists()
    ids = random_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(load_model(directory)(ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_incremental_decoding_with_kv_cache_equals_full_sequence_and_transformers(family_model):
    _, hf, ours = family_model
    ids = random_ids(2, SEQ, seed=3)
    cache = KVCache()
    with torch.no_grad():
        full = ours(ids)
        # Prefill 5 tokens, then a chunk of 3, then one token at a time.
        steps = [ours(ids[:, :5], past_key_values=cache), ours(ids[:, 5:8], past_key_values=cache)]
        steps += [ours(ids[:, t : t + 1], past_key_values=cache) for t in range(8, SEQ)]
    incremental = torch.cat(steps, dim=1)
    assert cache.get_seq_length() == SEQ
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(incremental, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_use_cache_returns_logits_and_a_cache_that_continues_the_sequence(family_model):
    _, _, ours = family_model
    ids = random_ids(1, 10, seed=4)
    with torch.no_grad():
        logits, cache = ours(ids[:, :9], use_cache=True)
        next_logits = ours(ids[:, 9:], past_key_values=cache)
        full = ours(ids)
    assert isinstance(cache, KVCache) and cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat([logits, next_logits], 1), full, atol=ATOL, rtol=0)


def test_left_padding_mask_and_position_ids_match_transformers(family_model):
    _, hf, ours = family_model
    ids = random_ids(2, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 is left-padded by 4
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, position_ids=position_ids)
    expected = hf_logits(hf, ids, attention_mask=mask, position_ids=position_ids)
    real = mask.bool()
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[real], expected[real], atol=ATOL, rtol=0)
    # The padded row's real tokens get the logits of the same tokens without padding.
    with torch.no_grad():
        alone = ours(ids[:1, 4:])
    torch.testing.assert_close(logits[0, 4:], alone[0], atol=ATOL, rtol=0)


def test_restarted_position_ids_match_transformers(family_model):
    _, hf, ours = family_model
    ids = random_ids(1, 10, seed=6)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = ours(ids, position_ids=position_ids)
    torch.testing.assert_close(logits, hf_logits(hf, ids, position_ids=position_ids), atol=ATOL, rtol=0)


def test_llama3_rope_scaling_changes_frequencies_as_transformers_does(tiny):
    hf, _, ours = tiny("llama3")
    scaled = ours.model.rotary_emb.inv_freq
    plain = rope_inverse_frequencies(ModelConfig(**{**_shape(ours.config), "rope_scaling": None}))
    assert not torch.equal(scaled, plain)
    assert torch.equal(scaled, hf.model.rotary_emb.inv_freq)


def _shape(config: ModelConfig) -> dict:
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
    )


def test_mistral_sliding_window_limits_attention_beyond_the_window(tiny):
    _, _, ours = tiny("mistral")
    assert ours.config.sliding_window == MISTRAL_WINDOW
    ids = random_ids(1, SEQ, seed=7)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 128
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    # Token 0 reaches position p only through a chain of attention hops of < 8 positions each; across 2 layers
    # it is out of reach from position 2 * (8 - 1) + 1 = 15 on, and visible before that.
    assert not torch.allclose(a[0, 1], b[0, 1])
    assert torch.equal(a[0, 15:], b[0, 15:])


def test_tied_embeddings_share_one_parameter(tiny):
    _, directory, ours = tiny("llama_tied")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_qwen2_has_bias_on_qkv_only(tiny):
    _, _, ours = tiny("qwen2")
    attn = ours.model.layers[0].self_attn
    assert [m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)] == [
        True,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_casts_parameters_and_stays_close(tiny, dtype):
    hf, directory, _ = tiny("llama")
    model = load_model(directory, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ids = random_ids(1, 8)
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), hf_logits(hf, ids), atol=5e-2, rtol=0)


def test_randomly_initialised_model_has_transformers_module_names():
    config = ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    names = set(LlamaForCausalLM(config).state_dict())
    assert names == {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
