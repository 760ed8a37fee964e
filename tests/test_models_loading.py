"""load_model: 4-bit checkpoints from transformers + bitsandbytes, quantize-on-load, errors that name the problem."""

import json

import pytest
import torch
from helpers_models import hf_logits, hf_tiny_model, random_ids, save_hf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nibblora.checkpoint import CheckpointError, MissingTensorError
from nibblora.lora import NF4Linear
from nibblora.models import UnsupportedModelError, load_model

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Both sides dequantize the same codes to float32 and multiply: the logits agree to float32 rounding.
ATOL_4BIT = 1e-4


def bnb_config(quant_type="nf4"):
    transformers = pytest.importorskip("transformers")
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def reference_mode(model):
    """Train mode (these models have no dropout): bitsandbytes' Linear4bit then dequantizes to float32 and runs a
    plain matmul. In eval mode on CPUs with AVX512-BF16 it switches to a fused kernel that computes in bfloat16,
    which is bitsandbytes' speed trade-off, not a reference (it differs by ~2e-3 here)."""
    return model.train()


def hf_4bit_from(directory, family_cls, quant_type="nf4"):
    """transformers quantizing a full-precision checkpoint with bitsandbytes on load (CPU). Skips only where
    bitsandbytes is not installed; any failure of an installed bitsandbytes fails the test."""
    pytest.importorskip("bitsandbytes", reason="the reference 4-bit model comes from bitsandbytes")
    return reference_mode(
        family_cls.from_pretrained(
            directory, quantization_config=bnb_config(quant_type), device_map="cpu", dtype=torch.float32
        )
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def fp_checkpoint(request, tmp_path_factory):
    hf = hf_tiny_model(request.param)
    return request.param, hf, save_hf(hf, tmp_path_factory.mktemp(f"fp-{request.param}"))


@pytest.fixture(scope="module")
def bnb_checkpoint(fp_checkpoint, tmp_path_factory):
    """A 4-bit checkpoint saved by transformers + bitsandbytes, and the transformers model reloaded from it."""
    family, hf, directory = fp_checkpoint
    quantized = hf_4bit_from(directory, type(hf))
    out = tmp_path_factory.mktemp(f"bnb-{family}")
    quantized.save_pretrained(out)
    reloaded = reference_mode(type(hf).from_pretrained(out, device_map="cpu", dtype=torch.float32))
    return family, reloaded, out


def test_bnb_4bit_checkpoint_loads_into_nf4_layers_with_transformers_logits(bnb_checkpoint):
    _, hf4, directory = bnb_checkpoint
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model = load_model(directory)
    for layer in model.model.layers:
        for name in DECODER_LINEARS:
            assert isinstance(layer.get_submodule(_path(name)), NF4Linear)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(hf4, ids), atol=ATOL_4BIT, rtol=0)


def test_bnb_4bit_checkpoint_round_trips_every_saved_tensor_byte_for_byte(bnb_checkpoint):
    _, _, directory = bnb_checkpoint
    saved = load_file(directory / "model.safetensors")
    ours = load_model(directory).state_dict()
    assert set(ours) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(ours[key].cpu(), tensor), key


def test_quantize_nf4_on_load_matches_transformers_bitsandbytes_quantization(fp_checkpoint):
    family, hf, directory = fp_checkpoint
    hf4 = hf_4bit_from(directory, type(hf))
    model = load_model(directory, quantize="nf4")
    ids = random_ids(2, 12, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(hf4, ids), atol=ATOL_4BIT, rtol=0)
    # The codes themselves are bitsandbytes' codes.
    ours = model.model.layers[1].mlp.down_proj.state_dict()
    theirs = hf4.model.layers[1].mlp.down_proj.state_dict()
    assert torch.equal(ours["weight"], theirs["weight"].view(torch.uint8))


