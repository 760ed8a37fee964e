"""Training-side behaviour of the model: gradient checkpointing, gradients through 4-bit layers, peft key names."""

import pytest
import torch
import torch.nn.functional as F
from helpers_models import hf_tiny_model, random_ids, save_hf

from nibblora.models import DecoderLayer, LlamaForCausalLM, ModelConfig, load_model

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def loss_and_grads(model, ids, mask=None):
    model.zero_grad()
    logits = model(ids[:, :-1], attention_mask=None if mask is None else mask[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def count_layer_forwards(model):
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("with_padding", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(with_padding):
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).train()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(ids)
    if with_padding:
        mask[1, :3] = 0
    loss_plain, grads_plain = loss_and_grads(model, ids, mask if with_padding else None)
    model.gradient_checkpointing_enable()
    calls = count_layer_forwards(model)
    loss_ckpt, grads_ckpt = loss_and_grads(model, ids, mask if with_padding else None)
    # Each layer but the last ran again in backward: recomputed. The last one's backward follows the loss at once,
    # so it keeps its activations instead.
    assert len(calls) == 2 * CONFIG.num_hidden_layers - 1
    recomputed = [0] * CONFIG.num_hidden_layers
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: recomputed.__setitem__(i, recomputed[i] + 1))
    loss_and_grads(model, ids, mask if with_padding else None)
    assert recomputed == [2] * (CONFIG.num_hidden_layers - 1) + [1]
    assert torch.equal(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) == len(list(model.parameters()))
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=0)


def test_gradient_checkpointing_is_off_in_eval_mode_and_can_be_disabled():
    model = LlamaForCausalLM(CONFIG, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    calls = count_layer_forwards(model.eval())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert len(calls) == CONFIG.num_hidden_layers
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_gradient_checkpointing_reaches_parameters_when_embeddings_are_frozen():
    # The LoRA case: frozen embeddings mean the first layer's input needs no grad; non-reentrant checkpointing
    # still propagates gradients to the layer's parameters.
    model = LlamaForCausalLM(CONFIG, gradient_checkpointing=True).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    model(torch.randint(0, 64, (1, 6))).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_checkpointing_does_not_recompute_when_a_kv_cache_is_in_use():
    from nibblora.models import KVCache

    model = LlamaForCausalLM(CONFIG, gradient_checkpointing=True).train()
    calls = count_layer_forwards(model)
    cache = KVCache()
    model(torch.zeros(1, 4, dtype=torch.long), past_key_values=cache).sum().backward()
    assert len(calls) == CONFIG.num_hidden_layers and cache.get_seq_length() == 4


def test_a_randomly_initialised_model_uses_transformers_init():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    assert torch.equal(model.model.norm.weight, torch.ones(32))
    assert abs(float(model.lm_head.weight.detach().std()) - 0.02) < 0.002
    assert isinstance(model.model.layers[0], DecoderLayer)


def test_gradients_flow_to_the_input_through_4bit_layers(tmp_path):
    model = load_model(save_hf(hf_tiny_model("llama"), tmp_path), quantize="nf4").train()
    model.gradient_checkpointing_enable()
    embeddings = model.model.embed_tokens.weight
    model(random_ids(1, 6)).sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)  # inside peft/transformers
def test_peft_adapter_keys_name_our_modules(tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_tiny_model("qwen2")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets))
    keys = list(peft.get_peft_model_state_dict(peft_model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    ours = load_model(save_hf(hf_tiny_model("qwen2"), tmp_path))
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}
    assert len(modules) == 7 * 2
    for name in modules:
        assert isinstance(ours.get_submodule(name), torch.nn.Linear), name


# Three small layers, an MLP wider than the hidden size: what the checkpointing tests below train.
THREE_LAYERS = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=90,
)


