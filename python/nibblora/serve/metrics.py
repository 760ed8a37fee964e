"""Counters and histograms of the engine, written in Prometheus' text exposition format for GET /metrics.

Names are flat and stable (prefix `nibblora_`); the dashboard (nibblora.tui.servers) reads them back.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: each bucket counts observations <= its bound)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += c
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class EngineMetrics:
    """Everything /metrics reports. The engine thread writes, the server thread renders, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests_finished: dict[str, int] = {}
        self.requests_rejected = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.preemptions = 0
        self.batch_tokens = Histogram(BATCH_BUCKETS)
        self.batch_seqs = Histogram(BATCH_BUCKETS)
        self.time_to_first_token = Histogram(LATENCY_BUCKETS)
        self.time_per_output_token = Histogram(LATENCY_BUCKETS)
        self.request_latency = Histogram(LATENCY_BUCKETS)

    def finished(
        self, reason: str, prompt_tokens: int, ttft: float | None, latency: float, completion_tokens: int
    ) -> None:
        with self.lock:
            self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1
            if ttft is not None:
                self.time_to_first_token.observe(ttft)
            self.request_latency.observe(latency)
            if ttft is not None and completion_tokens > 1:
                self.time_per_output_token.observe((latency - ttft) / (completion_tokens - 1))

    def render(self, gauges: dict[str, float], extra_counters: dict[str, float]) -> str:
        """The Prometheus text page: HELP/TYPE lines, counters, gauges (given by the caller), histograms."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        with self.lock:
            finished = [
                f'nibblora_requests_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.requests_finished.items())
            ]
            metric(
                "nibblora_requests_total",
                "counter",
                "Requests finished, by finish reason.",
                finished or ['nibblora_requests_total{finish_reason="stop"} 0'],
            )
            metric(
                "nibblora_requests_rejected_total",
                "counter",
                "Requests refused with 429 (queue full).",
                [f"nibblora_requests_rejected_total {self.requests_rejected}"],
            )
            metric(
                "nibblora_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                [f"nibblora_prompt_tokens_total {self.prompt_tokens}"],
            )
            metric(
                "nibblora_generation_tokens_total",
                "counter",
                "Tokens generated.",
                [f"nibblora_generation_tokens_total {self.generation_tokens}"],
            )
            metric(
                "nibblora_engine_steps_total",
                "counter",
                "Engine steps run.",
                [f"nibblora_engine_steps_total {self.steps}"],
            )
            metric(
                "nibblora_preemptions_total",
                "counter",
                "Sequences preempted for KV blocks.",
                [f"nibblora_preemptions_total {self.preemptions}"],
            )
            for name, value in sorted(extra_counters.items()):
                metric(name, "counter", name.removeprefix("nibblora_").replace("_", " ") + ".", [f"{name} {value:g}"])
            for name, value in sorted(gauges.items()):
                metric(name, "gauge", name.removeprefix("nibblora_").replace("_", " ") + ".", [f"{name} {value:g}"])
            for name, hist, help_text in (
                ("nibblora_batch_tokens", self.batch_tokens, "Tokens per engine step."),
                ("nibblora_batch_sequences", self.batch_seqs, "Sequences per engine step."),
                ("nibblora_time_to_first_token_seconds", self.time_to_first_token, "Arrival to first token."),
                (
                    "nibblora_time_per_output_token_seconds",
                    self.time_per_output_token,
                    "Mean time between output tokens, per request.",
                ),
                ("nibblora_request_latency_seconds", self.request_latency, "Arrival to last token."),
            ):
                metric(name, "histogram", help_text, hist.lines(name))
        return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """Flat {sample name with labels: value} of a Prometheus text page (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def histogram_quantile(
    samples: dict[str, float], name: str, q: float, label_filter: Callable[[str], bool] = lambda _: True
) -> float | None:
    """Prometheus' histogram_quantile over `name`_bucket samples: linear within the bucket; None if empty."""
    buckets = []
    for key, value in samples.items():
        if key.startswith(f"{name}_bucket{{") and label_filter(key):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 1.0)
        prev_bound, prev_count = bound, count
    return prev_bound
