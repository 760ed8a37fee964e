"""The adapter-config schema for the other methods (parse_any_adapter_config) and load_adapter's dispatch."""

import json

import pytest
import torch
from helpers_methods import nib_model
from safetensors.torch import save_file

from nibblora.errors import AdapterError
from nibblora.lora import load_adapter as load_lora
from nibblora.lora.adapter_config import (
    BottleneckAdapterConfig,
    IA3AdapterConfig,
    PromptLearningConfig,
    parse_adapter_config,
    parse_any_adapter_config,
)
from nibblora.methods import inject_ia3, load_adapter, save_adapter


def test_each_peft_type_gets_its_config():
    assert isinstance(
        parse_any_adapter_config({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []}),
        IA3AdapterConfig,
    )
    prompt = parse_any_adapter_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 8})
    assert isinstance(prompt, PromptLearningConfig) and prompt.token_dim == 8
    prefix = parse_any_adapter_config(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "prefix_projection": True}
    )
    assert prefix.prefix_projection and prefix.num_layers is None
    assert isinstance(
        parse_any_adapter_config(
            {
                "peft_type": "BOTTLENECK",
                "variant": "pfeiffer",
                "bottleneck_size": 4,
                "non_linearity": "relu",
                "target_modules": ["model.layers.0.mlp"],
            }
        ),
        BottleneckAdapterConfig,
    )


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"peft_type": "PROMPT_TUNING"}, "key 'num_virtual_tokens' is missing"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}, "'num_virtual_tokens' must be a positive integer"),
        (
            {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "MAGIC"},
            "'prompt_tuning_init' must be one of",
        ),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "num_transformer_submodules": 2}, "decoder-only"),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "token_dim": 4.5}, "'token_dim' must be a positive"),
        ({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "subset"),
        ({"peft_type": "IA3", "target_modules": "(("}, "not a valid regular expression"),
        (
            {
                "peft_type": "BOTTLENECK",
                "variant": "houlsby",
                "bottleneck_size": 4,
                "non_linearity": "tanh",
                "target_modules": ["x"],
            },
            "'non_linearity' must be one of",
        ),
        ({"peft_type": "ADALORA"}, "key 'peft_type' is 'ADALORA'"),
    ],
)
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(AdapterError, match=needle):
        parse_any_adapter_config(raw, "x/adapter_config.json")


def test_lora_readers_point_other_methods_here(tmp_path):
    with pytest.raises(AdapterError, match="this is an IA3 adapter: load it with nibblora.methods.load_adapter"):
        parse_adapter_config({"peft_type": "IA3"})
    model = nib_model(tmp_path)
    inject_ia3(model)
    save_adapter(model, tmp_path / "ia3")
    with pytest.raises(AdapterError, match="IA3 adapter: load it with nibblora.methods.load_adapter"):
        load_lora(nib_model(tmp_path), tmp_path / "ia3")


def test_non_finite_and_unknown_tensors_are_refused(tmp_path):
    model = nib_model(tmp_path)
    inject_ia3(model)
    folder = save_adapter(model, tmp_path / "ia3")
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    bad = torch.ones(32, 1)
    bad[3, 0] = float("nan")
    save_file({key: bad}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="holds 1 non-finite value"):
        load_adapter(nib_model(tmp_path), folder)
    save_file({key.replace("ia3_l", "lora_A.weight"): torch.ones(4, 64)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="unknown tensor .*ia3_l keys only"):
        load_adapter(nib_model(tmp_path), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
