"""Conversion between QuantizedTensor and the state-dict keys transformers + bitsandbytes save for a 4-bit layer.

For a layer prefix `P` (e.g. "model.layers.0.mlp.up_proj"): `P.weight` (uint8 [(n+1)//2, 1]), `P.weight.absmax`,
`P.weight.quant_map`, and with double quantization `P.weight.nested_absmax`, `P.weight.nested_quant_map`; then
`P.weight.quant_state.bitsandbytes__<nf4|fp4>`: uint8 bytes of a JSON object with keys in the order quant_type,
blocksize, dtype, shape[, nested_blocksize, nested_dtype, nested_offset].
"""

from __future__ import annotations

import json

import torch

from nibblora.quant.state import QuantizedTensor, QuantState, dtype_from_name, dtype_name

BNB_QUANT_TYPES = ("nf4", "fp4")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def quant_state_key(quant_type: str) -> str:
    return f"quant_state.bitsandbytes__{quant_type}"


def to_bnb_state_dict(q: QuantizedTensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' Linear4bit saves for this weight, under `prefix` (default "weight")."""
    state = q.state
    if state.quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"{state.quant_type} has no bitsandbytes layout; only nf4 and fp4 can be saved that way")
    meta: dict[str, object] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    out = {
        prefix: q.packed,
        _join(prefix, "absmax"): state.absmax,
        _join(prefix, "quant_map"): state.code,
    }
    if state.double_quant:
        assert state.offset is not None and state.nested_absmax is not None and state.nested_code is not None
        meta.update(
            nested_blocksize=state.nested_blocksize,
            nested_dtype=dtype_name(state.nested_absmax.dtype),
            nested_offset=float(state.offset),
        )
        out[_join(prefix, "nested_absmax")] = state.nested_absmax
        out[_join(prefix, "nested_quant_map")] = state.nested_code
    payload = json.dumps(meta).encode("utf-8")
    out[_join(prefix, quant_state_key(state.quant_type))] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return out


def find_quant_state_key(tensors: dict[str, torch.Tensor] | set[str], prefix: str = "weight") -> str | None:
    for quant_type in BNB_QUANT_TYPES:
        key = _join(prefix, quant_state_key(quant_type))
        if key in tensors:
            return key
    return None


def from_bnb_state_dict(tensors: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
    """Rebuild a QuantizedTensor from bitsandbytes' saved keys under `prefix`. Missing keys are named."""
    key = find_quant_state_key(tensors, prefix)
    if key is None:
        raise KeyError(
            f"no bitsandbytes quant state under {prefix!r}: expected "
            f"{_join(prefix, quant_state_key('nf4'))!r} or {_join(prefix, quant_state_key('fp4'))!r}"
        )
    try:
        meta = json.loads(bytes(tensors[key].cpu().numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}: quant state is not valid JSON ({err})") from None

    def need(name: str) -> torch.Tensor:
        full = _join(prefix, name) if name else prefix
        if full not in tensors:
            raise KeyError(f"bitsandbytes 4-bit weight {prefix!r} is missing {full!r}")
        return tensors[full]

    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{key}: quant state lacks {field!r}")
    state = QuantState(
        quant_type=meta["quant_type"],
        blocksize=int(meta["blocksize"]),
        dtype=dtype_from_name(meta["dtype"]),
        shape=torch.Size(meta["shape"]),
        absmax=need("absmax"),
        code=need("quant_map").float(),
    )
    if "nested_offset" in meta:
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        state.nested_absmax = need("nested_absmax").float()
        state.nested_code = need("nested_quant_map").float()
        state.nested_blocksize = int(meta.get("nested_blocksize", 256))
    packed = need("")
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    expected = (state.numel + 1) // 2
    if packed.numel() != expected:
        raise ValueError(
            f"{prefix}: packed weight has {packed.numel()} bytes, but shape {list(state.shape)} needs {expected}"
        )
    return QuantizedTensor(packed.reshape(-1, 1), state)
