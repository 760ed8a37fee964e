"""verify_merge: the base model with the adapter against the merged model, on the same prompts.

Both run in nibblora's own model (nibblora.models), in float32 unless asked otherwise: the adapter as separate
LoRA layers on the base (a 4-bit base stays 4-bit, as in training), the merged checkpoint as plain weights.
The report gives the largest absolute logit difference, the KL divergence KL(adapter || merged) of the
next-token distributions (mean and max over positions) and how often the two models pick the same next token.

The verdict. Any NaN or infinity in a logit or a merged weight fails. Otherwise, by default, the tolerances
follow the merged checkpoint's own rounding (see nibblora.verify.rounding): the merged model is run a second
time with every float weight moved by a fresh rounding of its stored dtype, and the merge passes when its KL and
logit differences stay within ROUNDING_FACTOR times what that rounding alone causes (plus a float32 floor), and
every next-token disagreement is a near-tie that such rounding can flip. A correct bf16 merge therefore passes
while a missing scaling or a dropped layer fails in any dtype. Explicit `atol` / `kl_tol` replace the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nibblora.errors import CheckpointError
from nibblora.verify.rounding import perturb_by_rounding, stored_dtypes

SAMPLE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "Q: What is 17 times 23?\nA:",
)
# How much larger than one rounding of the merged weights a faithful merge's differences may be. The merge's
# own rounding and the simulated one are draws of the same size, so their ratio stays near 1; a wrong merge
# (wrong scaling, a layer left out) is off by the adapter's whole update, orders of magnitude more.
ROUNDING_FACTOR = 10.0
# Differences that float32 arithmetic alone produces (summation order: x @ W + s * (x @ A^T) @ B^T against
# x @ (W + s * B @ A)^T), added to the rounding bounds so that a float32 merge is not held to zero.
FLOOR_ABS_DIFF = 1e-4
FLOOR_KL = 1e-9


@dataclass(frozen=True)
class VerifyReport:
    """max_abs_logit_diff / mean_kl / max_kl: adapter against merged over `positions` next-token positions.
    argmax_agreement: share of positions where both pick the same token; argmax_flips: disagreements that are
    not near-ties (the adapted model's top-2 margin exceeds 2 * atol). rounding_*: what one rounding of the
    merged weights (merged_dtype) causes, the yardstick of the automatic bounds (NaN when bounds were given).
    nonfinite: what held NaN / infinity (logits, or merged weights by name)."""

    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    positions: int
    atol: float
    kl_tol: float
    argmax_agreement: float = 1.0
    argmax_flips: int = 0
    nonfinite: tuple[str, ...] = ()
    merged_dtype: str = ""
    rounding_max_abs_diff: float = math.nan
    rounding_max_kl: float = math.nan
    automatic: bool = False
    failures: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        failures = []
        if self.nonfinite:
            failures.append(
                f"non-finite values in {', '.join(self.nonfinite[:4])}"
                + (f" and {len(self.nonfinite) - 4} more" if len(self.nonfinite) > 4 else "")
            )
        # `not x <= tol` is True for NaN, where `x > tol` would be False and let it pass.
        if not self.max_abs_logit_diff <= self.atol:
            failures.append(f"max |logit diff| {self.max_abs_logit_diff:.3g} > {self.atol:.3g}")
        if not self.max_kl <= self.kl_tol:
            failures.append(f"max KL {self.max_kl:.3g} > {self.kl_tol:.3g}")
        if self.argmax_flips:
            failures.append(
                f"{self.argmax_flips} next-token choice(s) differ where the margin is larger than rounding can explain"
            )
        if self.positions == 0:
            failures.append("no position was compared")
        object.__setattr__(self, "failures", tuple(failures))

    @property
    def passed(self) -> bool:
        return not self.failures

    def format(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        how = (
            f"bounds from the {self.merged_dtype} rounding of the merged weights (x{ROUNDING_FACTOR:g}: it "
            f"alone moves logits by {self.rounding_max_abs_diff:.3g}, KL {self.rounding_max_kl:.3g})"
            if self.automatic
            else "bounds given"
        )
        text = (
            f"{verdict}: max |logit diff| {self.max_abs_logit_diff:.3g} (tolerance {self.atol:.3g}), "
            f"KL(adapter || merged) mean {self.mean_kl:.3g} max {self.max_kl:.3g} nats (tolerance "
            f"{self.kl_tol:.3g}), same next token at {100 * self.argmax_agreement:.1f}% of {self.positions} "
            f"positions; {how}"
        )
        return text + (f"\n  failed: {'; '.join(self.failures)}" if self.failures else "")


@dataclass
class _Stats:
    """Running comparison of two models' logits over positions (float64)."""

    max_abs_diff: float = 0.0
    kl_sum: float = 0.0
    max_kl: float = 0.0
    positions: int = 0
    agree: int = 0
    margins_of_flips: list[float] = field(default_factory=list)
    nonfinite: bool = False

    def add(self, p_logits: torch.Tensor, q_logits: torch.Tensor) -> None:
        """p, q: [positions, vocab] float64 logits of the reference and the candidate."""
        if not (torch.isfinite(p_logits).all() and torch.isfinite(q_logits).all()):
            self.nonfinite = True
            return
        self.max_abs_diff = max(self.max_abs_diff, (p_logits - q_logits).abs().max().item())
        log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)
        self.kl_sum += kl.sum().item()
        self.max_kl = max(self.max_kl, kl.max().item())
        self.positions += kl.numel()
        top2 = p_logits.topk(min(2, p_logits.shape[-1]), dim=-1).values
        p_arg, q_arg = p_logits.argmax(-1), q_logits.argmax(-1)
        same = p_arg == q_arg
        self.agree += int(same.sum())
        if top2.shape[-1] == 2:
            self.margins_of_flips.extend((top2[:, 0] - top2[:, 1])[~same].tolist())

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.positions if self.positions else math.nan


