"""The serving engine's results equal each adapter run alone on the plain model (nibblora.lora.load_adapter)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers_serve import module_shapes, random_adapters, reference_model, tiny_model

from nibblora.serve import Engine, EngineConfig, SamplingParams


def _reference_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Float32 logits that produced each generated token, [len(generated), vocab], from one full forward."""
    ids = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        logits = model(ids).float()[0]
    return logits[len(prompt) - 1 :]


def _reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(prompt) :].tolist()


# ("segment", 96): a KV cache smaller than the batch wants, so sequences are preempted and recomputed.
@pytest.mark.parametrize(
    "kernel,kv_tokens", [("auto", None), ("segment", 96), ("gathered", None), ("native", None), ("native", 96)]
)
def test_mixed_batches_equal_each_adapter_alone(tmp_path, kernel, kv_tokens):
    torch.set_num_threads(1)
    base = tiny_model(seed=3)
    adapters = random_adapters(tmp_path, module_shapes(base), 50, seed=7)
    engine = Engine(
        copy.deepcopy(base),
        EngineConfig(
            max_loras=8,
            max_cpu_loras=16,
            max_num_seqs=12,
            max_num_batched_tokens=48,
            block_size=4,
            kv_cache_tokens=kv_tokens,
            max_model_len=64,
            lora_kernel=kernel,
        ),
    )
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    rng = random.Random(11)
    names = list(adapters)
    requests = []
    for i in range(70):
        adapter = None if i % 6 == 0 else rng.choice(names)
        prompt = [rng.randrange(128) for _ in range(rng.randint(1, 40))]
        requests.append((prompt, adapter, rng.randint(1, 6)))
    params = [SamplingParams(max_tokens=n, temperature=0.0, return_logits=True) for _, _, n in requests]
    results = engine.generate([p for p, _, _ in requests], params, [a for _, a, _ in requests])

    references = {}
    for (prompt, adapter, n), result in zip(requests, results, strict=True):
        if adapter not in references:
            references[adapter] = reference_model(base, None if adapter is None else adapters[adapter])
        ref = references[adapter]
        assert result.finish_reason == "length"
        assert len(result.token_ids) == n
        want = _reference_logits(ref, prompt, result.token_ids)
        got = torch.stack(result.logits)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert result.token_ids == _reference_greedy(ref, prompt, n)
    # every slot was reused: 50 adapters through 8 slots, and the host LRU re-read evicted ones
    assert engine.store.stats.device_misses > 8
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    if kv_tokens is not None:
        assert engine.metrics.preemptions > 0
    engine.close()


def _engine(base, **kw):
    config = dict(max_loras=4, max_cpu_loras=8, kv_cache_tokens=2048, block_size=4)
    config.update(kw)
    return Engine(copy.deepcopy(base), EngineConfig(**config))


def test_4bit_base_equals_load_adapter_on_the_same_4bit_model(tmp_path):
    from helpers_serve import save_served_model

    from nibblora.lora import load_adapter
    from nibblora.models import load_model

    torch.set_num_threads(1)
    _, folder = save_served_model(tmp_path / "m")
    engine_model = load_model(folder, quantize="nf4")
    shapes = module_shapes(engine_model)
    adapters = random_adapters(tmp_path / "ad", shapes, 4, seed=2)
    engine = Engine(engine_model, EngineConfig(max_loras=2, kv_cache_tokens=1024, max_model_len=256))
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [1, 2, 3, 4, 5], [20]]
    names = [*adapters, None]
    params = SamplingParams(max_tokens=3, temperature=0.0, return_logits=True, ignore_eos=True)
    results = engine.generate(prompts, params, names)
    for prompt, name, result in zip(prompts, names, results, strict=True):
        ref = load_model(folder, quantize="nf4")
        if name is not None:
            load_adapter(ref, adapters[name], check_base_model=False)
        # save_served_model scales lm_head by 20, so float32 rounding in the logits is 20x that of the decoder
        torch.testing.assert_close(
            torch.stack(result.logits), _reference_logits(ref, prompt, result.token_ids), rtol=0, atol=20 * 1e-5
        )


def test_seeded_sampling_does_not_depend_on_the_batch():
    base = tiny_model(seed=1)
    engine = _engine(base)
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=5)
    [alone] = engine.generate([[1, 2, 3]], params)
    rng = random.Random(0)
    others = [[rng.randrange(128) for _ in range(rng.randint(1, 9))] for _ in range(5)]
    mixed = engine.generate([*others, [1, 2, 3]], [SamplingParams(max_tokens=4, temperature=1.0)] * 5 + [params])
    assert mixed[-1].token_ids == alone.token_ids
    unseeded = engine.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=8, temperature=1.0, seed=None))
    assert all(len(r.token_ids) == 8 for r in unseeded)