def test_quantize_on_load_replaces_only_decoder_linears(fp_checkpoint):
    family, _, directory = fp_checkpoint
    model = load_model(directory, quantize="fp4", dtype=torch.bfloat16)
    quantized = sorted(name for name, m in model.named_modules() if isinstance(m, NF4Linear))
    assert quantized == sorted(f"model.layers.{i}.{_path(n)}" for i in range(2) for n in DECODER_LINEARS)
    assert model.model.layers[0].self_attn.q_proj.state_dict()["weight.quant_state.bitsandbytes__fp4"].numel() > 0
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        logits = model(random_ids(1, 6))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_an_already_quantized_checkpoint_cannot_be_requantized_to_another_type(bnb_checkpoint):
    _, _, directory = bnb_checkpoint
    with pytest.raises(ValueError, match="already quantized to nf4; it cannot be re-quantized to fp4"):
        load_model(directory, quantize="fp4")


def test_a_non_bitsandbytes_quantization_config_is_refused(tmp_path):
    directory = save_hf(hf_tiny_model("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="quant_method 'gptq' is not supported"):
        load_model(directory)


def _path(linear: str) -> str:
    return f"self_attn.{linear}" if linear.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else f"mlp.{linear}"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf(hf_tiny_model("llama"), tmp_path_factory.mktemp("llama"))


def _rewrite_without(src, dst, drop):
    tensors = load_file(src / "model.safetensors")
    del tensors[drop]
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_a_missing_decoder_tensor_is_named(llama_dir, tmp_path):
    directory = _rewrite_without(llama_dir, tmp_path / "ckpt", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(MissingTensorError, match="has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(directory)


def test_a_missing_untied_lm_head_is_named(llama_dir, tmp_path):
    directory = _rewrite_without(llama_dir, tmp_path / "ckpt", "lm_head.weight")
    with pytest.raises(KeyError, match="has no tensor 'lm_head.weight'"):
        load_model(directory)


def test_a_missing_tensor_is_named_when_quantizing_on_load(llama_dir, tmp_path):
    directory = _rewrite_without(llama_dir, tmp_path / "ckpt", "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(MissingTensorError, match="'model.layers.0.self_attn.k_proj.weight'"):
        load_model(directory, quantize="nf4")


def test_a_tied_checkpoint_that_also_stores_lm_head_loads_with_the_embedding_as_head(tmp_path):
    hf = hf_tiny_model("llama_tied")
    directory = save_hf(hf, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])  # stale copy, ignored
    save_file(tensors, directory / "model.safetensors")
    model = load_model(directory)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf.model.embed_tokens.weight)


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(llama_dir, tmp_path):
    directory = _rewrite_without(llama_dir, tmp_path / "ckpt", "model.norm.weight")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"'model.norm.weight' in model.safetensors has shape \[65\], but the config gives \[64\]"
    ):
        load_model(directory)


def test_a_truncated_weights_file_is_named(llama_dir, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text((llama_dir / "config.json").read_text())
    data = (llama_dir / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"reading {directory}/model.safetensors: not a valid safetensors file"):
        load_model(directory)


def test_missing_config_json_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_model(tmp_path)


def test_bad_arguments_are_refused_before_reading(llama_dir):
    with pytest.raises(ValueError, match="quantize must be None, 'nf4' or 'fp4', got 'int8'"):
        load_model(llama_dir, quantize="int8")
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(llama_dir, dtype=torch.int8)


def test_loading_reads_each_checkpoint_tensor_once_and_builds_no_full_model_first(llama_dir, monkeypatch):
    from nibblora.checkpoint import Checkpoint

    reads = []
    original = Checkpoint.get_tensor
    monkeypatch.setattr(Checkpoint, "get_tensor", lambda self, name: reads.append(name) or original(self, name))
    inits = []
    monkeypatch.setattr(nn.Linear, "reset_parameters", lambda self: inits.append(self.weight.device.type))
    load_model(llama_dir)
    with safe_open(str(llama_dir / "model.safetensors"), "pt") as f:
        assert sorted(reads) == sorted(f.keys())
    # Every module was built on the meta device: nothing was randomly initialised with real memory.
    assert inits == ["meta"] * (7 * 2 + 1)  # 7 linears per layer, 2 layers, lm_head
