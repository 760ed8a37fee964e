"""The lesson's claims about parameter-efficient methods, each judged from the measured table. Torch-free.

    verdicts = judge_claims(rows)          # rows: {row name: measured row (report.ROW_KEYS)}
    for v in verdicts: print(v.format())

A verdict is computed from the numbers every time (never written down in advance): `holds` is True, False, or
None when a row it needs is missing or a number is undefined. `evidence` quotes the numbers and the threshold.
Exact-match differences come with their sampling noise (1.96 standard errors of the difference of two
proportions over the held-out rows), so a verdict that rests on a difference smaller than the noise says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]

# Thresholds, named so the claims' wording and the code agree.
LORA_VS_FULL_RATIO = 0.98  # "within ~1-2% of full fine-tuning": LoRA's exact match >= 98% of full FT's
QLORA_VS_LORA_RATIO = 0.90  # "slightly below": at most LoRA's exact match and at least 90% of it
PROMPT_WEAK_RATIO = 0.50  # "weak": under half of full fine-tuning's exact match
LATENCY_THRESHOLD = 0.03  # a generation slowdown counts once it exceeds 3% and the timing noise


@dataclass(frozen=True)
class Verdict:
    key: str
    claim: str
    holds: bool | None
    evidence: str

    @property
    def label(self) -> str:
        return {True: "supported", False: "not supported", None: "not measured"}[self.holds]

    def format(self) -> str:
        return f"- **{self.claim}**: {self.label}. {self.evidence}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "claim": self.claim,
            "holds": self.holds,
            "verdict": self.label,
            "evidence": self.evidence,
        }


def noise_points(p1: float, p2: float, n1: int, n2: int) -> float:
    """1.96 standard errors of p1 - p2 for two proportions over n1 and n2 rows, in points (0..100)."""
    if n1 <= 0 or n2 <= 0:
        return math.inf
    return 196 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _noise_note(a: Row, b: Row, margin_points: float) -> str:
    """' (within sampling noise, +-x points)' when |margin| is under the noise of a's and b's exact match."""
    noise = noise_points(a["exact_match"], b["exact_match"], a["test_rows"], b["test_rows"])
    if abs(margin_points) < noise:
        return f" The margin ({margin_points:+.1f} points) is within sampling noise (+-{noise:.1f} points at 95%)."
    return f" Sampling noise: +-{noise:.1f} points at 95%."


def _em_ratio(a: Row, b: Row) -> float | None:
    return a["exact_match"] / b["exact_match"] if b["exact_match"] > 0 else None


def lora_close_to_full(rows: Mapping[str, Row]) -> Verdict:
    claim = "LoRA is within ~1-2% of full fine-tuning"
    lora, full = rows.get("lora"), rows.get("full")
    if lora is None or full is None:
        return Verdict("lora_close_to_full", claim, None, "needs the lora and full rows.")
    ratio = _em_ratio(lora, full)
    if ratio is None:
        return Verdict("lora_close_to_full", claim, None, "full fine-tuning scored 0% exact match: no ratio.")
    holds = ratio >= LORA_VS_FULL_RATIO
    margin = 100 * (lora["exact_match"] - LORA_VS_FULL_RATIO * full["exact_match"])
    return Verdict(
        "lora_close_to_full",
        claim,
        holds,
        f"LoRA {_pct(lora['exact_match'])} vs full {_pct(full['exact_match'])} exact match: {_pct(ratio)} of full "
        f"(needs >= {_pct(LORA_VS_FULL_RATIO)})." + _noise_note(lora, full, margin),
    )


def qlora_slightly_below_lora(rows: Mapping[str, Row]) -> Verdict:
    claim = "QLoRA is slightly below LoRA"
    qlora, lora = rows.get("qlora"), rows.get("lora")
    if qlora is None or lora is None:
        return Verdict("qlora_slightly_below_lora", claim, None, "needs the qlora and lora rows.")
    ratio = _em_ratio(qlora, lora)
    if ratio is None:
        return Verdict("qlora_slightly_below_lora", claim, None, "LoRA scored 0% exact match: no ratio.")
    holds = QLORA_VS_LORA_RATIO <= ratio <= 1.0
    where = "above" if ratio > 1 else ("far below" if ratio < QLORA_VS_LORA_RATIO else "at or slightly below")
    margin = 100 * (qlora["exact_match"] - lora["exact_match"])
    return Verdict(
        "qlora_slightly_below_lora",
        claim,
        holds,
        f"QLoRA {_pct(qlora['exact_match'])} vs LoRA {_pct(lora['exact_match'])}: {_pct(ratio)} of LoRA, {where} "
        f"(needs {_pct(QLORA_VS_LORA_RATIO)} to 100%)." + _noise_note(qlora, lora, margin),
    )


def lora_forgets_less(rows: Mapping[str, Row]) -> Verdict:
    claim = "LoRA forgets less than full fine-tuning"
    lora, full = rows.get("lora"), rows.get("full")
    if lora is None or full is None:
        return Verdict("lora_forgets_less", claim, None, "needs the lora and full rows.")
    holds = lora["forgetting"] < full["forgetting"]
    return Verdict(
        "lora_forgets_less",
        claim,
        holds,
        f"general-text loss rose by {lora['forgetting']:+.3f} with LoRA and {full['forgetting']:+.3f} with full "
        f"fine-tuning (at each one's best learning rate).",
    )


def prompt_tuning_weak(rows: Mapping[str, Row]) -> Verdict:
    claim = "prompt tuning is weak at small scale"
    prompt, full = rows.get("prompt"), rows.get("full")
    if prompt is None or full is None:
        return Verdict("prompt_tuning_weak", claim, None, "needs the prompt and full rows.")
    ratio = _em_ratio(prompt, full)
    if ratio is None:
        return Verdict("prompt_tuning_weak", claim, None, "full fine-tuning scored 0% exact match: no ratio.")
    return Verdict(
        "prompt_tuning_weak",
        claim,
        ratio < PROMPT_WEAK_RATIO,
        f"prompt tuning {_pct(prompt['exact_match'])} vs full {_pct(full['exact_match'])}: {_pct(ratio)} of full "
        f"(weak means < {_pct(PROMPT_WEAK_RATIO)}).",
    )


def _speed_words(slowdown: float) -> str:
    """+0.327 -> "32.7% slower", -0.036 -> "3.6% faster"."""
    return f"{100 * abs(slowdown):.1f}% {'slower' if slowdown > 0 else 'faster'}"


def _slowdown(row: Row, variant: str) -> tuple[float, float] | None:
    """(slowdown, timing noise) of one inference variant against the base, both fractions; None if unmeasured."""
    overhead = (row.get("inference") or {}).get(variant)
    if overhead is None:
        return None
    return overhead["slowdown"], overhead["noise"]


def adapters_add_latency(rows: Mapping[str, Row]) -> Verdict:
    claim = "adapter layers add inference latency"
    adapter = rows.get("adapter")
    measured = None if adapter is None else _slowdown(adapter, "unmerged")
    if measured is None:
        return Verdict("adapters_add_latency", claim, None, "needs the adapter row's inference timing.")
    slowdown, noise = measured
    threshold = max(LATENCY_THRESHOLD, noise)
    return Verdict(
        "adapters_add_latency",
        claim,
        slowdown > threshold,
        f"generation with bottleneck adapters is {_speed_words(slowdown)} than the base model (counts above "
        f"{100 * threshold:.1f}%: max of {100 * LATENCY_THRESHOLD:.0f}% and the timing noise).",
    )


def merged_lora_adds_none(rows: Mapping[str, Row]) -> Verdict:
    claim = "merged LoRA adds no inference latency"
    lora = rows.get("lora")
    merged = None if lora is None else _slowdown(lora, "merged")
    unmerged = None if lora is None else _slowdown(lora, "unmerged")
    if merged is None:
        return Verdict("merged_lora_adds_none", claim, None, "needs the lora row's merged inference timing.")
    slowdown, noise = merged
    threshold = max(LATENCY_THRESHOLD, noise)
    also = f"; unmerged: {_speed_words(unmerged[0])}" if unmerged is not None else ""
    return Verdict(
        "merged_lora_adds_none",
        claim,
        slowdown <= threshold,
        f"merged LoRA generates {_speed_words(slowdown)} than the base model{also} (none means at most "
        f"{100 * threshold:.1f}%: max of {100 * LATENCY_THRESHOLD:.0f}% and the timing noise).",
    )


CLAIMS: tuple[Callable[[Mapping[str, Row]], Verdict], ...] = (
    lora_close_to_full,
    qlora_slightly_below_lora,
    lora_forgets_less,
    prompt_tuning_weak,
    adapters_add_latency,
    merged_lora_adds_none,
)


def judge_claims(rows: Mapping[str, Row]) -> list[Verdict]:
    """Every claim in CLAIMS, judged on `rows` (row name -> measured row)."""
    return [claim(rows) for claim in CLAIMS]
