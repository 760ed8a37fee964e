"""python -m nibblora.merge: errors, multi-adapter methods, 4-bit bases, sharding, hostile files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers_merge import peft_model, read_safetensors_dir, save_adapter_dir, save_base
from safetensors.torch import load_file, save_file

from nibblora.merge import MergeError, main, merge_checkpoint

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = save_base(root / "base")
    a = save_adapter_dir(peft_model(seed=1, r=4, lora_alpha=8), root / "a")
    b = save_adapter_dir(peft_model(seed=2, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]), root / "b")
    return root, base, a, b


def _delta(adapter, module: str) -> torch.Tensor:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    pre = f"base_model.model.{module}"
    return (t[f"{pre}.lora_B.weight"] @ t[f"{pre}.lora_A.weight"]) * (cfg["lora_alpha"] / cfg["r"])


def _broken_adapter(src, dst, edit):
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight": torch.zeros(1)}),
            "unknown LoRA tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight'",
        ),
        (
            lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
            "'model.layers.1.mlp.up_proj' has 'base_model.model.model.layers.1.mlp.up_proj.lora_A.weight' "
            "but no lora_B",
        ),
        (
            lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 65)}),
            "'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' [4, 65] and "
            "'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight' [128, 4] do not fit "
            "'model.layers.0.mlp.up_proj.weight'",
        ),
        (
            lambda t: [t.pop(k) for k in list(t) if ".layers.1.self_attn.k_proj." in k],
            "missing base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
                    "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(128, 4),
                }
            ),
            "targets model.layers.9.mlp.up_proj.weight, which the base checkpoint",
        ),
    ],
    ids=["unknown_key", "missing_B", "shape_mismatch", "target_without_weights", "module_not_in_base"],
)
def test_bad_adapter_is_an_error_naming_the_tensor_and_nothing_is_written(setup, tmp_path, capsys, edit, message):
    root, base, a, _ = setup
    broken = _broken_adapter(a, tmp_path / "broken", edit)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(broken), "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"], "no temporary folder left behind"


def test_cli_prints_a_summary_and_copies_side_files(setup, tmp_path, capsys):
    root, base, a, _ = setup
    (base / "tokenizer.json").write_text("{}")
    try:
        assert main(["--base", str(base), "--adapter", str(a), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        (base / "tokenizer.json").unlink()
    out = capsys.readouterr().out
    assert "merged 1 adapter (linear) into 14 of 21 tensors" in out
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_cat_equals_the_weighted_sum_and_weights_scale_each_update(setup, tmp_path):
    root, base, a, b = setup
    merge_checkpoint(base, [a, b], tmp_path / "lin", weights=[0.5, -2.0], progress=False)
    merge_checkpoint(base, [a, b], tmp_path / "cat", weights=[0.5, -2.0], method="cat", progress=False)
    lin, cat = read_safetensors_dir(tmp_path / "lin"), read_safetensors_dir(tmp_path / "cat")
    w = read_safetensors_dir(base)[Q]
    expected = w + 0.5 * _delta(a, Q[:-7]) - 2.0 * _delta(b, Q[:-7])
    torch.testing.assert_close(lin[Q], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cat[Q], lin[Q], rtol=1e-6, atol=1e-6)


def test_rank_truncation_keeps_the_best_rank_n_part_of_the_combined_update(setup, tmp_path):
    root, base, a, b = setup
    merge_checkpoint(base, [a, b], tmp_path / "out", rank=2, progress=False)
    w = read_safetensors_dir(base)[Q]
    full = (_delta(a, Q[:-7]) + _delta(b, Q[:-7])).double()
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    got = read_safetensors_dir(tmp_path / "out")[Q].double() - w.double()
    torch.testing.assert_close(got, best, rtol=0, atol=1e-5)
    assert torch.linalg.matrix_rank(got, atol=1e-4).item() == 2


def test_ties_keeps_density_share_and_elects_signs(setup, tmp_path):
    root, base, a, b = setup
    merge_checkpoint(base, [a], tmp_path / "out", method="ties", density=0.25, progress=False)
    w = read_safetensors_dir(base)[Q]
    delta = _delta(a, Q[:-7])
    got = read_safetensors_dir(tmp_path / "out")[Q] - w
    kept = got.abs() > 1e-6
    assert kept.sum().item() == int(0.25 * delta.numel())
    torch.testing.assert_close(got[kept], delta[kept], rtol=1e-5, atol=1e-6)


def test_dare_is_reproducible_with_a_seed_and_changes_with_it(setup, tmp_path):
    root, base, a, b = setup
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        merge_checkpoint(base, [a, b], tmp_path / name, method="dare_ties", density=0.5, seed=seed, progress=False)
    s0, again, s1 = (read_safetensors_dir(tmp_path / n)[Q] for n in ("s0", "s0_again", "s1"))
    assert torch.equal(s0, again)
    assert not torch.equal(s0, s1)


def test_sharded_output_has_an_index_covering_every_tensor(setup, tmp_path):
    root, base, a, _ = setup
    summary = merge_checkpoint(base, [a], tmp_path / "out", max_shard_size="100KB", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(summary.shards) > 1
    assert set(index["weight_map"]) == set(read_safetensors_dir(base))
    assert set(index["weight_map"].values()) == set(summary.shards)


def test_4bit_base_is_dequantized_to_compute_dtype_then_merged(setup, tmp_path):
    from nibblora.quant import dequantize_4bit, from_bnb_state_dict
    from nibblora.quantize import quantize_checkpoint

    root, base, a, _ = setup
    q4 = tmp_path / "q4"
    quantize_checkpoint(base, q4, compute_dtype="float32", progress=False)
    merge_checkpoint(q4, [a], tmp_path / "out", progress=False)
    stored = read_safetensors_dir(q4)
    w = dequantize_4bit(from_bnb_state_dict({k: v for k, v in stored.items() if k.startswith(Q)}, Q), torch.float32)
    got = read_safetensors_dir(tmp_path / "out")
    assert got[Q].dtype == torch.float32 and got[Q].shape == (64, 64)
    torch.testing.assert_close(got[Q], w + _delta(a, Q[:-7]), rtol=1e-6, atol=1e-6)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config


def test_requantize_reports_update_against_error_and_keeps_untouched_4bit_bytes(setup, tmp_path):
    from nibblora.models import load_model
    from nibblora.quantize import quantize_checkpoint

    root, base, _, b = setup  # b adapts q_proj and v_proj only
    q4 = tmp_path / "q4"
    quantize_checkpoint(base, q4, compute_dtype="float32", progress=False)
    summary = merge_checkpoint(q4, [b], tmp_path / "out", quantize="nf4", progress=False)
    assert sorted(r.name for r in summary.quant_report) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")
    )
    assert all(r.update_norm > 0 and r.quant_error_norm > 0 for r in summary.quant_report)
    assert "||update|| vs ||quantization error||" in summary.format()
    before, after = read_safetensors_dir(q4), read_safetensors_dir(tmp_path / "out")
    k = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(k))
    assert not torch.equal(before[Q], after[Q])
    load_model(tmp_path / "out")  # a valid bitsandbytes 4-bit checkpoint


def test_hostile_shard_and_adapter_headers_are_clean_errors(setup, tmp_path):
    root, base, a, _ = setup
    bad_base = tmp_path / "bad_base"
    bad_base.mkdir()
    (bad_base / "config.json").write_text((base / "config.json").read_text())
    raw = (base / "model.safetensors").read_bytes()
    (bad_base / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    with pytest.raises(MergeError, match="header length 4611686018427387904 exceeds the 104857600-byte limit"):
        merge_checkpoint(bad_base, [a], tmp_path / "out", progress=False)
    (bad_base / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MergeError, match="truncated: the header needs"):
        merge_checkpoint(bad_base, [a], tmp_path / "out", progress=False)
    bad_adapter = tmp_path / "bad_adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    raw = (a / "adapter_model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4  # disagrees with dtype x shape
    blob = json.dumps(header).encode()
    (bad_adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    with pytest.raises(MergeError, match=f"tensor {json.dumps(first)}: F32 .* needs .* bytes but data_offsets"):
        merge_checkpoint(base, [bad_adapter], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_update_that_overflows_names_the_adapter_and_not_the_base(setup, tmp_path, capsys):
    """Issue 13 #20: finite lora_A/lora_B whose product overflows the output dtype: the error is about the adapter."""
    root, base, a, _ = setup

    def scale(tensors):
        for key in tensors:
            tensors[key] = tensors[key] * 1e30

    broken = _broken_adapter(a, tmp_path / "huge", scale)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(broken), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(broken / "adapter_model.safetensors") in err and "non-finite" in err
    assert "4-bit" not in err and str(base) + "/model" not in err
    assert not out.exists()
