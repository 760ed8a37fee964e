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
@pytest.mark.parametrize("kernel,kv_tokens", [("auto", None), ("segment", 96), ("gathered", None)])
def test_mixed_batches_equal_each_adapter_alone(tmp_path, kernel, kv_tokens):
    torch.set_num_threads(1)
    base = tiny_model(seed=3)
    adapters = random_adapters(tmp_path, module_shapes(base), 50, seed=7)
    engine = Engine(copy.deepcopy(base), EngineConfig(max_loras=8, max_cpu_loras=16, max_num_seqs=12,
                                                      max_num_batched_tokens=48, block_size=4,
                                                      kv_cache_tokens=kv_tokens, max_model_len=64,
                                                      lora_kernel=kernel))
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
