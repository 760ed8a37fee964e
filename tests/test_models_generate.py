"""generate(): greedy output equals transformers', sampling is reproducible and filtered, EOS stops rows."""

import math

import pytest
import torch
from helpers_models import hf_tiny_model, random_ids, save_hf

from nibblora.models import filter_logits, generate, load_model

NEW = 12


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    hf = hf_tiny_model(request.param)
    return hf, load_model(save_hf(hf, tmp_path_factory.mktemp(request.param)))


def test_greedy_output_equals_transformers_generate(pair):
    hf, ours = pair
    prompts = random_ids(2, 6, seed=11)
    expected = hf.generate(prompts, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, prompts, max_new_tokens=NEW, eos_token_id=[])
    assert got.shape == (2, 6 + NEW)
    assert torch.equal(got, expected)


def test_left_padded_greedy_batch_equals_each_prompt_alone_and_transformers(pair):
    hf, ours = pair
    long, short = random_ids(1, 7, seed=12)[0], random_ids(1, 4, seed=13)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    got = generate(ours, batch, max_new_tokens=NEW, attention_mask=mask, eos_token_id=[])
    alone_long = generate(ours, long[None], max_new_tokens=NEW, eos_token_id=[])
    alone_short = generate(ours, short[None], max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(got[0], alone_long[0])
    assert torch.equal(got[1, 3:], alone_short[0])
    expected = hf.generate(
        batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(got, expected)


def test_model_generate_method_is_the_generate_function(pair):
    _, ours = pair
    prompts = random_ids(1, 5, seed=14)
    assert torch.equal(
        ours.generate(prompts, max_new_tokens=4, eos_token_id=[]), generate(ours, prompts, 4, eos_token_id=[])
    )


def test_sampling_with_a_seed_is_reproducible_and_differs_across_seeds(pair):
    _, ours = pair
    prompts = random_ids(2, 5, seed=15)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, eos_token_id=[])
    a = generate(ours, prompts, seed=1, **kwargs)
    b = generate(ours, prompts, seed=1, **kwargs)
    c = generate(ours, prompts, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :5], prompts)


def test_top_k_of_one_samples_the_greedy_sequence(pair):
    _, ours = pair
    prompts = random_ids(2, 5, seed=16)
    greedy = generate(ours, prompts, max_new_tokens=NEW, eos_token_id=[])
    sampled = generate(
        ours, prompts, max_new_tokens=NEW, do_sample=True, top_k=1, temperature=3.0, seed=0, eos_token_id=[]
    )
    assert torch.equal(sampled, greedy)


def test_tiny_top_p_samples_the_greedy_sequence(pair):
    _, ours = pair
    prompts = random_ids(1, 5, seed=17)
    greedy = generate(ours, prompts, max_new_tokens=NEW, eos_token_id=[])
    sampled = generate(ours, prompts, max_new_tokens=NEW, do_sample=True, top_p=1e-6, seed=3, eos_token_id=[])
    assert torch.equal(sampled, greedy)


def test_eos_finishes_a_row_which_is_then_padded_and_generation_stops_when_all_finish(pair):
    _, ours = pair
    prompts = random_ids(2, 5, seed=18)
    free = generate(ours, prompts, max_new_tokens=NEW, eos_token_id=[])
    eos = int(free[0, 5 + 2])  # row 0's third new token
    got = generate(ours, prompts, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=-1)
    expected_rows = []
    for row in free:
        new = row[5:].tolist()
        cut = new.index(eos) + 1 if eos in new else len(new)
        expected_rows.append(new[:cut])
    length = max(len(r) for r in expected_rows)
    expected = torch.tensor([r + [-1] * (length - len(r)) for r in expected_rows])
    assert torch.equal(got[:, 5:], expected)


def test_generation_stops_at_once_when_the_first_token_is_eos(pair):
    _, ours = pair
    prompts = random_ids(1, 5, seed=19)
    first = int(generate(ours, prompts, max_new_tokens=1, eos_token_id=[])[0, -1])
    assert generate(ours, prompts, max_new_tokens=NEW, eos_token_id=[first, 127]).shape == (1, 6)


def test_generate_restores_training_mode(pair):
    _, ours = pair
    ours.train()
    try:
        generate(ours, random_ids(1, 3), max_new_tokens=2)
        assert ours.training
    finally:
        ours.eval()


def test_filter_logits_keeps_the_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    inf = float("-inf")
    assert torch.equal(filter_logits(logits, top_k=2), torch.tensor([[inf, 3.0, 2.0, inf]]))
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.5, 0.05, 0.3, 0.15]
    logits = torch.tensor([[math.log(p) for p in probs]])
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, False, True, False]]


def test_filter_logits_divides_by_temperature():
    logits = torch.tensor([[1.0, -2.0]])
    assert torch.equal(filter_logits(logits, temperature=0.5), torch.tensor([[2.0, -4.0]]))


def test_bad_sampling_arguments_are_refused(pair):
    _, ours = pair
    prompts = random_ids(1, 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(ours, prompts, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(ours, prompts, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        generate(ours, prompts[0])
