"""The memory calculator: the lesson's numbers, and a real CPU run's measured peak within 15% of the estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import save_hf

from nibblora.memory import estimate_memory, lesson_table
from nibblora.memory.cli import main
from nibblora.runs import open_run

PYTHON_PATH = str(Path(__file__).resolve().parents[1] / "python")


def test_full_fine_tuning_costs_16_bytes_per_parameter_plus_activations():
    est = estimate_memory("llama-2-7b", "full", batch_size=1, seq_len=512)
    c = est.components
    assert c["weights"] + c["master_weights"] + c["gradients"] + c["optimizer_states"] == 16 * est.params
    assert 105e9 < est.total_bytes < 115e9  # 6.74 B parameters: 108 GB (7B nominal x 16 = 112 GB)


def test_lora_and_qlora_7b_land_near_16_and_6_gb():
    lora = estimate_memory("llama-2-7b", "lora", r=16)
    qlora = estimate_memory("llama-2-7b", "qlora", r=64)
    assert 13e9 < lora.total_bytes < 17e9
    assert 4e9 < qlora.total_bytes < 7.5e9
    # NF4 with double quantization: 4.127 bits per quantized parameter.
    quantized = qlora.components["weights"] - (qlora.params - 6_476_005_376) * 2
    bits = 8 * (quantized + qlora.components["quant_constants"]) / 6_476_005_376
    assert bits == pytest.approx(4.127, abs=0.01)


def test_cli_without_arguments_prints_the_table_and_explains_columns(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for label in ("1B", "7B", "13B", "70B", "16 B/param", "QLoRA"):
        assert label in out
    assert out == lesson_table() + "\n"
    assert main(["--model", "no-such-preset"]) == 2


def test_estimate_reads_a_config_json_and_the_light_recipe(tmp_path):
    import json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 128,
            }
        )
    )
    est = estimate_memory(tmp_path, "lora", r=8, target_modules=["q_proj", "v_proj"])
    assert est.trainable_params == 2 * 8 * ((64 + 64) + (64 + 32))


def test_measured_peak_of_a_cpu_run_is_within_15_percent_of_the_estimate(tmp_path):
    import transformers

    # Full fine-tuning in float32 of a ~21 M parameter model: large enough that the interpreter's own noise
    # is small beside it.
    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8000,
    )
    save_hf(transformers.LlamaForCausalLM(config), tmp_path / "model")
    rows = "\n".join(json.dumps({"input_ids": [(i * 7 + j) % 8000 for j in range(64)]}) for i in range(8))
    (tmp_path / "train.jsonl").write_text(rows + "\n")
    (tmp_path / "c.toml").write_text(f"""
output_dir = "{tmp_path / "run"}"
[model]
path = "{tmp_path / "model"}"
dtype = "float32"
gradient_checkpointing = false
[data]
train = "{tmp_path / "train.jsonl"}"
batch_size = 2
[train]
mode = "full"
max_steps = 1
grad_accum = 1
device = "cpu"
[checkpoint]
every = 0
""")
    env = dict(os.environ, PYTHONPATH=PYTHON_PATH, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "nibblora.train", str(tmp_path / "c.toml"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with open_run(tmp_path / "run") as store:
        last = store.metrics()[1]
    measured, estimated = last["mem_peak_bytes"], last["mem_estimate_bytes"]
    assert abs(measured - estimated) / estimated < 0.15, (measured, estimated)


def test_a_broken_config_json_is_refused_naming_the_file(tmp_path, capsys):
    from nibblora.memory.cli import main

    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON" in err


CPU_AND_CUDA = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


ONE_LAYER = dict(
    model_type="llama",
    hidden_size=96,
    intermediate_size=224,
    num_hidden_layers=1,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=100,
)
RANK = 4


def one_layer_inputs(mode: str, dtype: str, device: str = "cpu"):
    """A one-layer decoder in `mode` (full: every weight trains; lora / qlora: rank-4 adapters everywhere), an input
    [2, 24, 96] with its RoPE cos / sin, and the storages that are not activations (parameters, buffers, cos, sin)."""
    import torch

    from nibblora.lora import inject_lora
    from nibblora.models import LlamaForCausalLM, ModelConfig

    torch_dtype = getattr(torch, dtype)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(ONE_LAYER)).to(device, torch_dtype)
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject_lora(model, "all-linear", r=RANK, alpha=8, dropout=0.1, quantize_base="nf4" if mode == "qlora" else None)
    model.train()
    x = torch.randn(2, 24, 96, dtype=torch_dtype, device=device, requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(24, device=device)[None].expand(2, -1))
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), cos, sin]}
    # The model is returned too: freed, its storages' addresses (still in `resident`) could be reused by activations.
    return model, model.model.layers[0], x, cos, sin, resident


def saved_bytes(run, resident: set[int]) -> int:
    """Bytes of the tensors `run()` saves for backward, each storage once, leaving out `resident` storages."""
    import torch

    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in resident:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_activations_of_one_layer_are_counted_tensor_by_tensor(mode, dtype, device):
    """layer_activation_bytes is the decoder's own count: every tensor a layer saves for backward, each storage once,
    excluding parameters (RoPE's cos/sin are the model's, counted once in activation_bytes)."""
    import torch

    from nibblora.lora.params import DecoderShape
    from nibblora.memory.estimate import layer_activation_bytes

    _model, layer, x, cos, sin, resident = one_layer_inputs(mode, dtype, device)
    seen = saved_bytes(lambda: layer(x, cos, sin, None), resident)
    e = torch.finfo(x.dtype).bits // 8
    expected = layer_activation_bytes(
        DecoderShape.from_config(ONE_LAYER),
        2 * 24,
        e,
        mode == "full",
        0 if mode == "full" else 7 * RANK,
        fused_norm=device == "cuda",
    )
    if device == "cpu":
        assert seen == expected
    else:  # CUDA attention kernels keep their own small statistics (padded log-sum-exp, RNG state)
        assert seen == pytest.approx(expected, rel=0.03)


def test_estimate_holds_on_a_small_grid_of_real_runs(tmp_path):
    """bench/memory_grid.py's quick share: real `nibblora.train` runs, measured peak within 15% of the estimate."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import memory_grid
    finally:
        sys.path.pop(0)
    for point in memory_grid.QUICK[1:]:  # the full-FT point is the test above
        result = memory_grid.run_point(point, tmp_path, threads=1)
        assert 0.85 <= result["ratio"] <= 1.15, result