def test_stop_tokens_and_stop_strings(tmp_path):
    from helpers_serve import save_served_model
    from tokenizers import Tokenizer

    model, folder = save_served_model(tmp_path / "m")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    engine = Engine(model, EngineConfig(max_loras=1, kv_cache_tokens=1024, max_model_len=256), tokenizer=tok)
    prompt = tok.encode("The quick brown fox").ids
    [free] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert free.finish_reason == "length" and free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    stop_id = free.token_ids[4]
    [by_token] = engine.generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id])
    )
    assert by_token.finish_reason == "stop"
    assert by_token.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    assert stop.strip(), free.text
    [by_text] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert by_text.finish_reason == "stop"
    assert by_text.text == free.text[: free.text.index(stop)]


def test_logprobs_are_log_softmax_of_the_logits():
    base = tiny_model(seed=4)
    engine = _engine(base)
    rid = engine.add_request([3, 4, 5], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, return_logits=True))
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.request_id == rid]
    tokens = [t for o in outs for t in o.logprobs]
    logits = [x for o in outs for x in o.logits]
    for token, row in zip(tokens, logits, strict=True):
        logprobs = torch.log_softmax(row, -1)
        assert token.logprob == pytest.approx(float(logprobs[token.token_id]), abs=1e-6)
        assert token.top_logprobs[0][0] == token.token_id


def test_one_hot_adapter_does_not_starve_the_others(tmp_path):
    base = tiny_model(seed=2)
    adapters = random_adapters(tmp_path, module_shapes(base), 3, seed=1)
    engine = _engine(base, max_num_seqs=2, max_num_batched_tokens=16)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    hot = [engine.add_request([1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0), "ad0") for _ in range(30)]
    cold = [engine.add_request([4, 5], SamplingParams(max_tokens=6, temperature=0.0), name) for name in ("ad1", "ad2")]
    finished_order = []
    while engine.has_work():
        finished_order += [o.request_id for o in engine.step() if o.finished]
    # round-robin admission: both cold requests are among the first few to finish, not after 30 hot ones
    assert max(finished_order.index(c) for c in cold) < 6
    assert len(finished_order) == len(hot) + len(cold)


def test_long_prefill_does_not_stall_running_decodes():
    base = tiny_model(seed=2)
    engine = _engine(base, max_num_seqs=4, max_num_batched_tokens=16)
    decoding = engine.add_request([1, 2], SamplingParams(max_tokens=40, temperature=0.0))
    engine.step()  # its prefill, and first token
    engine.add_request([7] * 120, SamplingParams(max_tokens=2, temperature=0.0))
    tokens_per_step = []
    for _ in range(6):  # 120 prompt tokens need ~8 steps of 15 leftover budget: still prefilling
        outs = engine.step()
        tokens_per_step.append(sum(len(o.new_token_ids) for o in outs if o.request_id == decoding))
    assert tokens_per_step == [1] * 6
    assert engine.metrics.batch_tokens.count == 7


def test_abort_frees_blocks_and_slot(tmp_path):
    base = tiny_model(seed=2)
    adapters = random_adapters(tmp_path, module_shapes(base), 1, seed=1)
    engine = _engine(base)
    engine.add_adapter("ad0", adapters["ad0"])
    rid = engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=50, temperature=0.0), "ad0")
    engine.step()
    engine.step()
    assert engine.cache.allocator.num_free < engine.cache.allocator.num_blocks
    engine.abort(rid)
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.request_id == rid] == ["abort"]
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    assert engine.store.slot_refs == [0] * 4 and not engine.has_work()


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["auto", "segment", "gathered"])
def test_mixed_batches_on_cuda_equal_each_adapter_alone(tmp_path, kernel):
    """The CUDA path (pinned host copies, slot copies on a side stream, both kernels) against the single-adapter
    reference on the same GPU, float32: 12 adapters through 3 slots, so slots are rewritten while in use nearby."""
    base = tiny_model(seed=4)
    adapters = random_adapters(tmp_path, module_shapes(base), 12, seed=9)
    engine = Engine(
        copy.deepcopy(base).cuda(),
        EngineConfig(
            max_loras=3,
            max_cpu_loras=6,
            max_num_seqs=8,
            kv_cache_tokens=2048,
            block_size=4,
            max_model_len=64,
            lora_kernel=kernel,
        ),
    )
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    rng = random.Random(5)
    names = [None, *adapters]
    requests = [([rng.randrange(128) for _ in range(rng.randint(1, 20))], names[i % len(names)]) for i in range(26)]
    params = SamplingParams(max_tokens=4, temperature=0.0, return_logits=True, ignore_eos=True)
    results = engine.generate([p for p, _ in requests], params, [a for _, a in requests])
    for (prompt, adapter), result in zip(requests, results, strict=True):
        ref = reference_model(base, None if adapter is None else adapters[adapter]).cuda()
        want = _reference_logits(ref, prompt, result.token_ids)
        torch.testing.assert_close(torch.stack(result.logits).to(want.device), want, rtol=0, atol=1e-4)
    assert engine.store.stats.device_misses > 3
    engine.close()
