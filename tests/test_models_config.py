"""ModelConfig reads transformers' config.json for Llama, Mistral and Qwen2, and refuses what it cannot build."""

import json

import pytest

from nibblora.checkpoint import CheckpointError
from nibblora.models import ModelConfig, UnsupportedModelError, load_model

BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_llama_config_defaults_head_dim_and_has_no_bias_or_window():
    config = ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert (config.head_dim, config.num_key_value_heads) == (16, 2)
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (False, False, False)
    assert config.sliding_window is None and config.layer_uses_sliding_window == [False, False]
    assert config.rope_scaling is None and config.rope_theta == 10000.0


def test_llama_attention_bias_puts_bias_on_all_four_projections():
    config = ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "attention_bias": True, "mlp_bias": True})
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, True, True)


def test_qwen2_has_qkv_bias_and_window_only_when_use_sliding_window():
    plain = ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2", "sliding_window": 4096})
    assert (plain.qkv_bias, plain.o_bias, plain.sliding_window) == (True, False, None)
    windowed = ModelConfig.from_hf_dict(
        {**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}
    )
    assert windowed.sliding_window == 16
    assert windowed.layer_uses_sliding_window == [False, True]


def test_mistral_applies_its_sliding_window_to_every_layer():
    config = ModelConfig.from_hf_dict({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert config.sliding_window == 4096 and config.layer_uses_sliding_window == [True, True]


def test_rope_settings_are_read_from_rope_parameters_and_from_legacy_rope_scaling():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    new = ModelConfig.from_hf_dict(
        {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    )
    legacy = ModelConfig.from_hf_dict(
        {**BASE, "model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}}
    )
    assert new.rope_theta == legacy.rope_theta == 500000.0
    assert new.rope_scaling == legacy.rope_scaling == {"rope_type": "llama3", **scaling}


def test_unknown_rope_type_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="RoPE type 'yarn' is not supported"):
        ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_unsupported_model_type_is_named_and_supported_ones_listed():
    with pytest.raises(UnsupportedModelError) as info:
        ModelConfig.from_hf_dict({**BASE, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert str(info.value) == (
        "config.json: model_type 'gpt2' (GPT2LMHeadModel) is not a supported causal LM; nibblora supports "
        "llama (LlamaForCausalLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)"
    )


def test_a_non_causal_lm_architecture_of_a_supported_family_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"\['LlamaForSequenceClassification'\] is not a causal LM"):
        ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})


def test_a_missing_model_type_is_refused():
    with pytest.raises(UnsupportedModelError, match="model_type None is not a supported causal LM"):
        ModelConfig.from_hf_dict(BASE)


def test_an_activation_other_than_silu_is_refused():
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "hidden_act": "gelu"})


def test_a_missing_size_field_is_named():
    config = {k: v for k, v in BASE.items() if k != "hidden_size"}
    with pytest.raises(CheckpointError, match="missing required field 'hidden_size'"):
        ModelConfig.from_hf_dict({**config, "model_type": "llama"})


def test_heads_must_divide_into_key_value_groups():
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict({**BASE, "num_key_value_heads": 3, "model_type": "llama"})


def test_load_model_on_an_unsupported_checkpoint_names_the_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "bert", "architectures": ["BertModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(UnsupportedModelError, match=rf"{tmp_path}/config.json: model_type 'bert' \(BertModel\)"):
        load_model(tmp_path)


def test_a_pad_token_outside_the_vocabulary_does_not_break_the_embedding():
    from nibblora.models import LlamaForCausalLM

    config = ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "pad_token_id": -1})
    assert LlamaForCausalLM(config).model.embed_tokens.padding_idx is None
    config = ModelConfig.from_hf_dict({**BASE, "model_type": "llama", "pad_token_id": 0})
    assert LlamaForCausalLM(config).model.embed_tokens.padding_idx == 0
