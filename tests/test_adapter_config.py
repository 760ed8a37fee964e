"""The adapter_config.json schema: wrong types and values are refused naming the file and key, never coerced."""

from __future__ import annotations

import math
import re

import pytest

from nibblora.errors import AdapterError, InputError
from nibblora.lora.adapter_config import parse_adapter_config
from nibblora.lora.adapters import lora_config_from_peft

GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def parse(**changes):
    raw = dict(GOOD)
    for key, value in changes.items():
        if value is _DROP:
            raw.pop(key)
        else:
            raw[key] = value
    return parse_adapter_config(raw, "/ad/adapter_config.json")


_DROP = object()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("r", 0, "key 'r' must be a positive integer, got 0"),
        ("r", -4, "key 'r' must be a positive integer, got -4"),
        ("r", None, "key 'r' must be a positive integer, got None"),
        ("r", 4.5, "key 'r' must be a positive integer, got 4.5"),
        ("r", 4.0, "key 'r' must be a positive integer, got 4.0"),
        ("r", "8", "key 'r' must be a positive integer, got '8'"),
        ("r", True, "key 'r' must be a positive integer, got True"),
        ("r", _DROP, "key 'r' is missing"),
        ("lora_alpha", math.nan, "key 'lora_alpha' must be a finite number, got nan"),
        ("lora_alpha", math.inf, "key 'lora_alpha' must be a finite number, got inf"),
        ("lora_alpha", "eight", "key 'lora_alpha' must be a finite number, got 'eight'"),
        ("lora_alpha", 10**400, "key 'lora_alpha' must be a finite number"),
        ("lora_alpha", None, "key 'lora_alpha' must be a finite number, got None"),
        ("lora_alpha", _DROP, "key 'lora_alpha' is missing"),
        ("use_rslora", "false", "key 'use_rslora' must be true or false, got 'false'"),
        ("use_rslora", 1, "key 'use_rslora' must be true or false, got 1"),
        ("use_dora", "true", "key 'use_dora' must be true or false"),
        ("fan_in_fan_out", 0, "key 'fan_in_fan_out' must be true or false, got 0"),
        ("target_modules", 5, "key 'target_modules' must be a string or a list of strings, got 5"),
        ("target_modules", [], "key 'target_modules' is an empty list: it selects no module"),
        ("target_modules", ["q_proj", 3], "key 'target_modules' must be a string or a list of strings"),
        ("target_modules", "model.(q_proj", "key 'target_modules' holds 'model.(q_proj', which is not a valid regular"),
        ("rank_pattern", [1], "key 'rank_pattern' must be an object of module name -> value, got [1]"),
        ("rank_pattern", {"q_proj": 0}, "key 'rank_pattern' must be a positive integer for 'q_proj', got 0"),
        ("rank_pattern", {"q_proj": 2.5}, "key 'rank_pattern' must be a positive integer for 'q_proj', got 2.5"),
        ("rank_pattern", {"q_(proj": 2}, "key 'rank_pattern' holds 'q_(proj' (a key"),
        ("alpha_pattern", {"q_proj": "x"}, "key 'alpha_pattern' must be a finite number for 'q_proj', got 'x'"),
        ("alpha_pattern", {"q_proj": math.nan}, "key 'alpha_pattern' must be a finite number for 'q_proj', got nan"),
        ("alpha_pattern", "q_proj", "key 'alpha_pattern' must be an object"),
        ("lora_dropout", 1.5, "key 'lora_dropout' must be in [0, 1), got 1.5"),
        ("lora_dropout", "0.1", "key 'lora_dropout' must be a finite number"),
        ("bias", "some", "key 'bias' must be one of 'none', 'all', 'lora_only', got 'some'"),
        ("modules_to_save", "lm_head", "key 'modules_to_save' must be a list of strings, got 'lm_head'"),
        ("layers_to_transform", [0, "1"], "key 'layers_to_transform' must be a layer index or a list"),
        ("base_model_name_or_path", 7, "key 'base_model_name_or_path' must be a string or null, got 7"),
        ("peft_type", "IA3", "key 'peft_type' is 'IA3': nibblora reads 'LORA' adapters only"),
        ("peft_type", 3, "key 'peft_type' is 3: nibblora reads 'LORA' adapters only"),
    ],
)
def test_bad_values_are_refused_naming_file_and_key(key, value, message):
    with pytest.raises(AdapterError) as info:
        parse(**{key: value})
    text = str(info.value)
    assert text.startswith("reading adapter config: /ad/adapter_config.json: ")
    assert message in text and "\n" not in text


def test_errors_are_input_errors_and_value_errors():
    with pytest.raises(InputError):
        parse(r=4.5)
    with pytest.raises(ValueError):
        parse(r=4.5)


def test_good_config_keeps_values_exactly_and_tolerates_unknown_keys():
    config = parse(
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3.5},
        future_key={"a": 1},
        layers_to_transform=1,
        lora_dropout=None,
        bias=None,
        use_dora=None,
    )
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (8, 16.0, True, False)
    assert config.target_modules == ("q_proj", "v_proj") and config.layers_to_transform == (1,)
    assert config.raw["future_key"] == {"a": 1} and config.narrowed
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 3.5 / math.sqrt(8)  # rsLoRA
    assert config.scaling_for("model.layers.0.self_attn.v_proj") == 16.0 / math.sqrt(2)


def test_missing_peft_type_means_lora_and_non_object_is_refused():
    raw = dict(GOOD)
    del raw["peft_type"]
    assert parse_adapter_config(raw).peft_type == "LORA"
    with pytest.raises(AdapterError, match="must hold a JSON object, got list"):
        parse_adapter_config([1, 2], "/ad/adapter_config.json")


def test_target_modules_selection_follows_peft():
    listed = parse(target_modules=["q_proj"])
    assert listed.selects("model.layers.0.self_attn.q_proj") and not listed.selects("model.layers.0.self_attn.k_proj")
    regex = parse(target_modules=r".*\.(q|v)_proj")
    assert regex.selects("model.layers.3.self_attn.v_proj") and not regex.selects("model.layers.3.mlp.up_proj")
    assert parse(target_modules="all-linear").selects("anything")


def test_lora_config_from_peft_validates_instead_of_coercing():
    config = lora_config_from_peft(dict(GOOD, use_rslora=True, rank_pattern={"v_proj": 2}))
    assert (config.r, config.alpha, config.rslora, config.rank_pattern) == (8, 16.0, True, {"v_proj": 2})
    with pytest.raises(AdapterError, match="key 'use_rslora' must be true or false"):
        lora_config_from_peft(dict(GOOD, use_rslora="false"))
    with pytest.raises(AdapterError, match="key 'r' must be a positive integer, got 4.5"):
        lora_config_from_peft(dict(GOOD, r=4.5))
    with pytest.raises(AdapterError, match="'target_modules' is missing"):
        lora_config_from_peft({"r": 8, "lora_alpha": 16})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": True}, "rank r must be a positive integer, got True"),
        ({"alpha": math.nan}, "alpha must be a finite number, got nan"),
        ({"alpha": "16"}, "alpha must be a finite number, got '16'"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer, got 0"),
        ({"alpha_pattern": {"q_proj": math.inf}}, "alpha_pattern['q_proj'] must be a finite number, got inf"),
    ],
)
def test_lora_config_refuses_values_that_would_poison_the_scaling(kwargs, message):
    from nibblora.errors import ConfigError
    from nibblora.lora import LoRAConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        LoRAConfig(**kwargs)
