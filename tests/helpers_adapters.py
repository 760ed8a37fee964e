"""Seeded generators of hostile adapter folders (broken configs, broken safetensors, wrong shapes and dtypes,
non-finite values), each derived from one good peft adapter, for the hostile-input tests."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Case:
    """A hostile adapter: `must_fail` when no reader may accept it; `needle` must then appear in the message."""

    name: str
    must_fail: bool
    needle: str | None = None


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


# Values no LoRA config may hold for these keys (each must be refused, not coerced).
BAD_VALUES: dict[str, list[object]] = {
    "r": [0, -1, 4.5, 4.0, None, "4", True, [4], {"r": 4}, 10**400],
    "lora_alpha": [float("nan"), float("inf"), -float("inf"), "eight", None, [8], True, 10**400],
    "use_rslora": ["false", "true", 0, 1, [], "no"],
    "use_dora": ["false", 1, "yes"],
    "fan_in_fan_out": ["false", 0, 1.0],
    "lora_bias": ["false", 2],
    "target_modules": [5, [], [3], ["q_proj", None], {"q_proj": 1}, "((", True, ["nothing_matches"]],
    "rank_pattern": [[1], "q_proj", 3, {"q_proj": 0}, {"q_proj": 2.5}, {"q_proj": "2"}, {"(": 2}, {"q_proj": None}],
    "alpha_pattern": [[1], {"q_proj": float("nan")}, {"q_proj": "x"}, {"q_proj": True}, {")": 1}],
    "peft_type": ["IA3", "PROMPT_TUNING", "lora", 3, None],
    "lora_dropout": [1.0, -0.1, "0.1", float("nan")],
    "bias": ["some", 1],
    "modules_to_save": ["lm_head", [1], {"lm_head": 1}],
    "layers_to_transform": [[0, "1"], "0", -1, [True]],
    "layers_pattern": [3, [3]],
    "base_model_name_or_path": [3, ["a"]],
}

# Whole-file damage to adapter_config.json.
BAD_CONFIG_FILES: list[tuple[str, bytes | None]] = [
    ("empty", b""),
    ("not_json", b"r = 8\n"),
    ("truncated_json", b'{"r": 8, "lora_alpha": 1'),
    ("array", b"[1, 2, 3]"),
    ("string", b'"LORA"'),
    ("null", b"null"),
    ("binary", bytes(range(256))),
    ("utf8_broken", b'{"r": 8, "lora_alpha": 16, "x": "\xff\xfe"}'),
    ("deep", b"[" * 100_000 + b"]" * 100_000),
    ("deep_object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("missing", None),
]

INT_DTYPES = {
    "I8": np.int8,
    "U8": np.uint8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
    "U64": np.uint64,
    "BOOL": np.bool_,
}


def hostile_adapters(good: Path, root: Path, seed: int, count: int) -> list[tuple[Path, Case]]:
    """`count` hostile copies of the adapter folder `good` under `root`, generated from `seed`."""
    rng = random.Random(seed)
    config = json.loads((good / CONFIG).read_text())
    raw = (good / WEIGHTS).read_bytes()
    header, data = split_safetensors(raw)
    keys = sorted(k for k in header if k != "__metadata__")
    makers: list[Callable[[int, Path], Case]] = []

    def write(directory: Path, cfg: dict | bytes | None, weights: bytes | None) -> None:
        directory.mkdir(parents=True)
        if isinstance(cfg, dict):
            (directory / CONFIG).write_text(json.dumps(cfg))
        elif cfg is not None:
            (directory / CONFIG).write_bytes(cfg)
        if weights is not None:
            (directory / WEIGHTS).write_bytes(weights)

    def bad_value(i: int, d: Path) -> Case:
        key = rng.choice(sorted(BAD_VALUES))
        value = rng.choice(BAD_VALUES[key])
        write(d, dict(config, **{key: value}), raw)
        return Case(
            f"config {key}={value!r}"[:80],
            True,
            key if key != "target_modules" or value != ["nothing_matches"] else "does not select",
        )

    def bad_config_file(i: int, d: Path) -> Case:
        name, content = rng.choice(BAD_CONFIG_FILES)
        write(d, content, raw)
        return Case(f"config file {name}", True, CONFIG)

    def missing_key(i: int, d: Path) -> Case:
        key = rng.choice(["r", "lora_alpha"])
        write(d, {k: v for k, v in config.items() if k != key}, raw)
        return Case(f"config without {key}", True, key)

    def truncated(i: int, d: Path) -> Case:
        cut = rng.randrange(0, len(raw))
        write(d, config, raw[:cut])
        return Case(f"weights truncated at {cut}", True, WEIGHTS)

    def header_length(i: int, d: Path) -> Case:
        n = rng.choice([0, 1, 2**63 - 1, 2**62, len(raw), len(raw) - 8 + 1, rng.randrange(1, 2**32)])
        write(d, config, struct.pack("<Q", n) + raw[8:])
        return Case(f"header length {n}", n != struct.unpack("<Q", raw[:8])[0], WEIGHTS)

    def flip_header_byte(i: int, d: Path) -> Case:
        n = struct.unpack("<Q", raw[:8])[0]
        buf = bytearray(raw)
        at = rng.randrange(8, 8 + n)
        buf[at] ^= 1 << rng.randrange(8)
        write(d, config, bytes(buf))
        return Case(f"header bit flip at {at}", False)

    def flip_data_byte(i: int, d: Path) -> Case:
        buf = bytearray(raw)
        n = struct.unpack("<Q", raw[:8])[0]
        at = rng.randrange(8 + n, len(raw))
        buf[at] ^= 1 << rng.randrange(8)
        write(d, config, bytes(buf))
        return Case(f"data bit flip at {at}", False)  # may stay finite: then it loads

    def garbage(i: int, d: Path) -> Case:
        write(d, config, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))))
        return Case("weights are random bytes", True, WEIGHTS)

    def header_edit(i: int, d: Path) -> Case:
        h = json.loads(json.dumps(header))
        key = rng.choice(keys)
        what = rng.choice(["dtype", "shape", "offsets", "name_type", "extra"])
        if what == "dtype":
            h[key]["dtype"] = rng.choice(["I32", "U32", "F8_E4M3", "XYZ", "F64", 3])
        elif what == "shape":
            h[key]["shape"] = rng.choice([[], [1], [-1, 4], [4.5, 2], ["4", 2], [2**40, 2**40], None])
        elif what == "offsets":
            b, e = h[key]["data_offsets"]
            h[key]["data_offsets"] = rng.choice(
                [[e, b], [b, e + 4], [b - 4, e], [0, len(data) + 8], [b, 2**64 - 1], [b + 0.5, e]]
            )
        elif what == "name_type":
            h[key] = rng.choice([None, [], "x", {"dtype": "F32"}])
        else:
            h["__metadata__"] = rng.choice([{"format": 3}, [], "x"])
        write(d, config, join_safetensors(h, data))
        return Case(f"header {what} of {key}", False)

    def non_finite(i: int, d: Path) -> Case:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(good / WEIGHTS))
        key = rng.choice(keys)
        value = rng.choice([np.nan, np.inf, -np.inf])
        flat = tensors[key].reshape(-1)
        flat[rng.randrange(flat.size)] = value
        d.mkdir(parents=True)
        (d / CONFIG).write_text(json.dumps(config))
        save_file(tensors, str(d / WEIGHTS))
        return Case(f"{value} in {key}", True, key)

    def int_dtype(i: int, d: Path) -> Case:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(good / WEIGHTS))
        key = rng.choice(keys)
        name = rng.choice(sorted(INT_DTYPES))
        value = tensors[key] * 1000
        tensors[key] = value != 0 if name == "BOOL" else value.astype(INT_DTYPES[name])
        d.mkdir(parents=True)
        (d / CONFIG).write_text(json.dumps(config))
        save_file(tensors, str(d / WEIGHTS))
        return Case(f"{key} as {name}", True, key)

    def tensor_edit(i: int, d: Path) -> Case:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(good / WEIGHTS))
        key = rng.choice(keys)
        what = rng.choice(
            [
                "transpose",
                "wider",
                "rank",
                "flat",
                "drop",
                "unknown",
                "no_prefix",
                "foreign_module",
                "lora_C",
                "zero_rank",
                "empty",
            ]
        )
        must, needle = True, key
        if what == "transpose":
            tensors[key] = np.ascontiguousarray(tensors[key].T)
        elif what == "wider":
            tensors[key] = np.zeros((tensors[key].shape[0], tensors[key].shape[1] + 1), np.float32)
        elif what == "rank":
            a = tensors[key]
            tensors[key] = np.zeros(
                (a.shape[0] + 1, a.shape[1]) if ".lora_A." in key else (a.shape[0], a.shape[1] + 1), np.float32
            )
        elif what == "flat":
            tensors[key] = tensors[key].reshape(-1)
        elif what == "drop":
            del tensors[key]
            needle = "lora_B" if ".lora_A." in key else "lora_A"
        elif what == "unknown":
            tensors["base_model.model.something.else"] = np.zeros(3, np.float32)
            must, needle = False, None  # merge treats it as modules_to_save (and fails on the base); load refuses
        elif what == "no_prefix":
            tensors[key.removeprefix("base_model.model.")] = tensors.pop(key)
            needle = key.removeprefix("base_model.model.")
        elif what == "foreign_module":
            pair = key.rsplit(".lora_", 1)[0]
            for k in [k for k in keys if k.startswith(pair + ".lora_")]:
                tensors[k.replace(".layers.0.", ".layers.9.").replace(".layers.1.", ".layers.9.")] = tensors.pop(k)
            needle = None
        elif what == "lora_C":
            tensors[key.replace(".lora_A.", ".lora_C.").replace(".lora_B.", ".lora_C.")] = tensors[key]
            needle = "lora_C"
        elif what == "zero_rank":
            tensors[key] = np.zeros(
                (0, tensors[key].shape[1]) if ".lora_A." in key else (tensors[key].shape[0], 0), np.float32
            )
        else:
            tensors = {}
            needle = "no LoRA tensors"
        d.mkdir(parents=True)
        (d / CONFIG).write_text(json.dumps(config))
        save_file(tensors, str(d / WEIGHTS))
        return Case(f"tensor {what} {key}", must, needle)

    def missing_weights(i: int, d: Path) -> Case:
        write(d, config, None)
        if rng.random() < 0.5:
            (d / "adapter_model.bin").write_bytes(b"pickle")
        return Case("no adapter_model.safetensors", True, WEIGHTS)

    def weights_is_folder(i: int, d: Path) -> Case:
        write(d, config, None)
        (d / WEIGHTS).mkdir()
        return Case("adapter_model.safetensors is a folder", True, WEIGHTS)

    makers = (
        [bad_value] * 6
        + [bad_config_file] * 2
        + [
            missing_key,
            truncated,
            truncated,
            header_length,
            flip_header_byte,
            flip_header_byte,
            flip_data_byte,
            garbage,
            header_edit,
            header_edit,
            header_edit,
            non_finite,
            non_finite,
            int_dtype,
            int_dtype,
            tensor_edit,
            tensor_edit,
            tensor_edit,
            missing_weights,
            weights_is_folder,
        ]
    )
    out = []
    for i in range(count):
        directory = root / f"case{i:04d}"
        out.append((directory, rng.choice(makers)(i, directory)))
    return out
