"""The training config: a TOML file, section by section, with the QLoRA recipe's defaults.

    config = load_config("qlora.toml", overrides=["train.lr=1e-4", "lora.r=8"])

Every field is documented in docs/training.md; a test keeps that page and these dataclasses in step.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nibblora.dtypes import COMPUTE_DTYPE_NAMES
from nibblora.errors import ConfigError
from nibblora.quant.names import BNB_QUANT_TYPES

MODES = ("full", "lora", "qlora", "dora", "ia3", "prompt", "prefix", "adapter")
PROMPT_INITS = ("random", "sample_vocab", "text")
ADAPTER_VARIANTS = ("houlsby", "pfeiffer")
ADAPTER_ACTIVATIONS = ("relu", "silu", "gelu")
DTYPES = COMPUTE_DTYPE_NAMES
SCHEDULES = ("cosine", "linear", "constant")
QUANT_TYPES = BNB_QUANT_TYPES
NAN_POLICIES = ("stop", "skip")
PACKED_ATTENTION = ("document", "row")
INT_MAX = 2**31 - 1  # no count in a training config needs more; bigger values are typos or hostile
MAX_ROWS_PER_STEP = 2**20  # data.batch_size x train.grad_accum


@dataclass(frozen=True)
class Rule:
    """What a config value must satisfy beyond its type (the dataclass annotation): the one schema."""

    choices: tuple[str, ...] = ()
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    pattern: str = ""  # strings: must match in full
    expected: str = ""  # how to say the pattern in an error message
    nonempty: bool = False  # strings and lists


def option(default: Any, **rule: Any) -> Any:
    """A dataclass field with its default and its Rule."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": Rule(**rule)})
    return field(default=default, metadata={"rule": Rule(**rule)})


@dataclass
class ModelSection:
    # Hugging Face checkpoint folder (config.json + safetensors); 4-bit checkpoints load as-is
    path: str = option("", nonempty=True)
    dtype: str = option("bfloat16", choices=DTYPES)  # weights and compute (float16: CUDA only)
    gradient_checkpointing: bool = option(True)  # recompute each decoder layer in backward
    keep_mlp_layers: int = option(0, ge=-1, le=INT_MAX)  # selective: N layers (-1: all) recompute attention only
    offload_activations: bool = option(False)  # checkpointed layer inputs wait in host memory until backward
    loss_chunk_tokens: int = option(0, ge=0, le=INT_MAX)  # tokens per chunk of the fused loss; 0: sized per batch
    quant_type: str = option("nf4", choices=QUANT_TYPES)  # qlora only
    double_quant: bool = option(True)  # qlora only: quantize the block scales too (4.127 instead of 4.5 bits/param)
    load_in_4bit: bool = option(False)  # any adapter mode: the frozen base in 4-bit (quant_type); qlora always is


@dataclass
class LoRASection:
    r: int = option(64, ge=1, le=65536)
    alpha: float = option(16.0, gt=0)
    dropout: float = option(0.1, ge=0, lt=1)
    target_modules: str | list[str] = option("all-linear", nonempty=True)
    rslora: bool = option(False)


@dataclass
class IA3Section:
    target_modules: str | list[str] = option(["k_proj", "v_proj", "down_proj"], nonempty=True)
    feedforward_modules: str | list[str] = option(["down_proj"])  # of those, the ones whose input is scaled


@dataclass
class PromptSection:
    num_virtual_tokens: int = option(20, ge=1, le=65536)
    init: str = option("random", choices=PROMPT_INITS)
    init_token_ids: list[int] = option([])  # init = "text": the tokenized init text


@dataclass
class PrefixSection:
    num_virtual_tokens: int = option(20, ge=1, le=65536)
    projection_hidden: int = option(0, ge=0, le=65536)  # > 0: train through the reparameterization MLP


@dataclass
class AdapterSection:
    variant: str = option("houlsby", choices=ADAPTER_VARIANTS)  # houlsby: after attention and MLP; pfeiffer: MLP
    bottleneck_size: int = option(16, ge=1, le=65536)
    non_linearity: str = option("relu", choices=ADAPTER_ACTIVATIONS)


@dataclass
class DataSection:
    train: str = option("")  # a PreparedDataset folder (nibblora.prepare) or a .jsonl of {"input_ids", "labels"} rows
    eval: dict[str, str] = option({})  # name -> dataset; e.g. task = "...", general = "..."
    batch_size: int = option(4, ge=1)  # sequences per micro-batch on each device
    max_length: int = option(0, ge=0)  # truncate longer rows (0: keep them whole)
    pad_token_id: int = option(0, ge=0)  # id used to pad a micro-batch to its longest row (labels there are -100)
    packed_attention: str = option("document", choices=PACKED_ATTENTION)  # packed rows: attend within a document
    general: str = option("")  # general-domain rows (a dataset like data.train): general_fraction and train.ewc
    general_fraction: float = option(0.0, ge=0, lt=1)  # share of every step's rows drawn from data.general


