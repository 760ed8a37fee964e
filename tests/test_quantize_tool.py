"""python -m nibblora.quantize: HF checkpoint in, transformers + bitsandbytes 4-bit checkpoint out.

The reference is transformers itself: loading the original with BitsAndBytesConfig(load_in_4bit=True, ...) and
calling save_pretrained must give the same tensors and config.json, and loading our output must give the same
dequantized weights and logits.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nibblora.quantize import QuantizeError, main, quantize_checkpoint

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*kernels.*")

LLAMA_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=192,  # bitsandbytes CPU matmul needs in_features % 64 == 0
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
INPUT_IDS = torch.tensor([[1, 5, 9, 100, 27, 3, 64, 127]])


def _bnb_config(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16, skip=None):
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def _load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM in bfloat16, saved in three shards, with tokenizer-side files."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG)).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "pytorch_model.bin").write_bytes(b"stale weights")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


def _transformers_own_save(llama_dir: Path, out: Path, **bnb) -> Path:
    _load(llama_dir, quantization_config=_bnb_config(**bnb)).save_pretrained(out, max_shard_size="100GB")
    return out


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors


@pytest.mark.parametrize(
    ("quant_type", "blocksize", "double_quant"), [("nf4", 64, True), ("fp4", 64, False)], ids=["nf4-dq", "fp4"]
)
def test_output_equals_what_transformers_saves_after_quantizing_itself(
    llama_dir, tmp_path, quant_type, blocksize, double_quant
):
    ours = tmp_path / "ours"
    quantize_checkpoint(
        llama_dir, ours, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, progress=False
    )
    theirs = _transformers_own_save(llama_dir, tmp_path / "theirs", quant_type=quant_type, double_quant=double_quant)
    assert (ours / "config.json").read_text() == (theirs / "config.json").read_text()
    a, b = _all_tensors(ours), _all_tensors(theirs)
    assert sorted(a) == sorted(b)
    for key in b:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert torch.equal(a[key], b[key]), key


def test_loaded_output_dequantizes_exactly_like_bitsandbytes_and_gives_the_same_logits(llama_dir, tmp_path):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out = tmp_path / "out"
    quantize_checkpoint(llama_dir, out, progress=False)
    ours = _load(out)
    original = _all_tensors(llama_dir)
    linear4bit = {n: m for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(linear4bit) == sorted(
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    for name, module in linear4bit.items():
        loaded = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        packed, state = F.quantize_4bit(
            original[f"{name}.weight"], blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(loaded, F.dequantize_4bit(packed, state)), name
    assert torch.equal(ours.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(ours.model.embed_tokens.weight, original["model.embed_tokens.weight"])

    reference = _load(llama_dir, quantization_config=_bnb_config())
    with torch.no_grad():
        assert torch.equal(ours(INPUT_IDS).logits, reference(INPUT_IDS).logits)


@pytest.mark.parametrize(("quant_type", "blocksize"), [("nf4", 128), ("fp4", 256)])
def test_other_blocksizes_load_and_dequantize_exactly_like_bitsandbytes(llama_dir, tmp_path, quant_type, blocksize):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out = tmp_path / "out"
    quantize_checkpoint(llama_dir, out, quant_type=quant_type, blocksize=blocksize, progress=False)
    original = _all_tensors(llama_dir)
    modules = {n: m for n, m in _load(out).named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(modules) == 14
    for name, module in modules.items():
        assert module.weight.quant_state.blocksize == blocksize
        packed, state = F.quantize_4bit(
            original[f"{name}.weight"], blocksize=blocksize, compress_statistics=True, quant_type=quant_type
        )
        loaded = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(loaded, F.dequantize_4bit(packed, state)), name


def test_sharded_output_has_an_index_that_matches_the_shards(llama_dir, tmp_path):
    out = tmp_path / "out"
    summary = quantize_checkpoint(llama_dir, out, max_shard_size="40KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    expected = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert shards == summary.shards == expected
    assert len(shards) > 2
    tensors = {}
    for shard in shards:
        for key, value in load_file(out / shard).items():
            assert index["weight_map"][key] == shard
            tensors[key] = value
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == summary.bytes_after == sum(t.nbytes for t in tensors.values())
    theirs = _load(llama_dir, quantization_config=_bnb_config())
    assert index["metadata"]["total_parameters"] == theirs.num_parameters()
    with torch.no_grad():
        assert torch.equal(_load(out)(INPUT_IDS).logits, theirs(INPUT_IDS).logits)


def test_side_files_are_copied_and_stale_weights_are_not(llama_dir, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(llama_dir, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    assert (out / "generation_config.json").read_bytes() == (llama_dir / "generation_config.json").read_bytes()
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"


def test_skipped_modules_stay_in_their_dtype_and_load_as_plain_linear(llama_dir, tmp_path):
    out = tmp_path / "out"
    summary = quantize_checkpoint(llama_dir, out, skip_modules=["mlp.down_proj"], progress=False)
    config = json.loads((out / "config.json").read_text())
    # transformers drops its default skips (lm_head) once a list is given, so the list names them too.
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["mlp.down_proj", "lm_head", "model.embed_tokens"]
    tensors = _all_tensors(out)
    original = _all_tensors(llama_dir)
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"], original["model.layers.1.mlp.down_proj.weight"])
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == torch.uint8
    assert summary.tensors_quantized == 12
    ours = _load(out)
    assert type(ours.model.layers[0].mlp.down_proj) is torch.nn.Linear
    reference = _load(llama_dir, quantization_config=_bnb_config(skip=["mlp.down_proj", "lm_head"]))
    with torch.no_grad():
        assert torch.equal(ours(INPUT_IDS).logits, reference(INPUT_IDS).logits)


def test_moe_experts_and_router_stay_unquantized_and_the_model_loads_like_transformers_quantized_it(tmp_path):
    """transformers 5 fuses per-expert weights into 3-D parameters at load (not nn.Linear, so bitsandbytes leaves
    them), and its router is a bare Parameter: both stay as they are, named in llm_int8_skip_modules."""
    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "moe")
    summary = quantize_checkpoint(tmp_path / "moe", tmp_path / "out", progress=False)
    assert summary.tensors_quantized == 8  # q, k, v, o in 2 layers
    patterns = [
        r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w1",
        r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w2",
        r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w3",
        r"model\.layers\.\d+\.block_sparse_moe\.gate",
    ]
    assert summary.unfamiliar == patterns
    skip = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == ["lm_head", "model.embed_tokens", *patterns]
    ours = _load(tmp_path / "out")
    reference = _load(tmp_path / "moe", quantization_config=_bnb_config())
    with torch.no_grad():
        assert torch.equal(ours(INPUT_IDS).logits, reference(INPUT_IDS).logits)


def test_summary_counts_parameters_bytes_and_bits(llama_dir, tmp_path):
    summary = quantize_checkpoint(llama_dir, tmp_path / "out", progress=False)
    original = _all_tensors(llama_dir)
    linear = [k for k in original if ".layers." in k and k.endswith("proj.weight")]
    n_quantized = sum(original[k].numel() for k in linear)
    assert summary.tensors_total == len(original)
    assert summary.tensors_quantized == len(linear) == 14
    assert summary.params_total == sum(t.numel() for t in original.values())
    assert summary.params_quantized == n_quantized
    assert summary.bytes_before == sum(t.nbytes for t in original.values())
    assert summary.bytes_after == sum(t.nbytes for t in _all_tensors(tmp_path / "out").values())
    # Per weight: n/2 packed bytes, one uint8 code per 64 values, a float32 per 256 codes, a float32 offset.
    scale_bytes = sum((blocks := math.ceil(original[k].numel() / 64)) + 4 * math.ceil(blocks / 256) + 4 for k in linear)
    assert summary.bits_per_param == pytest.approx(8 * (n_quantized / 2 + scale_bytes) / n_quantized, rel=1e-12)
    assert "bits/parameter" in summary.format()


def test_bits_per_parameter_is_4_127_with_double_quant_and_4_5_without(tmp_path):
    base = (torch.randn(1 << 20) * 0.02).to(torch.bfloat16)
    _write_checkpoint(tmp_path / "m", {"model.layers.0.mlp.up_proj.weight": base.reshape(1024, 1024)})
    dq = quantize_checkpoint(tmp_path / "m", tmp_path / "dq", progress=False)
    plain = quantize_checkpoint(tmp_path / "m", tmp_path / "plain", double_quant=False, progress=False)
    assert round(dq.bits_per_param, 3) == 4.127
    assert plain.bits_per_param == 4.5


# ---------------------------------------------------------------- bad input: exit code 2, one line, no traceback

LLAMA_JSON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def _write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_JSON if config is None else config))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _small_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, dtype=torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(8, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(16, 8, dtype=torch.bfloat16),
    }


def _run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["--quiet", *args])
    err = capsys.readouterr().err
    return rc, err


def _assert_user_error(capsys, model: Path, out: Path, fragment: str, *extra: str) -> None:
    rc, err = _run_cli(capsys, "--model", str(model), "--out", str(out), *extra)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("nibblora.quantize: error: ")
    assert fragment in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_non_finite_weight_is_named_and_leaves_no_output(tmp_path, capsys):
    tensors = _small_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    model = _write_checkpoint(tmp_path / "m", tensors)
    _assert_user_error(capsys, model, tmp_path / "out", "'model.layers.0.mlp.up_proj.weight'")
    rc, err = _run_cli(capsys, "--model", str(model), "--out", str(tmp_path / "out"))
    assert "non-finite" in err


def test_unsupported_weight_dtype_is_named(tmp_path, capsys):
    tensors = _small_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(16, 8, dtype=torch.int32)
    model = _write_checkpoint(tmp_path / "m", tensors)
    _assert_user_error(
        capsys,
        model,
        tmp_path / "out",
        "tensor 'model.layers.0.mlp.up_proj.weight' has dtype I32; 4-bit quantization reads F32, BF16 or F16",
    )


def test_empty_weight_is_named(tmp_path, capsys):
    tensors = _small_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(0, 8, dtype=torch.bfloat16)
    model = _write_checkpoint(tmp_path / "m", tensors)
    fragment = "tensor 'model.layers.0.mlp.up_proj.weight' is empty (shape [0, 8])"
    _assert_user_error(capsys, model, tmp_path / "out", fragment)


def test_unsupported_blocksize_is_rejected(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model), "--out", str(tmp_path / "out"), "--blocksize", "48"])
    assert exit_info.value.code == 2
    assert "--blocksize: invalid choice: 48" in capsys.readouterr().err
    with pytest.raises(QuantizeError, match="blocksize 48 is not supported"):
        quantize_checkpoint(model, tmp_path / "out", blocksize=48)


def test_truncated_shard_is_named(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    _assert_user_error(
        capsys, model, tmp_path / "out", f"reading {shard}: not a valid safetensors file, truncated or corrupt ("
    )


def test_corrupt_header_is_named(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    shard = model / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[10:14] = b"@@@@"
    shard.write_bytes(bytes(raw))
    _assert_user_error(
        capsys, model, tmp_path / "out", f"reading {shard}: not a valid safetensors file, truncated or corrupt ("
    )


def test_garbage_file_is_named(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    (model / "model.safetensors").write_bytes(b"\xff" * 100)
    _assert_user_error(
        capsys, model, tmp_path / "out", "model.safetensors: not a valid safetensors file, truncated or corrupt ("
    )


def test_shard_missing_from_index_is_named(llama_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    (model / "model-00002-of-00003.safetensors").unlink()
    fragment = "model.safetensors.index.json: shard model-00002-of-00003.safetensors does not exist"
    _assert_user_error(capsys, model, tmp_path / "out", fragment)


def test_missing_weights_are_named(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA_JSON))
    fragment = "no model.safetensors and no model.safetensors.index.json"
    _assert_user_error(capsys, tmp_path / "m", tmp_path / "out", fragment)
    _assert_user_error(capsys, tmp_path / "nowhere", tmp_path / "out", "model folder does not exist")


def test_config_that_is_not_a_causal_lm_is_rejected(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors(), {"architectures": ["BertModel"], "model_type": "bert"})
    _assert_user_error(capsys, model, tmp_path / "out", "architectures ['BertModel'] name no causal LM")
    model = _write_checkpoint(tmp_path / "n", _small_tensors(), {"architectures": ["LlamaForCausalLM"]})
    _assert_user_error(capsys, model, tmp_path / "out", "config.json: no model_type")


def test_already_quantized_input_is_rejected(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    quantize_checkpoint(model, tmp_path / "q", progress=False)
    fragment = "checkpoint is already quantized (quantization_config, quant_method 'bitsandbytes')"
    _assert_user_error(capsys, tmp_path / "q", tmp_path / "out", fragment)
    (tmp_path / "q" / "config.json").write_text(json.dumps(LLAMA_JSON))
    _assert_user_error(capsys, tmp_path / "q", tmp_path / "out", "checkpoint is already quantized (it holds")


def test_skip_pattern_matching_nothing_is_rejected(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    _assert_user_error(capsys, model, tmp_path / "out", "--skip 'mlp' matches no module", "--skip", "mlp")


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run_cli(capsys, "--model", str(model), "--out", str(out))
    assert rc == 2 and "exists and is not empty (pass --overwrite to replace it)" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    rc, _ = _run_cli(capsys, "--model", str(model), "--out", str(out), "--overwrite")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_empty_existing_output_folder_is_filled(tmp_path, capsys):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    (tmp_path / "out").mkdir()
    rc, out = main(["--quiet", "--model", str(model), "--out", str(tmp_path / "out")]), capsys.readouterr().out
    assert rc == 0
    assert "quantized 2 of 5 tensors (nf4, blocksize 64, double quant)" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_interrupt_midway_leaves_neither_output_nor_temporary_folder(tmp_path, capsys, monkeypatch):
    import nibblora.quantize.tool as tool

    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return quantize_4bit(*args, **kwargs)

    from nibblora.quant import quantize_4bit

    monkeypatch.setattr(tool, "quantize_4bit", interrupted)
    rc, err = _run_cli(capsys, "--model", str(model), "--out", str(tmp_path / "out"))
    assert rc == 130 and err == "nibblora.quantize: interrupted; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli_reports_user_error_in_one_line_with_exit_code_2_and_no_traceback(tmp_path):
    model = _write_checkpoint(tmp_path / "m", _small_tensors())
    (model / "model.safetensors").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "nibblora.quantize", "--model", str(model), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    shard = model / "model.safetensors"
    # The reason in parentheses is the Rust reader's; the line around it is the checkpoint layer's.
    assert result.stderr.startswith(
        f"nibblora.quantize: error: reading {shard}: not a valid safetensors file, truncated or corrupt ("
    )
    assert result.stderr.endswith("); re-download or re-save it\n") and result.stderr.count("\n") == 1
    assert result.stdout == ""


# ---------------------------------------------------------------- streaming: peak memory tracks the largest tensor

# Runs the tool in a fresh process and prints (resident KiB after the imports, peak resident KiB during the run).
# The peak is reset after the imports (Linux: "5" into /proc/self/clear_refs), so import-time transients, which
# are larger than the tool's working memory, cannot hide it.
_MEASURE = """
import sys
import torch, tqdm.auto
from nibblora.quantize import main

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

