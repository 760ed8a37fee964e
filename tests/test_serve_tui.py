"""The dashboard's view of servers: registry files and /metrics, read back into one line per server."""

from __future__ import annotations

import json
import os

from nibblora.serve.metrics import EngineMetrics, histogram_quantile, parse_prometheus
from nibblora.serve.registry import ServerRegistration, read_registrations
from nibblora.tui.servers import ServerIndex, servers_text


def _page(tokens: int) -> str:
    metrics = EngineMetrics()
    metrics.generation_tokens = tokens
    for latency in (0.2, 0.3, 0.4, 3.0):
        metrics.finished("stop", 5, 0.1, latency, 4)
    gauges = {
        "nibblora_requests_running": 2,
        "nibblora_requests_waiting": 1,
        "nibblora_adapters_known": 7,
        "nibblora_adapters_device": 3,
    }
    return metrics.render(gauges, {})


def test_histogram_quantile_interpolates_within_the_bucket():
    samples = parse_prometheus(_page(0))
    assert samples['nibblora_request_latency_seconds_bucket{le="0.25"}'] == 1
    assert samples['nibblora_request_latency_seconds_bucket{le="+Inf"}'] == 4
    p50 = histogram_quantile(samples, "nibblora_request_latency_seconds", 0.5)
    assert 0.25 < p50 <= 0.5
    assert histogram_quantile(samples, "nibblora_request_latency_seconds", 0.99) > 2.5
    assert histogram_quantile(samples, "nibblora_time_to_first_token_seconds", 0.5) <= 0.1


def test_registry_and_rates(tmp_path):
    reg = ServerRegistration.create(tmp_path, "0.0.0.0", 8123, "tiny", "/models/tiny")
    [record] = read_registrations(tmp_path)
    assert record["url"] == "http://127.0.0.1:8123" and record["pid"] == os.getpid()
    stale = tmp_path / "servers" / "dead_1.json"
    stale.write_text(json.dumps({"url": "http://x:1", "pid": 2**22 + 12345, "model": "m"}))
    assert len(read_registrations(tmp_path)) == 1
    pages = iter([_page(100), _page(400)])
    times = iter([10.0, 12.0])
    fetched = []

    def fetch(url):
        fetched.append(url)
        if url == "http://down:1":
            raise OSError("connection refused")
        return next(pages)

    index = ServerIndex(str(tmp_path), ["http://down:1"], fetch=fetch, clock=lambda: next(times))
    first, down = index.poll()
    assert first.reachable and first.model == "tiny" and first.tokens_per_s is None
    assert (first.running, first.waiting, first.adapters_known, first.adapters_on_device) == (2, 1, 7, 3)
    assert not down.reachable and "refused" in down.summary()
    second, _ = index.poll()
    assert second.tokens_per_s == 150.0
    assert "150.0 tok/s" in second.summary() and "3 on device / 7 loaded" in second.summary()
    assert servers_text([second]) == second.summary() and "no inference servers" in servers_text([])
    reg.remove()
    assert read_registrations(tmp_path) == []


def test_once_lists_given_and_registered_servers_and_says_when_one_is_down(tmp_path, capsys):
    from nibblora.tui import cli

    ServerRegistration.create(tmp_path, "127.0.0.1", 9, "tiny", "/models/tiny")  # pid alive: this process
    assert cli.main(["--once", str(tmp_path), "--server", "http://127.0.0.1:9"]) == 0
    out = capsys.readouterr().out
    servers = out.split("\nservers:\n", 1)[1].strip().splitlines()
    assert len(servers) == 1 and "http://127.0.0.1:9" in servers[0]  # registered and given: shown once
    assert "unreachable" in servers[0] or "refused" in servers[0]


def test_once_without_servers_prints_no_server_section(tmp_path, capsys):
    from nibblora.tui import cli

    assert cli.main(["--once", str(tmp_path)]) == 0
    assert "servers:" not in capsys.readouterr().out


def test_dashboard_shows_the_server_panel_only_when_there_are_servers(tmp_path):
    from helpers_tui import drive, monitor
    from textual.widgets import Static

    from nibblora.tui.app import QloraTUI

    app = QloraTUI(tmp_path, hardware=monitor())
    app.servers = ServerIndex(str(tmp_path), fetch=lambda url: _page(10))

    async def no_servers(pilot):
        return pilot.app.screen.query_one("#servers", Static).has_class("hidden")

    assert drive(app, no_servers)

    app = QloraTUI(tmp_path, hardware=monitor())
    app.servers = ServerIndex(str(tmp_path), ["http://gpu-box:8000"], fetch=lambda url: _page(10))

    async def one_server(pilot):
        panel = pilot.app.screen.query_one("#servers", Static)
        return panel.has_class("hidden"), str(panel.render())

    hidden, text = drive(app, one_server)
    assert not hidden and "http://gpu-box:8000" in text and "3 on device / 7 loaded" in text
