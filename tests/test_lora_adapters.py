"""peft-format adapters: nibblora reads what peft writes and peft reads what nibblora writes, logits equal."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from nibblora.errors import AdapterError
from nibblora.lora import inject_lora, load_adapter, lora_modules, read_adapter_config, save_adapter

peft = pytest.importorskip("peft", reason="peft is not installed; the interoperability tests need it")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

VOCAB = 64


def tiny_llama(seed: int = 0, name: str | None = None):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    if name:
        model.config._name_or_path = name
    return model


def peft_adapter_dir(tmp_path, **lora_kwargs):
    """An adapter made and saved by peft on tiny_llama(), with random (non-zero) B."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    kwargs.update(lora_kwargs)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    peft_model.save_pretrained(tmp_path)
    return peft_model


IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 60, 12], [3, 3, 41, 8, 0, 19, 22, 5]])


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"v_proj": 2, "model.layers.1.mlp.down_proj": 6}, "alpha_pattern": {"q_proj": 3}},
        {"target_modules": "all-linear", "r": 3, "lora_alpha": 5},
    ],
    ids=["plain", "rslora", "rank_alpha_pattern", "all_linear"],
)
def test_peft_saved_adapter_loads_into_nibblora_with_same_logits(tmp_path, lora_kwargs):
    peft_model = peft_adapter_dir(tmp_path, **lora_kwargs)
    with torch.no_grad():
        expected = peft_model(IDS).logits
    model = tiny_llama()
    load_adapter(model, tmp_path)
    with torch.no_grad():
        got = model(IDS).logits
    base = tiny_llama()(IDS).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_peft_rank_pattern_sets_nibblora_ranks(tmp_path):
    peft_adapter_dir(tmp_path, rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6})
    model = tiny_llama()
    layers = load_adapter(model, tmp_path)
    ranks = {name: layer.adapter.r for name, layer in layers.items()}
    assert ranks["model.layers.0.self_attn.v_proj"] == 2
    assert ranks["model.layers.1.mlp.down_proj"] == 6
    assert ranks["model.layers.0.mlp.down_proj"] == 4
    assert ranks["model.layers.1.self_attn.q_proj"] == 4