settled = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
assert main(sys.argv[1:]) == 0
print(settled, status("VmHWM"))
"""


def test_peak_memory_stays_under_twice_the_largest_tensor_plus_256_mb(tmp_path):
    base = (torch.randn(1 << 22) * 0.02).to(torch.bfloat16)

    def tensor(rows: int, cols: int) -> torch.Tensor:
        return base.repeat(rows * cols // base.numel()).view(rows, cols)

    largest = tensor(8192, 4096)  # 64 MiB, quantized
    tensors = {"model.embed_tokens.weight": tensor(8192, 4096), "lm_head.weight": tensor(8192, 4096)}
    tensors["model.layers.0.mlp.gate_proj.weight"] = largest
    for layer in range(15):
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = tensor(2048, 4096)
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = tensor(4096, 2048)
    model = _write_checkpoint(tmp_path / "m", tensors)
    total = sum(t.nbytes for t in tensors.values())
    del tensors, largest
    assert total > 640 << 20

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident size")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            "--model",
            str(model),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
            "--max-shard-size",
            "200MB",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    settled_kib, peak_kib = (int(x) for x in run.stdout.split()[-2:])
    extra = (peak_kib - settled_kib) * 1024
    print(
        f"peak RSS above the settled imports: {extra / 2**20:.0f} MiB (checkpoint {total / 2**20:.0f} MiB, "
        "largest tensor 64 MiB)"
    )
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 2
    assert extra < 2 * (64 << 20) + (256 << 20), f"peak {extra / 2**20:.0f} MiB above the imports"
