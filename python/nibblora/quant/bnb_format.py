"""Conversion between QuantizedTensor and the state-dict keys transformers + bitsandbytes save for a 4-bit layer.

For a layer prefix `P` (e.g. "model.layers.0.mlp.up_proj"): `P.weight` (uint8 [(n+1)//2, 1]), `P.weight.absmax`,
`P.weight.quant_map`, and with double quantization `P.weight.nested_absmax`, `P.weight.nested_quant_map`; then
`P.weight.quant_state.bitsandbytes__<nf4|fp4>`: uint8 bytes of a JSON object with keys in the order quant_type,
blocksize, dtype, shape[, nested_blocksize, nested_dtype, nested_offset].

The layout helpers the offline tools share live here too: which weights bitsandbytes would quantize
(`is_decoder_linear_weight`), the tensors a quantized weight becomes (`bnb_specs`), transformers'
`quantization_config` (`bnb_quantization_config`) and its skip list (`matches_skip`, `skip_modules_for_config`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from math import ceil, prod

import torch

from nibblora.checkpoint.writer import DeferredSpec, TensorSpec
from nibblora.dtypes import SAFETENSORS_TO_TORCH_NAME
from nibblora.quant.names import BLOCKSIZES, BNB_QUANT_TYPES, NESTED_BLOCKSIZE  # noqa: F401 (re-exported)
from nibblora.quant.state import QuantizedTensor, QuantState, dtype_from_name, dtype_name

# Elements per 4-bit block scale that bitsandbytes accepts: powers of two from 32 to 4096.
# The tensors transformers + bitsandbytes save next to a 4-bit `P.weight` (the nested ones only with double quant).
BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# Linear weights inside the repeated decoder blocks: model.layers.N.*, language_model.model.layers.N.*, ...
DECODER_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")
# Leaf names of the nn.Linear projections transformers' causal LMs keep in their decoder layers. A 2-D weight
# named otherwise (an MoE router such as `mlp.gate`, a bare Parameter in transformers 5) may not be an nn.Linear,
# which transformers would not convert: it stays unquantized and is named in llm_int8_skip_modules, so the
# checkpoint loads whichever it is.
LINEAR_LEAF_NAMES = frozenset(
    """q_proj k_proj v_proj o_proj qkv_proj query_key_value query key value dense out_proj in_proj
    gate_proj up_proj down_proj gate_up_proj fc1 fc2 fc_in fc_out dense_h_to_4h dense_4h_to_h w1 w2 w3
    q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj x_proj dt_proj""".split()
)
# Longest repr of a float (sign, 17 digits, point, "e-308"): bounds the JSON quant state's length.
_LONGEST_FLOAT = -1.2345678901234567e-308


def module_name(tensor_name: str) -> str:
    """ "model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj"."""
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


def is_layer_matrix(name: str, shape: Sequence[int]) -> bool:
    """A 2-D `.weight` inside a decoder layer (`...layers.N.`)."""
    return name.endswith(".weight") and len(shape) == 2 and bool(DECODER_LAYER.search(name))


def is_decoder_linear_weight(name: str, shape: Sequence[int]) -> bool:
    """A 2-D `.weight` of a known nn.Linear projection inside a decoder layer (attention and MLP), not of an
    MoE expert: transformers 5 fuses per-expert checkpoint weights into 3-D parameters when it loads them,
    and bitsandbytes' 4-bit layers do not cover those, so expert weights stay as they are."""
    module = module_name(name)
    return is_layer_matrix(name, shape) and module.rsplit(".", 1)[-1] in LINEAR_LEAF_NAMES and ".experts." not in module


