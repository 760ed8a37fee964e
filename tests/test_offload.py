"""Activation offloading (models/offload.py): with gradient checkpointing, the layer inputs but the last wait in
host memory until backward. On a CPU the copies go into ordinary host buffers (the path these tests exercise: which
tensors move, the pool, prefetch order, bit-identical numbers); the `cuda` tests check the pinned, side-stream path."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers_train import tiny_checkpoint, tiny_config, tiny_rows

from nibblora.lora import inject_lora
from nibblora.memory import estimate_memory
from nibblora.memory.cli import main as memory_main
from nibblora.models import LlamaForCausalLM, ModelConfig
from nibblora.models.offload import HostBufferPool
from nibblora.train import ConfigError, config_from_dict, train

LAYERS, HIDDEN, VOCAB = 4, 64, 90
TINY = dict(
    model_type="llama",
    hidden_size=HIDDEN,
    intermediate_size=160,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
)


def tiny_model(offload: bool, quantize: str | None = None, keep_mlp_layers: int = 0, device: str = "cpu"):
    """The same float32 LoRA model every call (B nonzero, so every adapter gets a gradient), checkpointing on."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(TINY), gradient_checkpointing=True).to(device)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.1, quantize_base=quantize)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.model.offload_activations = offload
    model.model.keep_mlp_layers = keep_mlp_layers
    return model.train()


