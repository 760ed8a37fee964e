"""load_model on hostile config.json files: a few hundred seeded variants of a real tiny checkpoint's config (wrong
types, zeros, negatives, NaN, huge numbers, nulls, strings, lost keys, broken nested objects). Each one either
loads or fails with ONE line of nibblora's own exceptions; a failure caused by config.json names the file and the
key. Never a ZeroDivisionError, TypeError, AttributeError or an allocation the file asked for."""

from __future__ import annotations

import json
import random

import pytest
from helpers_models import hf_tiny_model, save_hf

from nibblora.errors import CheckpointError, InputError, NibbloraError
from nibblora.models import ModelConfig, load_model
from nibblora.models.config import MAX_LAYERS, ROPE_SCHEMA, SCHEMA

SEED = 20261130
VARIANTS = 300

HOSTILE_VALUES = [
    0,
    -1,
    1,
    3,
    7,
    2.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    None,
    "",
    "eight",
    "4",
    "\ud800",
    "x" * 5000,
    "line\nbreak",
    [],
    [1],
    [1, 2],
    ["a"],
    [None],
    {},
    {"a": 1},
    2**31,
    2**64,
    -(2**70),
    10**6,
    MAX_LAYERS + 1,
]
NESTED = {
    "rope_scaling": ROPE_SCHEMA,
    "rope_parameters": ROPE_SCHEMA,
    "quantization_config": {
        "quant_method": None,
        "load_in_4bit": None,
        "load_in_8bit": None,
        "bnb_4bit_quant_type": None,
        "bnb_4bit_use_double_quant": None,
        "bnb_4bit_compute_dtype": None,
    },
}
NESTED_STARTS = {
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
}
NESTED_VALUES = HOSTILE_VALUES + ["llama3", "linear", "yarn", "default", "bitsandbytes", "gptq", "nf4", "int8"]


def mutate(config: dict, rng: random.Random) -> tuple[dict, list[str]]:
    """1 to 3 random changes to a copy of `config`; returns it and the keys changed (parent.key for nested)."""
    config = json.loads(json.dumps(config))
    changed = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.random()
        if kind < 0.2:
            key = rng.choice(sorted(NESTED))
            nested = dict(NESTED_STARTS[key])
            sub = rng.choice(sorted(NESTED[key]))
            if rng.random() < 0.25:
                nested.pop(sub, None)
            else:
                nested[sub] = rng.choice(NESTED_VALUES)
            config[key] = nested
            changed.append(f"{key}.{sub}")
        elif kind < 0.3:
            key = rng.choice(sorted(SCHEMA))
            config.pop(key, None)
            changed.append(key)
        else:
            key = rng.choice(sorted(SCHEMA))
            config[key] = rng.choice(HOSTILE_VALUES)
            changed.append(key)
    return config, changed


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A real tiny llama and qwen2 checkpoint (transformers-saved)."""
    return [save_hf(hf_tiny_model(family), tmp_path_factory.mktemp(family)) for family in ("llama", "qwen2")]


def test_hostile_configs_load_or_fail_with_one_line_of_our_own_errors(checkpoints, tmp_path):
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "config error": 0, "other input error": 0}
    for i in range(VARIANTS):
        source = checkpoints[i % len(checkpoints)]
        base = json.loads((source / "config.json").read_text())
        config, changed = mutate(base, rng)
        directory = tmp_path / f"v{i}"
        directory.mkdir()
        (directory / "model.safetensors").symlink_to(source / "model.safetensors")
        # Python's json writes NaN / Infinity and reads them back: hostile files can hold them.
        (directory / "config.json").write_text(json.dumps(config))
        case = (
            f"variant {i}: changed {changed}: {json.dumps({k: config.get(k) for k in changed if '.' not in k})[:300]}"
        )
        try:
            load_model(directory)
        except NibbloraError as err:
            assert isinstance(err, InputError), case
            message = str(err)
            assert message and "\n" not in message, f"{case}: not one line: {message!r}"
            if message.startswith(f"{directory / 'config.json'}:"):
                outcomes["config error"] += 1
                if len(changed) == 1:
                    named = changed[0].split(".")
                    assert any(part in message for part in named), f"{case}: the message names no key: {message}"
            else:
                outcomes["other input error"] += 1
        except Exception as err:  # the failure this test exists to catch: show the case, not just the type
            raise AssertionError(f"{case}: {type(err).__name__}: {err}") from err
        else:
            outcomes["loaded"] += 1
    # The generator must really be hostile, and some variants must stay loadable (it is not refusing everything).
    assert outcomes["config error"] > VARIANTS // 2, outcomes
    assert outcomes["loaded"] > 0 and outcomes["other input error"] > 0, outcomes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 0}, "num_key_value_heads is 0; expected a positive integer"),
        ({"quantization_config": "nf4"}, "quantization_config is 'nf4'; expected an object or null"),
        ({"vocab_size": None}, "missing required field 'vocab_size'"),
        ({"vocab_size": "128"}, "vocab_size is '128'; expected a positive integer"),
        ({"hidden_size": 64.0}, "hidden_size is 64.0; expected a positive integer"),
        ({"num_attention_heads": True}, "num_attention_heads is true; expected a positive integer"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan; expected a finite number > 0"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false'; expected true or false"),
        ({"eos_token_id": [1, "2"]}, "eos_token_id is a list of 2; expected a 64-bit integer or a list of them"),
        ({"num_hidden_layers": 10**9}, f"num_hidden_layers is 1000000000; expected a positive integer <= {MAX_LAYERS}"),
        ({"head_dim": 7}, "head_dim is 7 (head_dim, or hidden_size // num_attention_heads); expected an even number"),
        ({"num_attention_heads": 128, "head_dim": None}, "head_dim is 0"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters.low_freq_factor is missing"),
        (
            {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": "2"}},
            "rope_scaling.factor is '2'; expected a finite number",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2, "high_freq_factor": 2}},
            "rope_parameters.high_freq_factor equals low_freq_factor",
        ),
        ({"quantization_config": {"quant_method": 4}}, "quantization_config.quant_method is 4"),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": "yes"}},
            "quantization_config.load_in_4bit is 'yes'; expected true or false",
        ),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries; expected one per layer (2)"),
        ({"architectures": "LlamaForCausalLM"}, "architectures is 'LlamaForCausalLM'; expected a list of strings"),
    ],
)
def test_each_bad_field_is_a_checkpoint_error_naming_the_file_and_key(checkpoints, tmp_path, change, message):
    base = json.loads((checkpoints[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
    (tmp_path / "model.safetensors").symlink_to(checkpoints[0] / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ")
    assert message in str(info.value)


def test_a_model_config_built_in_code_is_checked_the_same_way():
    from nibblora.errors import ConfigError

    with pytest.raises(ConfigError, match="ModelConfig: num_key_value_heads is 0; expected a positive integer"):
        ModelConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=0,
        )
    with pytest.raises(ConfigError, match="ModelConfig: head_dim is 3"):
        ModelConfig(vocab_size=8, hidden_size=6, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)


def test_config_json_nested_100000_deep_is_a_checkpoint_error(checkpoints, tmp_path):
    (tmp_path / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp_path / "model.safetensors").symlink_to(checkpoints[0] / "model.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
