"""Adapter folders the server refuses, with the tensor or key named; the host LRU stays bounded."""

from __future__ import annotations

import copy
import gc
import json
import random

import pytest
import torch
from helpers_serve import PROJECTIONS, module_shapes, tiny_model, write_adapter
from safetensors.torch import save_file

from nibblora.errors import AdapterError
from nibblora.serve import Engine, EngineConfig, read_lora_folder
from nibblora.serve.adapter_files import AdapterWeights


@pytest.fixture(scope="module")
def shapes():
    return module_shapes(tiny_model())


def test_reads_ranks_scaling_and_patterns(tmp_path, shapes):
    folder = write_adapter(
        tmp_path / "a",
        shapes,
        8,
        ["q_proj", "down_proj"],
        seed=0,
        alpha=16,
        rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 4.0},
    )
    weights = read_lora_folder(folder, shapes)
    assert set(weights.modules) == {
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")
    }
    q = weights.modules["model.layers.0.self_attn.q_proj"]
    down = weights.modules["model.layers.1.mlp.down_proj"]
    assert (q.rank, down.rank) == (8, 2)
    assert q.scaling == pytest.approx(16 / 8**0.5) and down.scaling == pytest.approx(4 / 2**0.5)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "case,needle",
    [
        ("dora_config", "use_dora"),
        ("dora_tensor", "lora_magnitude_vector"),
        ("shape", "model.layers.1.self_attn.q_proj.lora_B.weight"),
        ("unknown_target", "lm_head"),
        ("missing_pair", "model.layers.0.self_attn.q_proj.lora_B.weight"),
        ("not_lora", "prompt_embeddings"),
        ("broken_file", "not a readable safetensors"),
        ("missing_folder", "is not a directory"),
        ("bad_json", "not valid JSON"),
    ],
)
def test_refused_adapters_name_the_problem(tmp_path, shapes, case, needle):
    edits = {
        "dora_tensor": lambda t: t.__setitem__(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64)
        ),
        "shape": lambda t: t.__setitem__(
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", torch.zeros(63, 4)
        ),
        "unknown_target": lambda t: t.update(
            {
                "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                "base_model.model.lm_head.lora_B.weight": torch.zeros(128, 4),
            }
        ),
        "missing_pair": lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
        "not_lora": lambda t: t.__setitem__("prompt_embeddings", torch.zeros(4, 64)),
    }
    folder = write_adapter(tmp_path / "a", shapes, 4, ["q_proj"], seed=0, tensor_edit=edits.get(case))
    if case == "dora_config":
        _edit_config(folder, use_dora=True)
    elif case == "broken_file":
        (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    elif case == "missing_folder":
        folder = tmp_path / "nowhere"
    elif case == "bad_json":
        (folder / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match="reading adapter") as info:
        read_lora_folder(folder, shapes)
    assert needle in str(info.value)


def test_rank_above_the_slot_size_is_refused(tmp_path):
    base = tiny_model()
    engine = Engine(
        copy.deepcopy(base), EngineConfig(max_loras=2, max_cpu_loras=2, max_lora_rank=8, kv_cache_tokens=512)
    )
    folder = write_adapter(tmp_path / "a", module_shapes(base), 16, ["v_proj"], seed=0)
    with pytest.raises(AdapterError, match="rank 16.*--max-lora-rank 8"):
        engine.add_adapter("big", folder)


def test_host_memory_holds_at_most_max_cpu_loras(tmp_path):
    base = tiny_model()
    shapes = module_shapes(base)
    engine = Engine(copy.deepcopy(base), EngineConfig(max_loras=2, max_cpu_loras=3, kv_cache_tokens=512))
    for i in range(12):
        engine.add_adapter(f"a{i}", write_adapter(tmp_path / f"a{i}", shapes, 16, ["q_proj"], seed=i))
    assert len(engine.store.names()) == 12
    assert engine.store.host_count() == 3
    one = read_lora_folder(tmp_path / "a0", shapes).nbytes
    assert engine.store.host_bytes() == 3 * one
    # an evicted adapter is read back from disk in the background when a request needs it
    [result] = engine.generate([[1, 2, 3]], _greedy(2), adapters=["a0"])
    assert len(result.token_ids) == 2 and engine.store.stats.host_misses == 1


def test_adapter_memory_is_bounded_by_the_cache_sizes_not_by_the_adapters_known(tmp_path):
    """40 adapters registered and all of them used, through a host LRU of 5 and 3 device slots: the host copies
    alive never exceed the LRU (plus the reads in flight, at most one per slot), their bytes never exceed 5 of the
    largest, and the device slots keep their size from construction."""
    base = tiny_model()
    shapes = module_shapes(base)
    config = EngineConfig(
        max_loras=3, max_cpu_loras=5, max_lora_rank=16, max_num_seqs=8, kv_cache_tokens=1024, block_size=4
    )
    engine = Engine(copy.deepcopy(base), config)
    slot_bytes = engine.store.device_bytes()
    per_module = sum(16 * (fan_in + fan_out) * 4 + 4 + 8 for fan_in, fan_out in shapes.values())
    assert slot_bytes == 3 * per_module  # max_loras x max_lora_rank, float32, plus scaling and rank per slot
    folders = [write_adapter(tmp_path / f"a{i}", shapes, 4 + i % 13, list(PROJECTIONS), seed=i) for i in range(40)]
    for i, folder in enumerate(folders):
        engine.add_adapter(f"a{i}", folder)
    largest = max(read_lora_folder(folder, shapes).nbytes for folder in folders)
    rng = random.Random(0)
    for i in range(60):
        prompt = [rng.randrange(128) for _ in range(rng.randint(2, 12))]
        engine.add_request(prompt, _greedy(rng.randint(1, 4)), adapter=f"a{(i * 7) % 40}")

    peak_host, steps = 0, 0
    while engine.has_work():
        engine.step()
        steps += 1
        peak_host = max(peak_host, engine.store.host_bytes())
        assert engine.store.host_count() <= 5
        assert engine.store.device_bytes() == slot_bytes
        alive = sum(type(o) is AdapterWeights for o in gc.get_objects())
        assert alive <= 5 + 3, f"{alive} adapters' host copies alive after step {steps}"
    assert peak_host <= 5 * largest
    assert engine.store.stats.host_misses >= 35  # evicted adapters were read again when their turn came
    assert engine.metrics.requests_finished == {"length": 60}
    engine.close()


def _greedy(n):
    from nibblora.serve import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)


def test_broken_folder_after_registration_fails_only_its_requests(tmp_path):
    base = tiny_model()
    shapes = module_shapes(base)
    engine = Engine(copy.deepcopy(base), EngineConfig(max_loras=1, max_cpu_loras=1, kv_cache_tokens=512))
    engine.add_adapter("a", write_adapter(tmp_path / "a", shapes, 4, ["q_proj"], seed=0))
    engine.add_adapter("b", write_adapter(tmp_path / "b", shapes, 4, ["q_proj"], seed=1))  # evicts a from host
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a" / "adapter_model.safetensors"))
    bad = engine.add_request([1, 2], _greedy(2), adapter="a")
    good = engine.add_request([1, 2], _greedy(2), adapter="b")
    finished = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[bad].finish_reason == "error" and "not a LoRA weight" in finished[bad].error
    assert finished[good].finish_reason == "length"
