"""Segment (SGMV) and gathered (BGMV) LoRA give the per-token update of each token's own adapter."""

from __future__ import annotations

import pytest
import torch

from nibblora.serve.lora_ops import (
    KernelChooser,
    LoRABatch,
    LoRASlots,
    add_lora_gathered,
    add_lora_native,
    add_lora_segments,
)


def _setup(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    slots = LoRASlots.empty(4, 16, 24, 40, dtype, torch.device("cpu"))
    adapters = {}
    for slot, rank in ((0, 3), (1, 16), (3, 7)):  # slot 2 stays empty (adapter without this module)
        a, b = (
            torch.randn(rank, 24, generator=gen, dtype=dtype),
            torch.randn(40, rank, generator=gen, dtype=dtype),
        )
        slots.write(slot, a, b, 0.5 + slot)
        adapters[slot] = (a, b, 0.5 + slot)
    # tokens: 2 base-only, 3 of slot 0, 1 of slot 1, 2 of slot 2 (no weights here), 4 of slot 3
    layout = [-1, -1, 0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    segments, start = [], 0
    for i in range(1, len(layout) + 1):
        if i == len(layout) or layout[i] != layout[start]:
            if layout[start] >= 0:
                segments.append((start, i, layout[start]))
            start = i
    batch = LoRABatch(segments, torch.tensor(layout))
    x = torch.randn(len(layout), 24, generator=gen, dtype=dtype)
    want = torch.zeros(len(layout), 40, dtype=dtype)
    for t, slot in enumerate(layout):
        if slot in adapters:
            a, b, scaling = adapters[slot]
            want[t] = scaling * (b @ (a @ x[t]))
    return slots, batch, x, want


def test_segment_and_gathered_equal_the_per_token_formula():
    slots, batch, x, want = _setup()
    for fn in (add_lora_segments, add_lora_gathered):
        y = torch.zeros_like(want)
        fn(y, x, slots, batch)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_clearing_a_slot_removes_its_update():
    slots, batch, x, want = _setup()
    slots.write(3, None, None, 0.0)
    want[8:] = 0
    for fn in (add_lora_segments, add_lora_gathered):
        y = torch.zeros_like(want)
        fn(y, x, slots, batch)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_native_kernel_equals_the_per_token_formula_in_float32():
    slots, batch, x, want = _setup(dtype=torch.float32)
    assert slots.native_ok()
    y = torch.zeros_like(want)
    add_lora_native(y, x, slots, batch)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # after clearing slot 3 and writing a lower rank into slot 1, only the remaining rows count
    slots.write(3, None, None, 0.0)
    a, b = torch.randn(2, 24), torch.randn(40, 2)
    slots.write(1, a, b, 2.0)
    assert slots.ranks == [3, 2, 0, 0] and slots.rank_tensor.tolist() == [3, 2, 0, 0]
    assert not slots.lora_A[1, 2:].any() and not slots.lora_Bt[1, 2:].any()
    want[8:] = 0
    want[5] = 2.0 * (b @ (a @ x[5]))
    for fn in (add_lora_native, add_lora_segments, add_lora_gathered):
        y = torch.zeros_like(want)
        fn(y, x, slots, batch)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_native_kernel_is_refused_where_it_cannot_run():
    slots, _, _, _ = _setup()  # float64
    assert not slots.native_ok()
    with pytest.raises(ValueError, match="float32"):
        KernelChooser("native", native=False)


def test_kernel_choice_is_measured_once_per_bucket():
    slots, batch, _, _ = _setup(dtype=torch.float32)
    chooser = KernelChooser("auto", repeats=1, native=True)
    first = chooser.choose(batch, slots)
    assert first in ("segment", "gathered", "native")
    assert chooser.choices == {KernelChooser.bucket(12, 3): first}
    assert chooser.choose(batch, slots) == first and len(chooser.choices) == 1
    assert KernelChooser("gathered").choose(batch, slots) == "gathered"
    # measured again after remeasure_every uses of the bucket
    again = KernelChooser("auto", repeats=1, native=True, remeasure_every=3)
    measured = []
    again._measure = lambda b, s: measured.append(1) or "segment"
    for _ in range(7):
        again.choose(batch, slots)
    assert len(measured) == 3  # uses 1, 3 and 6
    assert KernelChooser.bucket(12, 3) == (16, 4) and KernelChooser.bucket(1, 1) == (1, 1)


def test_bfloat16_slots_on_the_cpu_take_the_torch_paths():
    slots = LoRASlots.empty(2, 4, 8, 6, torch.bfloat16, torch.device("cpu"))
    a, b = torch.randn(3, 8), torch.randn(6, 3)
    slots.write(1, a, b, 0.5)
    assert not slots.native_ok()
    assert slots.ranks == [0, 3] and slots.rank_tensor.tolist() == [0, 3] and slots.scaling.tolist() == [0.0, 0.5]
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = torch.zeros(2, 6, dtype=torch.bfloat16)
    add_lora_segments(y, x, slots, LoRABatch([(0, 2, 1)], torch.tensor([1, 1])))
    want = 0.5 * (x.float() @ a.bfloat16().float().t()) @ b.bfloat16().float().t()
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