def nibblora_adapter(rslora=False, rank_pattern=None, alpha_pattern=None):
    model = tiny_llama(name="tiny/llama")
    inject_lora(
        model,
        ["q_proj", "k_proj", "o_proj", "up_proj"],
        r=4,
        alpha=6,
        rslora=rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.adapter.lora_B.normal_(std=0.5)
    return model.eval()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"rslora": True}, {"rank_pattern": {"k_proj": 2}, "alpha_pattern": {"model.layers.1.mlp.up_proj": 10}}],
    ids=["plain", "rslora", "rank_alpha_pattern"],
)
def test_nibblora_saved_adapter_loads_into_peft_with_same_logits(tmp_path, kwargs):
    model = nibblora_adapter(**kwargs)
    with torch.no_grad():
        expected = model(IDS).logits
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(name="tiny/llama"), tmp_path).eval()
    with torch.no_grad():
        got = peft_model(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_saved_adapter_config_has_peft_keys_sorted(tmp_path):
    save_adapter(nibblora_adapter(rank_pattern={"k_proj": 2}), tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert list(config) == sorted(config)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny/llama"
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (4, 6, False, False)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "up_proj"]
    assert config["rank_pattern"] == {"model.layers.0.self_attn.k_proj": 2, "model.layers.1.self_attn.k_proj": 2}
    for key in ("bias", "fan_in_fan_out", "modules_to_save", "alpha_pattern", "init_lora_weights", "lora_dropout"):
        assert key in config


def test_saved_adapter_keys_and_shapes_follow_peft(tmp_path):
    save_adapter(nibblora_adapter(rank_pattern={"k_proj": 2}), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 2)
    assert tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"].shape == (4, 32)
    assert len(tensors) == 2 * 4 * 2


def test_nibblora_round_trip_restores_logits(tmp_path):
    model = nibblora_adapter(rslora=True)
    save_adapter(model, tmp_path)
    other = tiny_llama(name="tiny/llama")
    load_adapter(other, tmp_path)
    assert torch.equal(other(IDS).logits, model(IDS).logits)


def test_loader_ignores_unknown_config_keys(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    config = read_adapter_config(tmp_path)
    config["some_future_peft_option"] = {"x": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    frozen = tiny_llama(name="tiny/llama")
    load_adapter(frozen, tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = tiny_llama(name="tiny/llama")
    load_adapter(trainable, tmp_path, trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".adapters.default.lora_" in n for n in names)


def test_load_fails_on_base_model_name_mismatch(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    with pytest.raises(ValueError, match="trained on base model 'tiny/llama' but this model is 'other/model'"):
        load_adapter(tiny_llama(name="other/model"), tmp_path)
    load_adapter(tiny_llama(name="other/model"), tmp_path, check_base_model=False)


def test_load_fails_on_module_the_model_lacks(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"targets module 'model\.layers\.7\.mlp\.up_proj'.*different base model"):
        load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


def test_load_fails_on_shape_mismatch_naming_the_key(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    tensors[key] = torch.zeros(33, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"'{key}' has shape \[33, 4\].*needs \[32, 4\]"):
        load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


def test_load_fails_on_missing_key_naming_it(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    del tensors[key]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"missing {key}"):
        load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


def test_load_fails_when_a_targeted_module_has_no_weights(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.up_proj"
    del tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"missing {prefix}.lora_A.weight: target_modules"):
        load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


def test_load_rejects_dora_adapters(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    config = read_adapter_config(tmp_path)
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


def test_gpt2_conv1d_adapter_from_peft_loads_with_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=32)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(
        transformers.GPT2LMHeadModel(config).eval(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    load_adapter(model, tmp_path)
    torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_onto_a_4bit_base_like_peft_on_the_dequantized_weights(tmp_path):
    from nibblora.lora import NF4Linear

    peft_adapter_dir(tmp_path)
    quantized, reference = tiny_llama(), tiny_llama()
    for name, module in list(quantized.named_modules()):
        if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj"):
            nf4 = NF4Linear.from_linear(module, compute_dtype=torch.float32)
            parent, _, child = name.rpartition(".")
            setattr(quantized.get_submodule(parent), child, nf4)
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(nf4.dequantized_weight(torch.float32))
    load_adapter(quantized, tmp_path)
    expected = peft.PeftModel.from_pretrained(reference, tmp_path).eval()(IDS).logits
    torch.testing.assert_close(quantized(IDS).logits, expected, rtol=1e-5, atol=1e-5)


# --- one reader, values refused rather than coerced (issues 13 and 14) -------------------------------------------


def _edit_config(directory, **changes):
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"target_modules": ["nothing_here"]},
            "which target_modules ['nothing_here'] in adapter_config.json does not select",
        ),
        ({"target_modules": []}, "key 'target_modules' is an empty list"),
        ({"use_rslora": "false"}, "key 'use_rslora' must be true or false, got 'false'"),
        ({"r": 4.5}, "key 'r' must be a positive integer, got 4.5"),
        ({"lora_alpha": float("nan")}, "key 'lora_alpha' must be a finite number, got nan"),
        ({"peft_type": "IA3"}, "key 'peft_type' is 'IA3'"),
    ],
    ids=["targets_nothing", "targets_empty", "rslora_string", "r_float", "alpha_nan", "ia3"],
)
def test_load_refuses_config_values_naming_file_and_key(tmp_path, changes, message):
    save_adapter(nibblora_adapter(), tmp_path)
    _edit_config(tmp_path, **changes)
    model = tiny_llama(name="tiny/llama")
    with pytest.raises(AdapterError, match=re.escape(message)) as info:
        load_adapter(model, tmp_path)
    assert str(tmp_path) in str(info.value) and not lora_modules(model)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint32, torch.int64, torch.int8, torch.bool])
def test_load_refuses_integer_adapter_tensors_naming_them(tmp_path, dtype):
    save_adapter(nibblora_adapter(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = (tensors[key] * 1000).to(dtype)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=rf"tensor '{re.escape(key)}' is [IUB]\w+; adapter weights are floating"):
        load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_load_refuses_non_finite_values_naming_the_tensor_and_leaves_the_model_alone(tmp_path, value):
    save_adapter(nibblora_adapter(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][5, 2] = value
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama(name="tiny/llama")
    with pytest.raises(
        AdapterError,
        match=rf"tensor '{re.escape(key)}' holds 1 non-finite value\(s\) \(\w+ at index "
        r"\[5, 2\]\)",
    ):
        load_adapter(model, tmp_path)
    assert not lora_modules(model)


def test_load_errors_on_a_damaged_file_name_it(tmp_path):
    save_adapter(nibblora_adapter(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AdapterError, match=rf"^reading adapter weights: {re.escape(str(path))}: truncated"):
        load_adapter(tiny_llama(name="tiny/llama"), tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_adapters_load(tmp_path, dtype):
    model = nibblora_adapter()
    save_adapter(model, tmp_path)
    tensors = {k: v.to(dtype) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    other = tiny_llama(name="tiny/llama")
    layers = load_adapter(other, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(layers["model.layers.0.self_attn.q_proj"].adapter.lora_B, tensors[key].float())


def test_read_adapter_files_groups_keys_with_ranks_and_scales(tmp_path):
    from nibblora.lora.adapters import read_adapter_files

    save_adapter(nibblora_adapter(rslora=True, rank_pattern={"k_proj": 2}), tmp_path)
    files = read_adapter_files(tmp_path)
    k = files.modules["model.layers.0.self_attn.k_proj"]
    assert (k.rank, k.transpose, k.embedding) == (2, False, False)
    assert k.scale == pytest.approx(6 / 2**0.5)
    assert files.read(k.a_key).shape == (2, 32) and files.config.use_rslora is True
    assert files.replacements == {} and len(files.modules) == 8
