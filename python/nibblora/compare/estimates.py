"""The memory calculator's figures for a run: for the tiny base as trained (beside the measured peak) and for
Llama-2-7B (the lesson's scale). Full / LoRA / QLoRA come from estimate_memory, the other methods from
estimate_method_memory, whose activations are approximated (nibblora/memory/methods.py says how). Torch-free.
"""

from __future__ import annotations

from typing import Any

from nibblora.compare.plan import RunSpec
from nibblora.memory import estimate_memory, estimate_method_memory

SEVEN_B = "llama-2-7b"
# The lesson's setting for the 7B figure (python -m nibblora.memory's table): one row of 512 tokens, bf16,
# gradient checkpointing, AdamW; full fine-tuning with an fp32 master copy (16 bytes per parameter).
SEVEN_B_SETTING: dict[str, Any] = dict(batch_size=1, seq_len=512, dtype="bfloat16", gradient_checkpointing=True)


def calculator_bytes(spec: RunSpec, model: object, **setting: Any) -> int:
    """The calculator's predicted training peak for `spec`'s method on `model` (a preset, config dict or folder)."""
    s = spec.settings
    lora = s.get("lora", {})
    if spec.mode in ("full", "lora", "qlora"):
        mixed = setting.pop("mixed_precision", True)
        return estimate_memory(
            model,
            spec.mode,
            r=lora.get("r", 64),
            target_modules=lora.get("target_modules", "all-linear"),
            mixed_precision=mixed,
            **setting,
        ).total_bytes
    setting.pop("mixed_precision", None)
    return estimate_method_memory(
        model,
        spec.mode,
        r=lora.get("r", 64),
        target_modules=lora.get("target_modules", "all-linear"),
        num_virtual_tokens=s.get(spec.mode, {}).get("num_virtual_tokens", 20),
        projection_hidden=s.get("prefix", {}).get("projection_hidden", 0),
        adapter_variant=s.get("adapter", {}).get("variant", "houlsby"),
        bottleneck_size=s.get("adapter", {}).get("bottleneck_size", 16),
        **setting,
    ).total_bytes


def seven_b_bytes(spec: RunSpec) -> int:
    return calculator_bytes(spec, SEVEN_B, **SEVEN_B_SETTING)


def as_trained_bytes(spec: RunSpec, base_config: dict, batch_size: int, seq_len: int) -> int:
    """The calculator's figure for the run as the trainer ran it: float32, no checkpointing, pure precision."""
    return calculator_bytes(
        spec,
        base_config,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype="float32",
        gradient_checkpointing=False,
        mixed_precision=False,
    )