def _inputs(base: Path, prompts: Sequence[str] | None, vocab: int, seed: int, seq_len: int) -> list[torch.Tensor]:
    """Token ids of the prompts (with the base's tokenizer.json), or random ids when there is no tokenizer."""
    tokenizer_file = base / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        ids = [tokenizer.encode(p).ids for p in (prompts or SAMPLE_PROMPTS)]
        return [torch.tensor([i], dtype=torch.long) for i in ids if i]
    if prompts:
        raise ValueError(
            f"{base} has no tokenizer.json, so text prompts cannot be encoded; omit --prompt to "
            "compare on random token ids"
        )
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq_len), generator=generator) for _ in range(len(SAMPLE_PROMPTS))]


def _nonfinite_parameters(model: nn.Module, label: str) -> list[str]:
    return [
        f"{label} weight {name}"
        for name, p in model.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(p).all())
    ]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[0].double()  # float64: the KL of near-equal logits is tiny


def verify_merge(
    base_dir: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    *,
    prompts: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    atol: float | None = None,
    kl_tol: float | None = None,
    seed: int = 0,
    seq_len: int = 32,
) -> VerifyReport:
    """Compare the base + adapter with the merged model on `prompts` (default: a few samples; random ids when the
    base has no tokenizer.json), computing in `dtype`. atol / kl_tol: fixed bounds on max |logit diff| and max
    KL; None (default) derives both from the rounding of the merged checkpoint's stored dtypes (see module doc).
    Raises an InputError (AdapterError, CheckpointError...) naming the file for unreadable inputs."""
    from nibblora.lora import load_adapter
    from nibblora.models import load_model

    base_dir, merged_dir = Path(base_dir), Path(merged_dir)
    adapted = load_model(base_dir, dtype=dtype)
    load_adapter(adapted, adapter_dir, check_base_model=False)
    merged = load_model(merged_dir, dtype=dtype)
    if merged.config.vocab_size != adapted.config.vocab_size:
        raise CheckpointError(
            f"verifying: {merged_dir} has a vocabulary of {merged.config.vocab_size} tokens where "
            f"the base {base_dir} has {adapted.config.vocab_size}; it is not a merge of this base"
        )
    stored = stored_dtypes(merged_dir)
    nonfinite = _nonfinite_parameters(merged, "merged") + _nonfinite_parameters(adapted, "base + adapter")
    inputs = _inputs(base_dir, prompts, adapted.config.vocab_size, seed, seq_len)
    stats, merged_logits = _Stats(), []
    with torch.no_grad():
        for ids in inputs:
            a, m = _logits(adapted, ids), _logits(merged, ids)
            stats.add(a, m)
            merged_logits.append(m.float())  # exact for float32 / bf16 / fp16 compute, half the memory
    if stats.nonfinite:
        nonfinite.append("logits")
    float_dtypes = sorted({d for d in stored.values() if d in ("F64", "F32", "F16", "BF16")})
    merged_dtype = "/".join(float_dtypes) or "unknown"
    automatic = atol is None or kl_tol is None
    rounding = _Stats()
    if automatic:
        del adapted  # the rounding pass needs only the merged model
        perturb_by_rounding(merged, stored, seed=seed)
        with torch.no_grad():
            for ids, m in zip(inputs, merged_logits):
                rounding.add(m.double(), _logits(merged, ids))
        if atol is None:
            atol = ROUNDING_FACTOR * rounding.max_abs_diff + FLOOR_ABS_DIFF
        if kl_tol is None:
            kl_tol = ROUNDING_FACTOR * rounding.max_kl + FLOOR_KL
    assert atol is not None and kl_tol is not None
    # A next-token choice can flip only where the top-2 margin is within twice the largest logit difference.
    flips = sum(margin > 2 * atol for margin in stats.margins_of_flips)
    positions = stats.positions
    return VerifyReport(
        max_abs_logit_diff=stats.max_abs_diff if not stats.nonfinite else math.nan,
        mean_kl=stats.mean_kl if not stats.nonfinite else math.nan,
        max_kl=stats.max_kl if not stats.nonfinite else math.nan,
        positions=positions,
        atol=atol,
        kl_tol=kl_tol,
        argmax_agreement=stats.agree / positions if positions else math.nan,
        argmax_flips=flips,
        nonfinite=tuple(nonfinite),
        merged_dtype=merged_dtype,
        rounding_max_abs_diff=rounding.max_abs_diff if automatic else math.nan,
        rounding_max_kl=rounding.max_kl if automatic else math.nan,
        automatic=automatic,
    )