def three_layer_model(checkpointing: bool, lora_dropout: float | None) -> LlamaForCausalLM:
    """THREE_LAYERS from seed 1 in train mode; lora_dropout not None: LoRA r 4 on every projection with B drawn
    (B = 0 would make every A gradient 0)."""
    from nibblora.lora import inject_lora

    torch.manual_seed(1)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(THREE_LAYERS), gradient_checkpointing=checkpointing)
    if lora_dropout is not None:
        inject_lora(model, "all-linear", r=4, alpha=8, dropout=lora_dropout)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model.train()


def test_selective_checkpointing_gives_the_same_gradients_as_full_and_none():
    """keep_mlp_layers changes what is recomputed, never the numbers: gradients equal full checkpointing's and no
    checkpointing's (float32, LoRA on every projection and a trainable base both)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 90, (2, 17))
    labels = ids.clone()
    labels[:, :5] = -100
    for lora in (True, False):
        grads = []
        for checkpointing, keep in ((False, 0), (True, 0), (True, 1), (True, -1)):
            model = three_layer_model(checkpointing, 0.0 if lora else None)
            model.model.keep_mlp_layers = keep
            loss, _ = model(ids, labels=labels)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        for other in grads[1:]:
            assert other.keys() == grads[0].keys()
            for name in grads[0]:
                torch.testing.assert_close(other[name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_packed_documents_see_only_themselves_when_separated():
    """With separate_documents, a row packing two documents (position_ids restarting) gives each document the
    logits it gets alone, and the summed loss of the packed row is the sum of the documents' losses; without it,
    the second document attends to the first (transformers' SDPA behaviour, checked in test_models_parity)."""
    import torch

    from nibblora.models import LlamaForCausalLM, ModelConfig

    hf = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=90,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf)).eval()
    first, second = torch.randint(0, 90, (1, 7)), torch.randint(0, 90, (1, 9))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    alone = torch.cat([model(first), model(second)], dim=1)
    model.model.separate_documents = True
    together = model(packed, position_ids=positions)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    labels = packed.clone()
    labels[0, 7] = -100  # the second document's first token is not predicted from the first document
    loss, n = model(packed, position_ids=positions, labels=labels)
    loss_first, n_first = model(first, labels=first)
    loss_second, n_second = model(second, labels=second)
    assert n == n_first + n_second
    torch.testing.assert_close(loss, loss_first + loss_second, rtol=1e-5, atol=1e-5)
    model.model.separate_documents = False
    crossed = model(packed, position_ids=positions)
    assert (crossed[:, 7:] - alone[:, 7:]).abs().max() > 1e-3


def test_a_document_mask_is_saved_once_for_every_layer():
    """The additive mask is built once per forward; SDPA saves it as it is, so backward holds one copy, not one per
    layer."""
    import torch

    from nibblora.models import LlamaForCausalLM, ModelConfig

    hf = dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
    )
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf)).train()
    model.model.separate_documents = True
    seq = 64
    ids = torch.randint(0, 50, (1, seq))
    positions = torch.cat([torch.arange(30), torch.arange(34)])[None]
    big = {}

    def pack(t):
        if t.dim() == 4 and t.shape[-2:] == (seq, seq):
            big[t.untyped_storage().data_ptr()] = t.shape
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, position_ids=positions)
    assert len(big) == 1


def test_a_recomputed_layer_skips_its_down_projection_and_keeps_the_gradients(monkeypatch):
    """With checkpointing, a layer's recomputation in backward only rebuilds what its functions save; the MLP's down
    projection output is not among it, so its matmul runs once per layer (forward), not again in the recompute.
    LoRA with dropout on every projection: gradients equal those without checkpointing."""
    from nibblora.lora import group

    down_matmuls = []
    real = group.base_linear

    def counting(x2, weight, state, dtype):
        if weight.shape == (64, 160):
            down_matmuls.append(1)
        return real(x2, weight, state, dtype)

    monkeypatch.setattr(group, "base_linear", counting)
    ids = torch.randint(0, 90, (2, 13), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = three_layer_model(checkpointing, 0.2)
        down_matmuls.clear()
        loss, _ = model(ids, labels=ids)
        loss.backward()
        assert len(down_matmuls) == 3  # forward only: the two recomputed layers skip it
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