def batch(seq: int = 17, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


def train_steps(model, seqs=(17, 17)) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(loss, gradients) of one forward + backward per sequence length; dropout draws the same masks every run."""
    results = []
    for seq in seqs:
        ids, labels = batch(seq, model.device.type)
        torch.manual_seed(5)
        loss, _ = model(ids, labels=labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        for p in model.parameters():
            p.grad = None
    return results


def input_bytes(seq: int = 17, dtype_bytes: int = 4) -> int:
    """One layer input [2, seq, hidden]."""
    return 2 * seq * HIDDEN * dtype_bytes


@pytest.mark.parametrize("keep_mlp_layers", [0, -1], ids=["full-checkpointing", "selective"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_offloading_changes_no_bit_of_the_loss_or_the_gradients(quantize, keep_mlp_layers):
    plain = train_steps(tiny_model(False, quantize, keep_mlp_layers))
    offloaded = train_steps(tiny_model(True, quantize, keep_mlp_layers))
    for (loss, grads), (loss_off, grads_off) in zip(plain, offloaded, strict=True):
        assert torch.equal(loss, loss_off)
        assert grads.keys() == grads_off.keys() and len(grads) == LAYERS * 7 * 2  # every A and B
        for name in grads:
            assert torch.equal(grads[name], grads_off[name]), name


def layer_inputs_alive_after_forward(model) -> list[bool]:
    """For each layer, whether its input tensor still exists after the forward (before backward)."""
    refs: list[weakref.ref] = []
    # The first norm's input is the layer's input, on both the full and the selective path.
    hooks = [
        layer.input_layernorm.register_forward_pre_hook(lambda module, args: refs.append(weakref.ref(args[0])))
        for layer in model.model.layers
    ]
    ids, labels = batch()
    loss, _ = model(ids, labels=labels)
    for hook in hooks:
        hook.remove()
    gc.collect()
    alive = [ref() is not None for ref in refs]
    loss.backward()
    return alive


@pytest.mark.parametrize("keep_mlp_layers", [0, -1], ids=["full-checkpointing", "selective"])
def test_the_checkpointed_inputs_of_all_layers_but_the_last_leave_the_device(keep_mlp_layers):
    assert layer_inputs_alive_after_forward(tiny_model(False, keep_mlp_layers=keep_mlp_layers)) == [True] * LAYERS
    model = tiny_model(True, keep_mlp_layers=keep_mlp_layers)
    assert layer_inputs_alive_after_forward(model) == [False] * (LAYERS - 1) + [True]
    offloader = model.model.activation_offloader
    # Exactly one tensor per offloaded layer, of the input's size: not cos/sin, the mask, a parameter or anything
    # saved inside a layer.
    assert offloader.offloaded == LAYERS - 1
    assert offloader.pool.buffers == LAYERS - 1
    assert offloader.pool.capacity_bytes == (LAYERS - 1) * input_bytes()
    # Each came back ahead of its layer's backward: prefetched while the layer after it ran its backward.
    assert offloader.prefetched == LAYERS - 1
    assert offloader.pool.in_use == 0


def test_the_pool_is_reused_every_step_and_grows_only_for_a_longer_batch():
    model = tiny_model(True)
    offloader = model.model.activation_offloader

    def step(seq: int) -> None:
        train_steps(model, (seq,))

    step(17)
    pool = offloader.pool
    assert (pool.allocations, pool.buffers) == (LAYERS - 1, LAYERS - 1)
    step(17)
    step(9)  # shorter: fits the buffers there are
    assert offloader.pool is pool and pool.allocations == LAYERS - 1
    assert offloader.offloaded == 3 * (LAYERS - 1)
    step(30)  # longer: each buffer is replaced by a bigger one, never added to
    assert (pool.allocations, pool.buffers) == (2 * (LAYERS - 1), LAYERS - 1)
    assert pool.capacity_bytes == (LAYERS - 1) * input_bytes(30)
    step(30)
    step(17)
    assert pool.allocations == 2 * (LAYERS - 1)


def test_the_pool_hands_out_the_smallest_fitting_buffer_and_swaps_the_largest_free_one_to_grow():
    pool = HostBufferPool(pin=False)
    small, large = pool.acquire(100), pool.acquire(300)
    pool.release(small)
    pool.release(large)
    assert pool.acquire(50) is small
    assert pool.acquire(200) is large
    pool.release(small)
    pool.release(large)
    grown = pool.acquire(1000)  # no free buffer fits: the largest free one (300) is replaced
    assert grown.numel() == 1000 and (pool.buffers, pool.capacity_bytes, pool.allocations) == (2, 1100, 3)
    assert pool.acquire(10) is small and pool.in_use == 2


def test_a_graph_dropped_before_backward_gives_its_buffers_back():
    model = tiny_model(True)
    ids, labels = batch()
    loss, _ = model(ids, labels=labels)
    pool = model.model.activation_offloader.pool
    assert pool.in_use == LAYERS - 1
    del loss
    gc.collect()
    assert pool.in_use == 0


def test_a_retained_graph_brings_the_inputs_back_again_for_a_second_backward():
    model = tiny_model(True)
    ids, labels = batch()
    torch.manual_seed(5)
    loss, _ = model(ids, labels=labels)
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, 2 * once[name], rtol=1e-6, atol=0)


def test_nothing_is_offloaded_without_checkpointing_or_outside_training():
    model = tiny_model(True)
    ids, labels = batch()
    with torch.no_grad():  # evaluation: checkpointing is off, nothing is saved
        model(ids, labels=labels)
    model.eval()
    model(ids, labels=labels)[0].backward()
    model.train()
    model.gradient_checkpointing_disable()
    model(ids, labels=labels)[0].backward()
    assert model.model.activation_offloader.offloaded == 0


def test_a_config_that_offloads_without_checkpointing_is_refused_saying_what_to_do():
    with pytest.raises(ConfigError, match="model.offload_activations .* set model.gradient_checkpointing = true"):
        config_from_dict({"model": {"path": "m", "gradient_checkpointing": False, "offload_activations": True}})
    config = config_from_dict({"model": {"path": "m", "offload_activations": True}})
    assert config.model.offload_activations and config.model.gradient_checkpointing


def test_the_trainer_offloads_when_configured_with_the_same_losses(tmp_path):
    from nibblora.runs import open_run
    from nibblora.train.setup import build_model

    model_dir = tiny_checkpoint(tmp_path / "model")
    rows = tiny_rows(8)
    losses = {}
    for offload in (False, True):
        model = {"gradient_checkpointing": True, "offload_activations": offload}
        config = tiny_config(model_dir, tmp_path / f"run-{offload}", model=model, train={"max_steps": 2})
        assert build_model(config, torch.device("cpu"))[0].model.offload_activations is offload
        losses[offload] = train(config, rows, quiet=True).losses
    assert losses[True] == losses[False]
    with open_run(tmp_path / "run-True") as store:
        assert any("saves no memory on a CPU" in line["message"] for line in store.logs())


def test_the_estimate_keeps_three_layer_inputs_on_a_gpu_and_counts_the_rest_as_pinned_host_memory():
    kw = dict(r=16, batch_size=2, seq_len=2048, device="cuda")
    plain = estimate_memory("llama-2-7b", "qlora", **kw)
    offloaded = estimate_memory("llama-2-7b", "qlora", offload_activations=True, **kw)
    layer_input = 2 * 2048 * 4096 * 2  # tokens x hidden x bf16
    assert plain.components["activations"] - offloaded.components["activations"] == (32 - 3) * layer_input
    assert offloaded.pinned_host_bytes == (32 - 1) * layer_input and plain.pinned_host_bytes == 0
    assert offloaded.inputs["offload_activations"] is True
    # On a CPU host memory is the device memory; without checkpointing there is nothing to offload.
    for other in (dict(kw, device="cpu"), dict(kw, gradient_checkpointing=False)):
        base = estimate_memory("llama-2-7b", "qlora", **other)
        same = estimate_memory("llama-2-7b", "qlora", offload_activations=True, **other)
        assert same.components == base.components and same.pinned_host_bytes == 0


def test_the_memory_cli_takes_offload_activations(capsys):
    args = ["--model", "llama-2-7b", "--seq-len", "2048", "--device", "cuda"]
    assert memory_main(args) == 0
    assert "pinned host" not in capsys.readouterr().out
    assert memory_main([*args, "--offload-activations"]) == 0
    assert "pinned host (offload)" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_on_cuda_offloading_keeps_the_numbers_through_pinned_buffers_allocated_once(quantize):
    plain = train_steps(tiny_model(False, quantize, device="cuda"), (17, 17))
    model = tiny_model(True, quantize, device="cuda")
    offloaded = train_steps(model, (17,))
    pool = model.model.activation_offloader.pool
    assert pool.pin and pool.buffers == LAYERS - 1
    buffer = pool.acquire(1)  # a free buffer of the pool's
    assert buffer.is_pinned()
    pool.release(buffer)
    host_stats = getattr(torch.cuda, "host_memory_stats", dict)
    requests = host_stats().get("active_requests.allocated")
    offloaded += train_steps(model, (17,))
    torch.cuda.synchronize()
    # Step 2 asks for no pinned memory: not from the pool, nor from PyTorch's pinned allocator.
    assert pool.allocations == LAYERS - 1
    if requests is not None:
        assert host_stats()["active_requests.allocated"] == requests
    assert model.model.activation_offloader.prefetched == 2 * (LAYERS - 1)
    for (loss, grads), (loss_off, grads_off) in zip(plain, offloaded, strict=True):
        # The same kernels on the same values; attention backward kernels may reorder sums, hence a tolerance.
        torch.testing.assert_close(loss_off, loss, rtol=1e-6, atol=0)
        assert grads.keys() == grads_off.keys()
        for name in grads:
            torch.testing.assert_close(grads_off[name], grads[name], rtol=1e-5, atol=1e-7)
