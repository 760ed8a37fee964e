"""The training config: a TOML file, section by section, with the QLoRA recipe's defaults.

    config = load_config("qlora.toml", overrides=["train.lr=1e-4", "lora.r=8"])

Every field is documented in docs/training.md; a test keeps that page and these dataclasses in step.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from nibblora.errors import ConfigError

MODES = ("full", "lora", "qlora")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ModelSection:
    path: str = ""  # Hugging Face checkpoint folder (config.json + safetensors); 4-bit checkpoints load as-is
    dtype: str = "bfloat16"  # weights and compute: float32 | bfloat16 | float16 (float16: CUDA only)
    gradient_checkpointing: bool = True  # recompute each decoder layer in backward
    quant_type: str = "nf4"  # qlora only: nf4 | fp4
    double_quant: bool = True  # qlora only: quantize the block scales too (4.127 instead of 4.5 bits/param)


@dataclass
class LoRASection:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False


@dataclass
class DataSection:
    train: str = ""  # a PreparedDataset folder (nibblora.prepare) or a .jsonl of {"input_ids", "labels"} rows
    eval: dict[str, str] = field(default_factory=dict)  # name -> dataset; e.g. task = "...", general = "..."
    batch_size: int = 4  # sequences per micro-batch on each device
    max_length: int = 0  # truncate longer rows (0: keep them whole)
    pad_token_id: int = 0  # id used to pad a micro-batch to its longest row (labels there are -100)


@dataclass
class TrainSection:
    mode: str = "qlora"  # full | lora | qlora
    max_steps: int = 1000  # optimizer steps
    lr: float = 2e-4
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to biases and norms
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # after warmup: cosine | linear | constant
    warmup_steps: int = 0  # linear warmup from 0; when 0, warmup_ratio decides
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    grad_accum: int = 4  # micro-batches per optimizer step (per device)
    max_grad_norm: float = 0.3  # clip the global gradient norm (0: no clipping)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: each rank takes cuda:LOCAL_RANK)
    paged_optimizer: bool = False  # Adam states in pinned host memory, paged to the GPU for each step
    log_every: int = 1


@dataclass
class EvalSection:
    every: int = 0  # evaluate every N steps (and at the end); 0: only at the end when eval sets exist
    max_batches: int = 0  # cap per eval set (0: the whole set)
    batch_size: int = 0  # 0: data.batch_size


@dataclass
class CheckpointSection:
    every: int = 100  # write a checkpoint every N steps (and at the end); 0: only at the end
    keep_last: int = 2  # older checkpoints are deleted
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"
    run_name: str = ""  # default: output_dir's folder name
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError for values the trainer cannot use."""
        checks = [
            (self.train.mode in MODES, f"train.mode must be one of {', '.join(MODES)}"),
            (self.model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}"),
            (self.model.quant_type in ("nf4", "fp4"), "model.quant_type must be nf4 or fp4"),
            (self.train.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}"),
            (bool(self.model.path), "model.path is required: a Hugging Face checkpoint folder"),
            (self.train.max_steps > 0, "train.max_steps must be positive"),
            (self.train.grad_accum > 0, "train.grad_accum must be positive"),
            (self.data.batch_size > 0, "data.batch_size must be positive"),
            (self.lora.r > 0, "lora.r must be positive"),
            (0.0 <= self.lora.dropout < 1.0, "lora.dropout must be in [0, 1)"),
            (len(self.train.betas) == 2, "train.betas must be two numbers"),
            (self.train.lr > 0, "train.lr must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys (a typo must not silently use a default)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown key; known keys here: {', '.join(known)}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a [{where}{key}] table")
            value = _from_dict(type(default), value, f"{where}{key}.")
        else:
            value = _coerce(value, default, f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
    elif isinstance(default, list) and not isinstance(default, str):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
    elif key == "lora.target_modules":
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ConfigError(f"{key}: expected 'all-linear' or a list of module names, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _parse_value(text: str) -> Any:
    """A --set value read as TOML (numbers, booleans, lists, quoted strings); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override to the raw config dict, in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-4")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a table")
    node[parts[-1]] = _parse_value(text.strip())


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for assignment in overrides:
        apply_override(data, assignment)
    config = _from_dict(TrainConfig, data, "")
    config.validate()
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML config, apply `key=value` overrides, check it. Relative paths inside stay as written
    (they are resolved against the working directory, like every other path on the command line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    return config_from_dict(data, overrides)