@dataclass
class TrainSection:
    mode: str = option("qlora", choices=MODES)
    max_steps: int = option(1000, ge=1)  # optimizer steps
    lr: float = option(2e-4, gt=0)
    weight_decay: float = option(0.0, ge=0)  # decoupled (AdamW); never applied to biases and norms
    betas: list[float] = option([0.9, 0.999])
    eps: float = option(1e-8, ge=0)
    schedule: str = option("cosine", choices=SCHEDULES)  # after warmup
    warmup_steps: int = option(0, ge=0)  # linear warmup from 0; when 0, warmup_ratio decides
    warmup_ratio: float = option(0.03, ge=0, le=1)
    min_lr_ratio: float = option(0.0, ge=0, le=1)  # the schedule ends at lr * min_lr_ratio
    grad_accum: int = option(4, ge=1)  # micro-batches per optimizer step (per device)
    max_grad_norm: float = option(0.3, ge=0)  # clip the global gradient norm (0: no clipping)
    seed: int = option(42, ge=0, le=2**32 - 1)
    device: str = option(
        "auto", pattern=r"auto|cpu|cuda(:\d{1,3})?", expected="auto, cpu, cuda or cuda:N"
    )  # torchrun: each rank takes cuda:LOCAL_RANK
    paged_optimizer: bool = option(False)  # Adam states in pinned host memory, paged to the GPU for each step
    log_every: int = option(1, ge=1)
    threads: int = option(0, ge=0, le=4096)  # torch CPU threads; 0: OMP_NUM_THREADS, else the CPUs / local ranks
    nan_policy: str = option("stop", choices=NAN_POLICIES)  # a non-finite loss: stop the run, or skip the step
    l2sp: float = option(0.0, ge=0)  # L2-SP: penalty l2sp/2 * sum((w - w_start)^2) over the trained weights
    ewc: float = option(0.0, ge=0)  # EWC: penalty ewc/2 * sum(F * (w - w_start)^2), F the mean-1 diagonal Fisher
    ewc_samples: int = option(64, ge=1, le=INT_MAX)  # rows of data.general the Fisher is estimated on


@dataclass
class EvalSection:
    every: int = option(0, ge=0)  # evaluate every N steps (and at the end); 0: only at the end when eval sets exist
    max_batches: int = option(0, ge=0)  # cap per eval set (0: the whole set)
    batch_size: int = option(0, ge=0)  # 0: data.batch_size


@dataclass
class CheckpointSection:
    every: int = option(100, ge=0)  # write a checkpoint every N steps (and at the end); 0: only at the end
    keep_last: int = option(2, ge=0)  # older checkpoints are deleted (0: keep every checkpoint)
    resume: bool = option(True)  # continue from the newest intact checkpoint in output_dir if there is one


