"""python -m nibblora.verify: a faithful merge passes, a wrong one fails with exit code 1."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_merge import peft_model, save_adapter_dir, save_base
from safetensors.torch import load_file, save_file

from nibblora.merge import merge_checkpoint
from nibblora.verify import main, verify_merge


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = save_base(root / "base")
    adapter = save_adapter_dir(peft_model(r=4, lora_alpha=8), root / "adapter")
    merge_checkpoint(base, [adapter], root / "merged", progress=False)
    return root, base, adapter, root / "merged"


def test_faithful_merge_passes_with_float32_sized_differences(merged, capsys):
    root, base, adapter, out = merged
    report = verify_merge(base, adapter, out)
    assert report.passed and report.positions == 4 * 32
    assert report.max_abs_logit_diff < 1e-4 and report.max_kl < 1e-9
    assert main(["--base", str(base), "--adapter", str(adapter), "--merged", str(out)]) == 0
    assert capsys.readouterr().out.startswith("PASS: max |logit diff|")


def test_merge_without_the_adapter_fails_with_exit_code_1(merged, tmp_path, capsys):
    root, base, adapter, out = merged
    assert main(["--base", str(base), "--adapter", str(adapter), "--merged", str(base)]) == 1
    assert capsys.readouterr().out.startswith("FAIL")


def test_tampered_layer_is_caught(merged, tmp_path):
    root, base, adapter, out = merged
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "config.json").write_text((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] += 0.05 * torch.randn_like(
        tensors["model.layers.1.mlp.down_proj.weight"]
    )
    save_file(tensors, tampered / "model.safetensors")
    assert not verify_merge(base, adapter, tampered).passed


def test_a_missing_base_folder_is_an_input_error_with_exit_code_2(tmp_path, capsys):
    from nibblora.verify import main

    assert main(["--base", str(tmp_path / "nope"), "--adapter", str(tmp_path), "--merged", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err


# --- NaN never passes, unreadable input is exit 2 (issue 13 #2, #7) ----------------------------------------------


def _copy_model(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_merged_weight_fails_with_exit_code_1(merged, tmp_path, capsys, value):
    root, base, adapter, out = merged
    q = "model.layers.0.self_attn.q_proj.weight"
    bad = _copy_model(out, tmp_path / "bad", lambda t: t[q].fill_(value))
    report = verify_merge(base, adapter, bad)
    assert not report.passed
    assert f"merged weight {q}" in report.nonfinite and "logits" in report.nonfinite
    assert main(["--base", str(base), "--adapter", str(adapter), "--merged", str(bad)]) == 1
    out_text = capsys.readouterr().out
    assert out_text.startswith("FAIL") and "non-finite values in merged weight" in out_text


def test_one_non_finite_lm_head_row_fails_even_with_loose_explicit_bounds(merged, tmp_path):
    root, base, adapter, out = merged
    bad = _copy_model(out, tmp_path / "bad", lambda t: t["lm_head.weight"][3].fill_(float("nan")))
    report = verify_merge(base, adapter, bad, atol=1e9, kl_tol=1e9)
    assert not report.passed and report.nonfinite


def _adapter_copy(adapter, dst, config_edit=None, weights_bytes=None):
    dst.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    (dst / "adapter_model.safetensors").write_bytes(weights_bytes(raw) if weights_bytes else raw)
    return dst


@pytest.mark.parametrize(
    ("config_edit", "weights_bytes", "message"),
    [
        (lambda c: c.update(lora_alpha=float("nan")), None, "key 'lora_alpha' must be a finite number, got nan"),
        (lambda c: c.update(r=0), None, "key 'r' must be a positive integer, got 0"),
        (None, lambda raw: raw[: len(raw) - 100], "truncated"),
        (None, lambda raw: raw[:5], "not a safetensors file"),
    ],
    ids=["alpha_nan", "r_zero", "truncated_data", "truncated_header"],
)
def test_unreadable_adapter_is_exit_code_2_with_one_line_naming_the_file(
    merged, tmp_path, capsys, config_edit, weights_bytes, message
):
    root, base, adapter, out = merged
    bad = _adapter_copy(adapter, tmp_path / "bad", config_edit, weights_bytes)
    assert main(["--base", str(base), "--adapter", str(bad), "--merged", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nibblora.verify: error: reading adapter") and "\n" not in err
    assert str(bad) in err and message in err


# --- the verdict follows the merged dtype's rounding (issue 13 #17) ----------------------------------------------

WIDE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=1024, initializer_range=0.1)
DROPPED = "model.layers.2.self_attn.v_proj.weight"


def _save_state(state, directory, config_from):
    directory.mkdir()
    (directory / "config.json").write_text((config_from / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def wide(request, tmp_path_factory):
    """A base whose logits are large enough that bf16 rounding moves them by more than 0.01, a peft adapter, and
    merges: peft's own (bit for bit), nibblora's, one without the alpha / r scaling, one with a layer left out."""
    from helpers_models import hf_tiny_model
    from peft import LoraConfig, get_peft_model

    dtype = request.param
    root = tmp_path_factory.mktemp(f"wide-{str(dtype)[6:]}")
    base_model = hf_tiny_model("llama", **WIDE).to(dtype)
    base = root / "base"
    base_model.save_pretrained(base)
    torch.manual_seed(1)
    model = get_peft_model(
        hf_tiny_model("llama", **WIDE).to(dtype),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    peft_state = model.merge_and_unload().state_dict()
    base_state = base_model.state_dict()
    unscaled = {
        k: (base_state[k].float() + (v.float() - base_state[k].float()) / 2).to(dtype) for k, v in peft_state.items()
    }  # scaling alpha / r = 2 left out
    dropped = dict(peft_state, **{DROPPED: base_state[DROPPED]})
    merge_checkpoint(base, [adapter], root / "ours", progress=False)
    return (
        dtype,
        base,
        adapter,
        {
            "peft": _save_state(peft_state, root / "peft", base),
            "ours": root / "ours",
            "unscaled": _save_state(unscaled, root / "unscaled", base),
            "dropped": _save_state(dropped, root / "dropped", base),
        },
    )


@pytest.mark.parametrize("which", ["peft", "ours"])
def test_correct_merge_passes_with_defaults_in_its_dtype(wide, which):
    dtype, base, adapter, merges = wide
    report = verify_merge(base, adapter, merges[which])
    assert report.passed, report.format()
    assert report.automatic and report.merged_dtype == {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    assert report.argmax_flips == 0 and report.argmax_agreement >= 0.95
    if dtype == torch.bfloat16:
        # the old fixed tolerance (0.01) failed this bit-identical-to-peft merge
        assert report.max_abs_logit_diff > 0.01
        assert not verify_merge(base, adapter, merges[which], atol=1e-2, kl_tol=1e-3).passed
    else:
        assert report.max_abs_logit_diff < 1e-4 and report.max_kl < 1e-9


@pytest.mark.parametrize("which", ["unscaled", "dropped"])
def test_wrong_merge_fails_with_defaults_in_bf16_and_fp32(wide, which, capsys):
    dtype, base, adapter, merges = wide
    report = verify_merge(base, adapter, merges[which])
    assert not report.passed, report.format()
    assert report.max_kl > 5 * report.kl_tol  # far past the bound, not a borderline call
    assert main(["--base", str(base), "--adapter", str(adapter), "--merged", str(merges[which])]) == 1
    assert capsys.readouterr().out.startswith("FAIL")


def test_a_merged_model_of_another_vocabulary_is_an_input_error(merged, tmp_path, capsys):
    from helpers_merge import save_base as save_other

    root, base, adapter, out = merged
    other = save_other(tmp_path / "other", vocab_size=96)
    assert main(["--base", str(base), "--adapter", str(adapter), "--merged", str(other)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # save_pretrained above prints a progress bar on stderr
    assert err.startswith("nibblora.verify: error: verifying:") and err.endswith("it is not a merge of this base")
