"""On a CUDA device the model, 4-bit loading, training and generation agree with the CPU path."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers_models import hf_tiny_model, random_ids, save_hf
from safetensors.torch import save_file

from nibblora.lora import NF4Linear
from nibblora.models import KVCache, generate, load_model

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def checkpoint(request, tmp_path_factory):
    return save_hf(hf_tiny_model(request.param), tmp_path_factory.mktemp(request.param))


def test_float32_logits_and_kv_cache_on_cuda_equal_cpu(checkpoint):
    cpu, gpu = load_model(checkpoint), load_model(checkpoint, device="cuda")
    assert gpu.lm_head.weight.device.type == "cuda"
    ids = random_ids(2, 16)
    cache = KVCache()
    with torch.no_grad():
        expected = cpu(ids)
        full = gpu(ids.cuda())
        steps = torch.cat(
            [gpu(ids[:, :9].cuda(), past_key_values=cache)]
            + [gpu(ids[:, t : t + 1].cuda(), past_key_values=cache) for t in range(9, 16)],
            dim=1,
        )
    torch.testing.assert_close(full.cpu(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(steps.cpu(), expected, atol=1e-4, rtol=0)


def test_nf4_quantized_on_cuda_has_the_cpu_bytes_and_close_logits(checkpoint):
    cpu = load_model(checkpoint, dtype=torch.bfloat16, quantize="nf4")
    gpu = load_model(checkpoint, dtype=torch.bfloat16, quantize="nf4", device="cuda")
    cpu_sd, gpu_sd = cpu.state_dict(), gpu.state_dict()
    assert cpu_sd.keys() == gpu_sd.keys()
    for key in cpu_sd:
        assert torch.equal(cpu_sd[key], gpu_sd[key].cpu()), key
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).float().cpu(), cpu(ids).float(), atol=5e-2, rtol=0)


def test_a_saved_4bit_checkpoint_loads_onto_cuda(checkpoint, tmp_path):
    quantized = load_model(checkpoint, quantize="nf4")
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {k: v.clone() for k, v in quantized.state_dict().items()}  # layers share code tables: copy them
    save_file(tensors, tmp_path / "model.safetensors")
    gpu = load_model(tmp_path, device="cuda")
    assert isinstance(gpu.model.layers[0].mlp.up_proj, NF4Linear)
    ids = random_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).cpu(), quantized(ids), atol=1e-4, rtol=0)


def test_bf16_nf4_training_step_with_checkpointing_gives_the_plain_gradients_on_cuda(checkpoint):
    model = load_model(checkpoint, dtype=torch.bfloat16, quantize="nf4", device="cuda").train()
    ids = random_ids(2, 16).cuda()

    def grads():
        model.zero_grad()
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    recomputed = grads()
    assert plain.keys() == recomputed.keys() and "model.embed_tokens.weight" in plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-2, rtol=0)


def test_greedy_generation_on_cuda_equals_cpu(checkpoint):
    prompts = random_ids(2, 6)
    cpu = generate(load_model(checkpoint), prompts, max_new_tokens=10, eos_token_id=[])
    gpu = generate(load_model(checkpoint, device="cuda"), prompts, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(gpu.cpu(), cpu)
    sampled = generate(
        load_model(checkpoint, device="cuda"), prompts, 10, do_sample=True, top_p=0.9, seed=0, eos_token_id=[]
    )
    again = generate(
        load_model(checkpoint, device="cuda"), prompts, 10, do_sample=True, top_p=0.9, seed=0, eos_token_id=[]
    )
    assert torch.equal(sampled, again)
