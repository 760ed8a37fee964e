"""Running nibblora.serve servers for the dashboard: found through `<runs dir>/servers/*.json` (written by each
server) or given as URLs, and read through their GET /metrics.

    index = ServerIndex("runs", urls=["http://gpu-box:8000"])
    for server in index.poll():          # ServerStatus each; call from a worker thread (it does HTTP)
        print(server.summary())

tokens/s is the generated-token counter's rate between two polls; p50/p99 come from the request-latency
histogram (Prometheus' histogram_quantile, linear within a bucket).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from nibblora.serve.metrics import histogram_quantile, parse_prometheus
from nibblora.serve.registry import read_registrations


@dataclass
class ServerStatus:
    url: str
    model: str = ""
    reachable: bool = False
    error: str = ""
    adapters_known: int | None = None
    adapters_on_device: int | None = None
    running: int | None = None
    waiting: int | None = None
    tokens_per_s: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    device_memory_bytes: int | None = None

    def summary(self) -> str:
        """One line for the dashboard."""
        if not self.reachable:
            return f"{self.url} {self.model}: unreachable ({self.error})"

        def num(v, fmt="{:.0f}"):
            return "n/a" if v is None else fmt.format(v)

        mem = "n/a" if self.device_memory_bytes is None else f"{self.device_memory_bytes / 2**30:.1f} GiB"
        return (
            f"{self.url} {self.model}: adapters {num(self.adapters_on_device)} on device / "
            f"{num(self.adapters_known)} loaded, requests {num(self.running)} running {num(self.waiting)} "
            f"waiting, {num(self.tokens_per_s, '{:.1f}')} tok/s, latency p50 {num(self.latency_p50_s, '{:.2f}')}s "
            f"p99 {num(self.latency_p99_s, '{:.2f}')}s, device memory {mem}"
        )


def fetch_metrics(url: str, timeout: float = 1.0) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as response:
        return response.read().decode("utf-8", errors="replace")


class ServerIndex:
    """Servers registered under `runs_dir` plus `urls`; poll() reads each one's /metrics."""

    def __init__(
        self,
        runs_dir: str | None = None,
        urls: list[str] | None = None,
        fetch: Callable[[str], str] = fetch_metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runs_dir, self.urls = runs_dir, list(urls or [])
        self._fetch, self._clock = fetch, clock
        self._last_tokens: dict[str, tuple[float, float]] = {}

    def targets(self) -> list[tuple[str, str]]:
        """(url, model name) of every server to show, registry first, duplicates dropped."""
        seen, out = set(), []
        records = read_registrations(self.runs_dir) if self.runs_dir else []
        for url, model in [(r["url"], str(r.get("model", ""))) for r in records] + [(u, "") for u in self.urls]:
            if url not in seen:
                seen.add(url)
                out.append((url, model))
        return out

    def poll(self) -> list[ServerStatus]:
        return [self.read(url, model) for url, model in self.targets()]

    def read(self, url: str, model: str = "") -> ServerStatus:
        status = ServerStatus(url, model)
        try:
            text = self._fetch(url)
        except (urllib.error.URLError, OSError, ValueError) as err:
            status.error = str(getattr(err, "reason", err))
            return status
        samples = parse_prometheus(text)
        status.reachable = True

        def value(name):
            v = samples.get(name)
            return None if v is None else int(v)

        status.adapters_known = value("nibblora_adapters_known")
        status.adapters_on_device = value("nibblora_adapters_device")
        status.running = value("nibblora_requests_running")
        status.waiting = value("nibblora_requests_waiting")
        status.device_memory_bytes = value("nibblora_device_memory_bytes")
        status.latency_p50_s = histogram_quantile(samples, "nibblora_request_latency_seconds", 0.5)
        status.latency_p99_s = histogram_quantile(samples, "nibblora_request_latency_seconds", 0.99)
        tokens = samples.get("nibblora_generation_tokens_total")
        if tokens is not None:
            now = self._clock()
            previous = self._last_tokens.get(url)
            if previous is not None and now > previous[0] and tokens >= previous[1]:
                status.tokens_per_s = (tokens - previous[1]) / (now - previous[0])
            self._last_tokens[url] = (now, tokens)
        return status


def servers_text(statuses: list[ServerStatus]) -> str:
    """The dashboard's server panel (and `qlora-tui --once`): one line per server, or a hint when there is none."""
    if not statuses:
        return (
            "no inference servers: start one with `python -m nibblora.serve --runs-dir RUNS_DIR ...` "
            "or pass --server URL"
        )
    return "\n".join(status.summary() for status in statuses)
