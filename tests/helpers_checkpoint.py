"""Tiny checkpoints and adapters written by hand (no transformers), and hostile variants of them, for the
checkpoint-layer tests: quantize and merge inputs, kill tests, full disks."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_JSON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}
Q = "model.layers.0.self_attn.q_proj.weight"


def small_tensors(seed: int = 1, dtype: torch.dtype = torch.float32, layers: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(dtype)}
    for i in range(layers):
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g).to(dtype)
        out[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(16, 8, generator=g).to(dtype)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(8, dtype=dtype)
    out["lm_head.weight"] = torch.randn(16, 8, generator=g).to(dtype)
    return out


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None, shards: int = 1
) -> Path:
    """config.json + model.safetensors, or `shards` shard files with their index."""
    tensors = small_tensors() if tensors is None else tensors
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_JSON if config is None else config))
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_adapter(path: Path, scale: float = 1.0, seed: int = 2, layers: int = 1) -> Path:
    """A peft LoRA adapter (r=2) on q_proj of the small checkpoint with `layers` layers."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": "tiny",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for i in range(layers):
        pre = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{pre}.lora_A.weight"] = torch.randn(2, 8, generator=g) * scale
        tensors[f"{pre}.lora_B.weight"] = torch.randn(8, 2, generator=g) * scale
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def leftovers(out: Path) -> list[str]:
    """The output folder and any hidden sibling a writer of it left behind."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


# ---------------------------------------------------------------- hostile variants


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict | str | bytes, data: bytes, pad: bool = True) -> bytes:
    blob = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    )
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _entry_edit(field: str, value) -> Callable[[dict, random.Random], None]:
    def edit(h: dict, rng: random.Random) -> None:
        h[rng.choice([k for k in h if k != "__metadata__"])][field] = value

    return edit


# Header edits: each makes a header the safetensors format forbids.
HEADER_EDITS: dict[str, Callable[[dict, random.Random], None]] = {
    "float_shape": _entry_edit("shape", [8.0, 8.0]),
    "string_shape": _entry_edit("shape", ["8", "8"]),
    "negative_shape": _entry_edit("shape", [-8, -8]),
    "float_offsets": _entry_edit("data_offsets", [0.0, 256.5]),
    "string_offsets": _entry_edit("data_offsets", ["0", "256"]),
    "one_offset": _entry_edit("data_offsets", [0]),
    "unknown_dtype": _entry_edit("dtype", "F128"),
    "dtype_not_string": _entry_edit("dtype", 4),
    "entry_not_object": lambda h, r: h.__setitem__(_first(h), [1, 2, 3]),
    "metadata_number": lambda h, r: h.__setitem__("__metadata__", {"format": 5}),
    "metadata_list": lambda h, r: h.__setitem__("__metadata__", ["pt"]),
    "metadata_nested": lambda h, r: h.__setitem__("__metadata__", {"format": {"a": "b"}}),
    "wrong_width": lambda h, r: h[_first(h)].__setitem__("dtype", "F16" if h[_first(h)]["dtype"] != "F16" else "F32"),
    "overlap": lambda h, r: [
        e.__setitem__("data_offsets", [0, e["data_offsets"][1] - e["data_offsets"][0]])
        for k, e in h.items()
        if k != "__metadata__"
    ],
    "huge_shape": _entry_edit("shape", [2**62, 2**62]),
}


def _lone_surrogate_name(raw: bytes, rng: random.Random) -> bytes:
    h, data = _split(raw)
    k = _first(h)
    text = json.dumps(h).replace(json.dumps(k), json.dumps(k)[:-1] + '\\ud800"', 1)
    return _join(text, data)


def _deep_header(raw: bytes, rng: random.Random) -> bytes:
    _, data = _split(raw)
    depth = rng.choice([200, 5000, 100_000])
    return _join("[" * depth + "]" * depth, data)


def _header_len(raw: bytes, rng: random.Random) -> bytes:
    value = rng.choice([2**62, 2**64 - 1, len(raw), len(raw) - 7, 0, 1])
    return struct.pack("<Q", value) + raw[8:]


def _truncate(raw: bytes, rng: random.Random) -> bytes:
    return raw[: rng.randrange(0, len(raw))]


def _flip(raw: bytes, rng: random.Random) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(8, 8 + n)  # inside the header JSON
        out[i] = rng.randrange(256)
    return bytes(out)


def _trailing(raw: bytes, rng: random.Random) -> bytes:
    return raw + bytes(rng.randint(1, 64))


def _not_utf8(raw: bytes, rng: random.Random) -> bytes:
    h, data = _split(raw)
    blob = json.dumps(h).encode()
    i = blob.index(b'"', 2) - 1
    return _join(blob[:i] + b"\xff\xfe" + blob[i:], data)


FILE_EDITS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "lone_surrogate_name": _lone_surrogate_name,
    "deep_header": _deep_header,
    "header_len": _header_len,
    "truncate": _truncate,
    "flip_header_bytes": _flip,
    "trailing_bytes": _trailing,
    "not_utf8": _not_utf8,
}
for _name, _edit in HEADER_EDITS.items():

    def _apply(raw: bytes, rng: random.Random, _edit=_edit) -> bytes:
        h, data = _split(raw)
        _edit(h, rng)
        return _join(h, data)

    FILE_EDITS[_name] = _apply


def _deep(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


CONFIG_TEXTS: dict[str, Callable[[random.Random], str]] = {
    "not_json": lambda r: '{"model_type": "llama",',
    "array": lambda r: "[1, 2]",
    "deep_object": lambda r: _deep(r.choice([5000, 100_000])),
    "deep_array_value": lambda r: '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "not_utf8": lambda r: '{"model_type": "ll\udcffama"}',
    "quant_config_string": lambda r: json.dumps({**LLAMA_JSON, "quantization_config": "bitsandbytes"}),
    "quant_config_list": lambda r: json.dumps({**LLAMA_JSON, "quantization_config": ["x"]}),
    "quant_config_8bit": lambda r: json.dumps(
        {**LLAMA_JSON, "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    ),
    "quant_config_gptq": lambda r: json.dumps({**LLAMA_JSON, "quantization_config": {"quant_method": "gptq"}}),
    "architectures_huge": lambda r: json.dumps({"model_type": "llama", "architectures": ["BertModel"] * 10_000}),
    "lone_surrogate_values": lambda r: '{"model_type": "\\ud800", "architectures": ["\\udfffForCausalLM"]}',
}


def _index(weight_map) -> str:
    return json.dumps({"metadata": {}, "weight_map": weight_map})


INDEX_TEXTS: dict[str, Callable[[dict, random.Random], str]] = {
    "not_json": lambda wm, r: '{"weight_map": {',
    "deep": lambda wm, r: '{"weight_map": ' + _deep(r.choice([3000, 100_000])) + "}",
    "weight_map_list": lambda wm, r: json.dumps({"weight_map": list(wm)}),
    "no_weight_map": lambda wm, r: json.dumps({"metadata": {}}),
    "parent_path": lambda wm, r: _index({k: "../" + v for k, v in wm.items()}),
    "absolute_path": lambda wm, r: _index({k: "/etc/" + v for k, v in wm.items()}),
    "lone_surrogate_file": lambda wm, r: _index(wm).replace(".safetensors", "\\ud800.safetensors", 1),
    "null_byte_file": lambda wm, r: _index(wm).replace(".safetensors", "\\u0000.safetensors", 1),
    "not_safetensors": lambda wm, r: _index(dict.fromkeys(wm, "config.json")),
    "missing_shard": lambda wm, r: _index({**wm, "extra.weight": "model-00009-of-00009.safetensors"}),
    "tensor_not_in_shard": lambda wm, r: _index({**wm, "model.ghost.weight": next(iter(wm.values()))}),
    "wrong_shard": lambda wm, r: _index(dict(zip(wm, reversed(list(wm.values())), strict=True))),
    "value_number": lambda wm, r: _index(dict.fromkeys(wm, 7)),
}
