"""Exact LoRA parameter counts for a decoder model's shape, before building anything.

A projection [out, in] at rank r trains r * (in + out) parameters (A is [r, in], B is [out, r]).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_SEVEN = ATTENTION + MLP
DEFAULT_TARGETS = {"attention q,k,v,o": ATTENTION, "all linear (7)": ALL_SEVEN}

# Shapes of released models (config.json values), for param_table("llama-2-7b").
PRESETS: dict[str, dict[str, int | bool]] = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "llama-2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def projection_lora_params(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters of one LoRA adapter on an [out, in] projection: r * (in + out)."""
    return r * (in_features + out_features)


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a Llama-style decoder that fix its parameter count."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: object) -> DecoderShape:
        """From a preset name, a dict, or an object with HF config attributes (e.g. a transformers LlamaConfig)."""
        if isinstance(config, str):
            if config.lower() not in PRESETS:
                raise ValueError(f"unknown preset {config!r}; known presets: {sorted(PRESETS)} (or pass a config)")
            config = PRESETS[config.lower()]
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        missing = [k for k in _FIELDS if get(k) is None]
        if missing:
            raise ValueError(
                f"config lacks {missing}; param_table needs {list(_FIELDS)} (num_key_value_heads and "
                "tie_word_embeddings are optional)"
            )
        heads = int(get("num_attention_heads"))
        return cls(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            head_dim=get("head_dim"),
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one layer."""
        d, i = self.hidden_size, self.intermediate_size
        head_dim = self.head_dim or d // self.num_attention_heads
        q, kv = self.num_attention_heads * head_dim, self.num_key_value_heads * head_dim
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, i),
            "up_proj": (d, i),
            "down_proj": (i, d),
        }

    def total_params(self) -> int:
        """Base-model parameters: embeddings, projections, RMSNorm weights, final norm and (untied) lm_head."""
        per_layer = sum(a * b for a, b in self.projections().values()) + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + self.num_hidden_layers * per_layer + self.hidden_size + head


@dataclass(frozen=True)
class ParamRow:
    targets: str
    r: int
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        """Trainable parameters over the base model's parameters."""
        return self.trainable / self.total


@dataclass(frozen=True)
class ProjectionRow:
    """One adapter on one projection: its count and fraction of that projection's weight."""

    name: str
    in_features: int
    out_features: int
    r: int
    trainable: int

    @property
    def fraction(self) -> float:
        return self.trainable / (self.in_features * self.out_features)


@dataclass
class ParamTable:
    shape: DecoderShape
    rows: list[ParamRow]
    projection_rows: list[ProjectionRow]

    def get(self, targets: str, r: int) -> ParamRow:
        for row in self.rows:
            if row.targets == targets and row.r == r:
                return row
        raise KeyError(
            f"no row for targets={targets!r}, r={r}; rows cover {sorted({x.targets for x in self.rows})}"
            f" at ranks {sorted({x.r for x in self.rows})}"
        )

    def format_table(self) -> str:
        width = max(len("targets"), *(len(r.targets) for r in self.rows))
        lines = [
            f"base model: {self.shape.total_params():,} parameters",
            f"{'targets':<{width}}  {'r':>4}  {'trainable':>14}  {'fraction':>8}",
        ]
        for row in self.rows:
            lines.append(f"{row.targets:<{width}}  {row.r:>4}  {row.trainable:>14,}  {100 * row.fraction:>7.2f}%")
        lines.append("one adapter, as a fraction of its own projection:")
        for p in self.projection_rows:
            label = f"{p.name} [{p.out_features}, {p.in_features}]"
            lines.append(f"{label:<{width}}  {p.r:>4}  {p.trainable:>14,}  {100 * p.fraction:>7.2f}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


def _target_sets(targets: object) -> dict[str, tuple[str, ...]]:
    if targets is None:
        return dict(DEFAULT_TARGETS)
    if isinstance(targets, str):
        if targets == "all-linear":
            return {"all linear (7)": ALL_SEVEN}
        return {targets: (targets,)}
    if isinstance(targets, Mapping):
        return {label: tuple(names) for label, names in targets.items()}
    targets = list(targets)
    if all(isinstance(t, str) for t in targets):
        return {",".join(targets): tuple(targets)}
    return {",".join(t): tuple(t) for t in targets}


def param_table(config: object, ranks: Iterable[int] = (4, 8, 16, 64), targets: object = None) -> ParamTable:
    """Exact LoRA trainable-parameter counts for a Llama-style model at each rank and target set.

    config: a preset ("llama-2-7b", "llama-2-13b", "llama-3-8b", "tinyllama-1.1b"), an HF config dict or object.
    targets: None (both q,k,v,o and all seven projections, so the difference is visible), "all-linear", a list of
    projection names, a list of such lists, or {label: names}. Fractions are of the base model's parameters.
    """
    shape = DecoderShape.from_config(config)
    projections = shape.projections()
    total = shape.total_params()
    rows = []
    for label, names in _target_sets(targets).items():
        unknown = [n for n in names if n not in projections]
        if unknown:
            raise ValueError(f"unknown projection(s) {unknown}; choose from {list(projections)}")
        for r in ranks:
            per_layer = sum(projection_lora_params(*projections[n], r) for n in names)
            rows.append(ParamRow(label, int(r), per_layer * shape.num_hidden_layers, total))
    q_in, q_out = projections["q_proj"]
    projection_rows = [
        ProjectionRow("q_proj", q_in, q_out, int(r), projection_lora_params(q_in, q_out, r)) for r in ranks
    ]
    return ParamTable(shape, rows, projection_rows)