@dataclass
class TrainConfig:
    output_dir: str = option("runs/run", nonempty=True)
    run_name: str = option("")  # default: output_dir's folder name
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    ia3: IA3Section = field(default_factory=IA3Section)
    prompt: PromptSection = field(default_factory=PromptSection)
    prefix: PrefixSection = field(default_factory=PrefixSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError for values the trainer cannot use: each field against its schema (type and Rule),
        then the rules that tie fields together."""
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                for f in dataclasses.fields(value):
                    checked = _check(getattr(value, f.name), f, f"{section.name}.{f.name}", _hints(type(value))[f.name])
                    setattr(value, f.name, checked)
            else:
                setattr(self, section.name, _check(value, section, section.name, _hints(TrainConfig)[section.name]))
        if len(self.train.betas) != 2 or not all(0 <= b < 1 for b in self.train.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.train.betas}")
        targets = self.lora.target_modules
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                raise ConfigError(
                    f"lora.target_modules: {targets!r} is neither 'all-linear' nor a valid regular expression ({err})"
                ) from None
        if self.model.offload_activations and not self.model.gradient_checkpointing:
            raise ConfigError(
                "model.offload_activations moves the layer inputs that gradient checkpointing keeps to host memory, "
                "and without checkpointing there are none; set model.gradient_checkpointing = true or "
                "model.offload_activations = false"
            )
        self._validate_methods()
        for name, path in self.data.eval.items():
            if not name or not path:
                raise ConfigError(f"data.eval: each entry needs a name and a dataset path, got {name!r} = {path!r}")
        if self.data.batch_size * self.train.grad_accum > MAX_ROWS_PER_STEP:
            raise ConfigError(
                f"data.batch_size x train.grad_accum is {self.data.batch_size * self.train.grad_accum:,} "
                f"rows per step per device; at most {MAX_ROWS_PER_STEP:,} are allowed"
            )

    def _validate_methods(self) -> None:
        """The rules that tie a method's section to train.mode and the model."""
        mode = self.train.mode
        if self.model.load_in_4bit and mode == "full":
            raise ConfigError(
                "model.load_in_4bit: full fine-tuning trains every weight, which a 4-bit base cannot "
                "hold; use an adapter mode (qlora, dora, ia3, ...) or set load_in_4bit = false"
            )
        bad_ids = [i for i in self.prompt.init_token_ids if not 0 <= i <= INT_MAX]
        if bad_ids:
            raise ConfigError(f"prompt.init_token_ids: {_show(bad_ids[:3])} are not token ids (0 .. {INT_MAX})")
        if mode == "prompt" and self.prompt.init == "text" and not self.prompt.init_token_ids:
            raise ConfigError(
                "prompt.init_token_ids: prompt.init = 'text' needs the tokenized init text (a list of token ids)"
            )
        for key in ("target_modules", "feedforward_modules"):
            value = getattr(self.ia3, key)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ConfigError(f"ia3.{key}: {value!r} is not a valid regular expression ({err})") from None
        ff, targets = self.ia3.feedforward_modules, self.ia3.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ConfigError(
                f"ia3.feedforward_modules: {sorted(set(ff) - set(targets))} are not in "
                "ia3.target_modules; feed-forward modules are a subset of the targets"
            )


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlevel = 60, 60, 3


def _show(value: Any) -> str:
    """A short repr that stays short (and finite) for huge or deeply nested values."""
    return _SHOW.repr(value)


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint` (float accepts integers), or ConfigError naming the key."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            if not math.isfinite(value if isinstance(value, float) else 0.0) or abs(value) > 1e300:
                raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
            value = float(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif hint == list[float]:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return [_coerce(v, float, f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint == list[int]:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of integers, got {_show(value)}")
        return [_coerce(v, int, f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint == dict[str, str]:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {_show(value)}")
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"{key}: names must be strings, got {_show(k)}")
        return {k: _coerce(v, str, f"{key}.{k}") for k, v in value.items()}
    elif hint == (str | list[str]):
        if isinstance(value, list):
            return [_coerce(v, str, f"{key}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected 'all-linear' or a list of module names, got {_show(value)}")
        ok = True
    else:
        raise AssertionError(f"config field {key} has a type the schema does not know: {hint}")
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {_show(value)}")
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{key}: contains a NUL character")
    return value


def _check(value: Any, f: dataclasses.Field, key: str, hint: Any) -> Any:
    """Type and Rule of one field's value (also for configs built in Python, not read from TOML); returns the
    value as its type (an integer given for a float field becomes a float)."""
    value = _coerce(value, hint, key)
    rule: Rule = f.metadata.get("rule", Rule())
    if rule.choices and value not in rule.choices:
        raise ConfigError(f"{key} must be one of {', '.join(rule.choices)}, got {_show(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        upper = INT_MAX if isinstance(value, int) and rule.le is None else rule.le
        for bound, fails, text in (
            (rule.ge, lambda v, b: v < b, ">="),
            (rule.gt, lambda v, b: v <= b, ">"),
            (upper, lambda v, b: v > b, "<="),
            (rule.lt, lambda v, b: v >= b, "<"),
        ):
            if bound is not None and fails(value, bound):
                shown = int(bound) if float(bound).is_integer() else bound
                raise ConfigError(f"{key} must be {text} {shown}, got {_show(value)}")
    if rule.pattern and not re.fullmatch(rule.pattern, value):
        raise ConfigError(f"{key} must be {rule.expected or 'like ' + rule.pattern}, got {_show(value)}")
    if rule.nonempty and not value:
        if key == "model.path":
            raise ConfigError("model.path is required: a Hugging Face checkpoint folder")
        raise ConfigError(f"{key} must not be empty")
    return value


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys (a typo must not silently use a default) and
    values of the wrong type."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
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
            value = _coerce(value, hints[key], f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A --set value read as TOML (numbers, booleans, lists, quoted strings); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"--set value {_show(text)}: nested too deeply") from None


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override to the raw config dict, in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-4")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a table")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = _parse_value(text.strip())


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A checked TrainConfig from a dict shaped like the TOML file (the dict is not modified), with `key=value`
    overrides applied first. Every problem is a ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a training config is a table of sections, got {_show(data)}")
    data = dict(data)  # overrides copy each table they change (apply_override): the caller's dict stays as it was
    for assignment in overrides:
        apply_override(data, assignment)
    config = _from_dict(TrainConfig, data, "")
    config.validate()
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML config, apply `key=value` overrides, check it. Relative paths inside stay as written
    (they are resolved against the working directory, like every other path on the command line)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a training config") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    return config_from_dict(data, overrides)
