"""param_table: exact LoRA parameter counts from a model's shape."""

import pytest

from nibblora.lora import DecoderShape, param_table, projection_lora_params

LLAMA_2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def test_one_4096_square_projection_at_r16_trains_131072():
    assert projection_lora_params(4096, 4096, 16) == 131_072
    row = param_table("llama-2-7b", ranks=(16,)).projection_rows[0]
    assert (row.trainable, round(100 * row.fraction, 2)) == (131_072, 0.78)


def test_llama_2_7b_base_has_6_74_billion_parameters():
    assert DecoderShape.from_config("llama-2-7b").total_params() == 6_738_415_616


def test_llama_2_7b_r16_attention_and_all_seven_counts():
    table = param_table("llama-2-7b", ranks=(16,))
    attention, seven = table.get("attention q,k,v,o", 16), table.get("all linear (7)", 16)
    assert attention.trainable == 16_777_216 and round(100 * attention.fraction, 2) == 0.25
    assert seven.trainable == 39_976_960 and round(100 * seven.fraction, 2) == 0.59


def test_dict_and_object_configs_give_the_preset_numbers():
    class Config:
        pass

    obj = Config()
    obj.__dict__.update(LLAMA_2_7B)
    rows_dict = param_table(LLAMA_2_7B).rows
    assert rows_dict == param_table("llama-2-7b").rows == param_table(obj).rows


def test_table_has_every_rank_for_both_target_sets_and_prints_both():
    table = param_table("llama-2-7b")
    assert [(r.targets, r.r) for r in table.rows] == [
        (t, r) for t in ("attention q,k,v,o", "all linear (7)") for r in (4, 8, 16, 64)
    ]
    text = str(table)
    assert "attention q,k,v,o    16      16,777,216     0.25%" in text
    assert "all linear (7)       16      39,976,960     0.59%" in text


def test_grouped_query_attention_shrinks_k_and_v():
    table = param_table("llama-3-8b", ranks=(16,), targets=["k_proj"])
    assert table.rows[0].trainable == 32 * 16 * (4096 + 1024)


def test_custom_targets_and_unknown_names():
    table = param_table(LLAMA_2_7B, ranks=(8,), targets={"q and v": ["q_proj", "v_proj"]})
    assert table.get("q and v", 8).trainable == 32 * 2 * 8 * (4096 + 4096)
    with pytest.raises(ValueError, match=r"unknown projection\(s\) \['qkv'\]"):
        param_table(LLAMA_2_7B, targets=["qkv"])


def test_missing_config_fields_and_unknown_preset_are_named():
    with pytest.raises(ValueError, match=r"config lacks \['vocab_size'\]"):
        param_table({k: v for k, v in LLAMA_2_7B.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="unknown preset 'llama-9'"):
        param_table("llama-9")