def test_meters_never_leave_sampler_threads_behind(tmp_path):
    """A stopped meter's sampler ends, and so does an unstopped one once the meter is garbage: a process that
    trains many times (a test session, a sweep) must not collect threads that poll /proc every 2 ms."""
    import gc
    import threading
    import time

    import torch

    from nibblora.memory.measure import MemoryMeter

    def samplers() -> int:
        return sum(t.name == "nibblora-memory-sampler" and t.is_alive() for t in threading.enumerate())

    before = samplers()
    stopped = MemoryMeter(torch.device("cpu"))
    forgotten = MemoryMeter(torch.device("cpu"))
    assert samplers() == before + 2
    stopped.stop()
    del forgotten
    gc.collect()
    deadline = time.monotonic() + 5
    while samplers() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert samplers() == before


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_activations_of_the_mlp_half_are_counted_tensor_by_tensor(mode, dtype):
    """mlp_activation_bytes is what a layer's MLP half saves (what selective checkpointing keeps), and the attention
    half saves the rest of layer_activation_bytes."""
    import torch

    from nibblora.lora.params import DecoderShape
    from nibblora.memory.estimate import layer_activation_bytes, mlp_activation_bytes

    _model, layer, x, cos, sin, resident = one_layer_inputs(mode, dtype)
    e, full = torch.finfo(x.dtype).bits // 8, mode == "full"
    shape = DecoderShape.from_config(ONE_LAYER)
    mlp = mlp_activation_bytes(shape, 2 * 24, e, full, 0 if full else 3 * RANK)
    assert saved_bytes(lambda: layer.mlp_block(x), resident) == mlp
    whole = layer_activation_bytes(shape, 2 * 24, e, full, 0 if full else 7 * RANK)
    assert saved_bytes(lambda: layer.attention_block(x, cos, sin, None, None), resident) == whole - mlp


def test_keeping_mlp_layers_costs_their_mlp_activations_in_the_estimate():
    from nibblora.memory import estimate_memory

    def activations(keep: int) -> int:
        return estimate_memory("llama-2-7b", "qlora", r=16, seq_len=2048, keep_mlp_layers=keep).components[
            "activations"
        ]

    none, two, every = activations(0), activations(2), activations(-1)
    assert none < two < every
    # Each kept layer adds its MLP half per token: gate(x) and up(x) in bf16 (2 x 2 x 11008 bytes), the norm's
    # float32 input and bf16 output (6 x 4096), the adapters' A(x) (3 x 2 x 16) and 8 bytes: 68,708 bytes, x 2048.
    assert (two - none) / 2 == 2048 * 68_708


def test_a_document_mask_adds_one_batch_by_seq_squared_mask():
    from nibblora.memory import estimate_memory

    plain = estimate_memory("llama-2-7b", "qlora", batch_size=2, seq_len=1024).components["activations"]
    masked = estimate_memory("llama-2-7b", "qlora", batch_size=2, seq_len=1024, document_mask=True)
    assert masked.components["activations"] - plain == 2 * 1024 * 1024 * 2  # bf16


def test_an_explicit_loss_chunk_sizes_the_loss_component():
    from nibblora.memory import estimate_memory

    auto = estimate_memory("llama-3-8b", "qlora", batch_size=1, seq_len=512)
    wide = estimate_memory("llama-3-8b", "qlora", batch_size=1, seq_len=512, loss_chunk_tokens=512)
    # Auto: 512 tokens at hidden 4096 and vocabulary 128,256 -> the rule's 16 lifted to the floor of 256 tokens; one
    # chunk of 512 holds twice the logits. bf16: 6 bytes per logit (float32 logits + the bf16 logits or gradient).
    vocab = 128_256
    assert wide.components["loss"] - auto.components["loss"] == (512 - 256) * vocab * 6
    fp32 = estimate_memory("llama-3-8b", "qlora", batch_size=1, seq_len=512, loss_chunk_tokens=512, dtype="float32")
    fp32_auto = estimate_memory("llama-3-8b", "qlora", batch_size=1, seq_len=512, dtype="float32")
    assert fp32.components["loss"] - fp32_auto.components["loss"] == (512 - 256) * vocab * 4  # one float32 buffer


def test_qlora_counts_the_dequantized_weight_whole_on_cuda_and_one_slice_on_a_cpu():
    from nibblora.memory import estimate_memory
    from nibblora.quant.names import DEQUANT_SLICE_BYTES

    def temporaries(mode, device):
        return estimate_memory("llama-2-7b", mode, device=device).components["backward_temporaries"]

    mlp = 4096 * 11008 * 2  # the largest projection of Llama-2-7B in bf16
    assert temporaries("qlora", "cuda") - temporaries("lora", "cuda") == mlp
    assert temporaries("qlora", "cpu") - temporaries("lora", "cpu") == DEQUANT_SLICE_BYTES