def matches_skip(module: str, patterns: Sequence[str]) -> bool:
    """Whether transformers would leave `module` unconverted for llm_int8_skip_modules=`patterns`.

    transformers 5 matches a pattern against the module name from its start up to a dot boundary (as a regex:
    "model.layers.1" or "model.layers.*.mlp"), or as a suffix ("mlp.down_proj"). The tools apply the same
    rule, so what they leave unquantized is exactly what transformers expects when it loads the output.
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def _unfamiliar_pattern(module: str) -> str:
    """One skip pattern for every layer (and expert): "model.layers.3.mlp.gate" -> the regex
    model[.]layers[.]<digits>[.]mlp[.]gate, written with escaped dots and \\d+."""
    escaped = re.escape(module)
    escaped = re.sub(r"layers\\\.\d+\\\.", lambda _: r"layers\.\d+\.", escaped)
    return re.sub(r"experts\\\.\d+\\\.", lambda _: r"experts\.\d+\.", escaped)


# (tensor name, shape, quantized?) for every tensor of an output checkpoint
LayoutEntry = tuple[str, Sequence[int], bool]


def unfamiliar_patterns(layout: Iterable[LayoutEntry], skip: Sequence[str]) -> list[str]:
    """Skip patterns for the 2-D weights in the decoder layers left unquantized because their module is not a
    known nn.Linear projection (and not skipped by the user)."""
    modules = [
        module_name(name)
        for name, shape, quantized in layout
        if not quantized and is_layer_matrix(name, shape) and not matches_skip(module_name(name), skip)
    ]
    return list(dict.fromkeys(_unfamiliar_pattern(m) for m in modules))


def skip_modules_for_config(layout: Sequence[LayoutEntry], skip: Sequence[str]) -> list[str] | None:
    """llm_int8_skip_modules to write. transformers converts every nn.Linear not matched by it, and with an
    explicit list it no longer adds its default (lm_head), so the list must name every 2-D weight left
    unquantized outside the decoder layers. None (transformers' default) when that default covers them."""
    outside = sorted(
        {
            module_name(name)
            for name, shape, quantized in layout
            if not quantized and name.endswith(".weight") and len(shape) == 2 and not DECODER_LAYER.search(name)
        }
    )
    default_covers = all(m.split(".")[-1] == "lm_head" or "embed" in m for m in outside)
    unfamiliar = unfamiliar_patterns(layout, skip)
    if not skip and default_covers and not unfamiliar:
        return None
    extra = [m for m in outside if not matches_skip(m, skip)]
    return list(dict.fromkeys([*skip, *extra, *unfamiliar]))


def bnb_quantization_config(
    quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: list[str] | None
) -> dict[str, object]:
    """The `quantization_config` transformers 5 writes for BitsAndBytesConfig(load_in_4bit=True, ...)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def bnb_specs(
    name: str, dtype: str, shape: Sequence[int], quant_type: str, blocksize: int, double_quant: bool
) -> tuple[list[TensorSpec], list[DeferredSpec]]:
    """The tensors bitsandbytes' Linear4bit saves for weight `name` of safetensors `dtype` (F32, BF16 or F16) and
    `shape` (see to_bnb_state_dict): their dtypes and shapes, and the quant state's largest byte length."""
    n = prod(shape)
    blocks = ceil(n / blocksize)
    specs = [
        TensorSpec(name, "U8", ((n + 1) // 2, 1)),
        TensorSpec(f"{name}.absmax", "U8" if double_quant else "F32", (blocks,)),
        TensorSpec(f"{name}.quant_map", "F32", (16,)),
    ]
    meta: dict[str, object] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": SAFETENSORS_TO_TORCH_NAME[dtype],
        "shape": list(shape),
    }
    if double_quant:
        specs += [
            TensorSpec(f"{name}.nested_absmax", "F32", (ceil(blocks / NESTED_BLOCKSIZE),)),
            TensorSpec(f"{name}.nested_quant_map", "F32", (256,)),
        ]
        meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": _LONGEST_FLOAT}
    longest = len(json.dumps(meta).encode("utf-8"))
    return specs, [DeferredSpec(f"{name}.{quant_state_key(quant_type)}", "U8", longest)]


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


def find_quant_state_key(tensors: Collection[str], prefix: str = "weight") -> str | None:
    """The quant state key of the 4-bit weight `prefix` among `tensors` (names, or a dict keyed by name), or None."""
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
