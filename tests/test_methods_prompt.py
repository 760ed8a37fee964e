"""Prompt tuning (nibblora.methods.prompt_tuning): virtual input embeddings, peft's PROMPT_TUNING format both ways."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers_methods import IDS, logits, nib_model, train_steps, twins

from nibblora.errors import AdapterError
from nibblora.methods import (
    inject_prompt_tuning,
    load_adapter,
    load_prefix_tuning,
    load_prompt_tuning,
    remove_prompt_tuning,
    save_adapter,
    trainable_parameters,
)

peft = pytest.importorskip("peft", reason="peft is not installed; the interoperability tests need it")
N = 4
MASK = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])  # the second row left-padded


def _peft_prompt(hf, tmp_path, init="RANDOM", **kwargs):
    torch.manual_seed(0)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init=init, **kwargs)
    pm = peft.get_peft_model(hf, config).eval()
    pm.save_pretrained(tmp_path / "peft_prompt")
    return pm


def test_trains_only_the_virtual_tokens_and_the_loss_falls(tmp_path):
    model = nib_model(tmp_path)
    tuning = inject_prompt_tuning(model, N, seed=0)
    assert list(trainable_parameters(model)) == ["prompt_tuning.embedding.weight"]
    assert logits(model).shape == (2, 10, 128)  # the virtual positions are dropped
    losses = train_steps(model, [tuning.embedding.weight], IDS, steps=25, lr=0.1)
    assert losses[-1] < losses[0] - 0.2, losses
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name == "prompt_tuning.embedding.weight"), name
    remove_prompt_tuning(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_labels_loss_covers_the_first_real_token(tmp_path):
    model = nib_model(tmp_path)
    inject_prompt_tuning(model, N, seed=1)
    with torch.no_grad():
        loss_sum, n = model(IDS, labels=IDS)
        out = model(IDS)
    # The last virtual token predicts the first real one (peft's labels: -100 for the virtual tokens, then the
    # input's), so every real token is supervised; the later ones match the returned logits' cross-entropy.
    assert n == IDS.numel()
    later = F.cross_entropy(out[:, :-1].flatten(0, 1), IDS[:, 1:].flatten(), reduction="sum")
    assert float(loss_sum) > float(later) > 0


def test_inits(tmp_path):
    model = nib_model(tmp_path)
    emb = model.model.embed_tokens.weight
    tuning = inject_prompt_tuning(model, 5, init="text", init_token_ids=[7, 9])
    assert torch.equal(tuning.embedding.weight, emb[[7, 9, 7, 9, 7]])
    remove_prompt_tuning(model)
    tuning = inject_prompt_tuning(model, 3, init="sample_vocab", seed=0)
    rows = [int((emb - row).abs().sum(-1).argmin()) for row in tuning.embedding.weight]
    assert torch.equal(tuning.embedding.weight, emb[rows])
    remove_prompt_tuning(model)
    with pytest.raises(AdapterError, match="init_token_ids"):
        inject_prompt_tuning(model, 3, init="text")


def test_save_load_identical_logits_and_generation(tmp_path):
    model = nib_model(tmp_path)
    inject_prompt_tuning(model, N, seed=2)
    want = logits(model, attention_mask=MASK)
    save_adapter(model, tmp_path / "p")
    other = nib_model(tmp_path)
    load_adapter(other, tmp_path / "p")
    assert torch.equal(logits(other, attention_mask=MASK), want)
    # Greedy generation through the KV cache equals step-by-step argmax over full forwards.
    out = other.generate(IDS[:1], max_new_tokens=4, eos_token_id=[])
    seq = IDS[:1]
    for _ in range(4):
        seq = torch.cat((seq, logits(other, seq)[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, seq)


def test_peft_saves_nibblora_loads(tmp_path):
    hf, model = twins(tmp_path)
    pm = _peft_prompt(hf, tmp_path)
    load_prompt_tuning(model, tmp_path / "peft_prompt")
    for mask in (None, MASK):
        expected = pm(input_ids=IDS, attention_mask=mask).logits[:, N:]
        torch.testing.assert_close(
            logits(model, attention_mask=mask)[mask.bool() if mask is not None else ...],
            expected.detach()[mask.bool() if mask is not None else ...],
            rtol=1e-5,
            atol=1e-5,
        )
    with torch.no_grad():
        loss_sum, n = model(IDS, labels=IDS)
    torch.testing.assert_close(loss_sum / n, pm(input_ids=IDS, labels=IDS).loss.detach(), rtol=1e-5, atol=1e-5)
    got = model.generate(IDS[:1], max_new_tokens=5, eos_token_id=[])
    want = pm.generate(input_ids=IDS[:1], max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(got[:, -5:], want[:, -5:])


def test_nibblora_saves_peft_loads(tmp_path):
    hf, model = twins(tmp_path)
    inject_prompt_tuning(model, N, init="text", init_token_ids=[3, 1, 4, 1, 5])
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 64
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    torch.testing.assert_close(logits(model), pm(input_ids=IDS).logits[:, N:].detach(), rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path):
    model = nib_model(tmp_path)  # max_position_embeddings 256
    with pytest.raises(AdapterError, match="overflow the model's context of 256"):
        inject_prompt_tuning(model, 256)
    inject_prompt_tuning(model, 8, seed=0)
    with pytest.raises(AdapterError, match=r"8 virtual tokens \+ 250 real tokens = 258 positions overflow"):
        logits(model, torch.zeros(1, 250, dtype=torch.long))
    save_adapter(model, tmp_path / "p")
    with pytest.raises(AdapterError, match="peft_type is 'PROMPT_TUNING', not 'PREFIX_TUNING'"):
        load_prefix_tuning(nib_model(tmp_path), tmp_path / "p")
    with pytest.raises(AdapterError, match="already carries virtual tokens"):
        inject_prompt_tuning(model, 2)
    wrong = nib_model(tmp_path, hidden_size=32, intermediate_size=64)
    with pytest.raises(AdapterError, match="token_dim 64 .* is not the model's hidden size 32"):
        load_prompt_tuning(wrong, tmp_path / "p")
