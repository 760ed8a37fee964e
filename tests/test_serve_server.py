"""The real server in a subprocess, spoken to with the official openai client and with raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_serve import module_shapes, reference_model, save_served_model, write_adapter

httpx = pytest.importorskip("httpx")  # the [test] extra installs both; a bare GPU box may lack them
openai = pytest.importorskip("openai")

API_KEY = "test-key"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base, model_dir = save_served_model(root / "tiny-llama")
    shapes = module_shapes(base)
    adapters = {
        "alpha": write_adapter(root / "alpha", shapes, 8, ["q_proj", "v_proj", "down_proj"], seed=1, alpha=16),
        "beta": write_adapter(
            root / "beta", shapes, 32, ["o_proj", "gate_proj", "up_proj"], seed=2, alpha=8, rslora=True
        ),
    }
    extra = write_adapter(root / "gamma", shapes, 4, ["k_proj"], seed=3)
    dora = write_adapter(root / "dora", shapes, 4, ["q_proj"], seed=4, extra_config={"use_dora": True})
    runs = root / "runs"
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'python'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "nibblora.serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--adapter",
        f"alpha={adapters['alpha']}",
        "--adapter",
        f"beta={adapters['beta']}",
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "4",
        "--max-num-seqs",
        "4",
        "--max-queue",
        "3",
        "--runs-dir",
        str(runs),
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115 -- the server writes to it until the fixture ends
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + (root / "server.log").read_text())
        time.sleep(0.2)
    info = dict(
        url=url,
        base=base,
        model_dir=model_dir,
        adapters=adapters,
        gamma=extra,
        dora=dora,
        runs=runs,
        name=model_dir.name,
    )
    yield info
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _headers() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def _reference_text(server, adapter: str | None, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    from tokenizers import Tokenizer

    model = reference_model(server["base"], None if adapter is None else server["adapters"][adapter])
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, eos_token_id=[])[0, len(prompt_ids) :]
    tok = Tokenizer.from_file(str(server["model_dir"] / "tokenizer.json"))
    return out.tolist(), tok.decode(out.tolist(), skip_special_tokens=True)


def test_models_lists_base_and_adapters_and_registry(server):
    ids = [m.id for m in _client(server).models.list().data]
    assert ids[0] == server["name"]
    assert set(ids[1:]) == {"alpha", "beta"}
    [record] = [json.loads(p.read_text()) for p in (server["runs"] / "servers").glob("*.json")]
    assert record["url"] == server["url"]


@pytest.mark.parametrize("adapter", [None, "alpha", "beta"])
def test_completion_equals_adapter_alone(server, adapter):
    prompt = [5, 17, 300, 42, 99, 7]
    model = adapter or server["name"]
    res = _client(server).completions.create(
        model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    _, want_text = _reference_text(server, adapter, prompt, 6)
    assert res.choices[0].text == want_text
    assert res.choices[0].finish_reason == "length"
    assert res.usage.prompt_tokens == len(prompt) and res.usage.completion_tokens == 6


def test_streaming_completion_matches_non_streaming(server):
    client = _client(server)
    kwargs = dict(
        model="beta", prompt="Hello! How can I help", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_completion_streaming_and_not(server):
    client = _client(server)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    full = client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == len(full.choices[0].logprobs.content)
    assert all(len(t.top_logprobs) == 2 for t in full.choices[0].logprobs.content)
    stream = client.chat.completions.create(model="alpha", messages=messages, max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_concurrent_requests_to_different_adapters(server):
    client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)
    prompts = {("alpha", 0): [3, 4, 5], ("beta", 1): [9, 8, 7, 6], (server["name"], 2): [11, 12]}

    async def one(model, prompt):
        res = await client.completions.create(
            model=model, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        return res.choices[0].text

    async def run_all():
        return await asyncio.gather(*(one(m, p) for (m, _), p in prompts.items()))

    texts = asyncio.run(run_all())
    for ((model, _), prompt), text in zip(prompts.items(), texts, strict=True):
        adapter = None if model == server["name"] else model
        assert text == _reference_text(server, adapter, prompt, 5)[1]


def test_seeded_sampling_is_reproducible(server):
    client = _client(server)
    kwargs = dict(
        model="alpha",
        prompt=[1, 2, 3],
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
        seed=123,
        extra_body={"top_k": 50, "ignore_eos": True},
    )
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def _post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        server["url"] + path,
        content=content,
        headers={**_headers(), "Content-Type": "application/json"},
        timeout=30,
        **kw,
    )


def test_errors_name_the_field(server):
    r = _post(server, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "nope" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", "{not json")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = _post(server, "/v1/completions", {"model": "alpha", "prompt": "hi", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = _post(server, "/v1/chat/completions", {"model": "alpha", "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(server, "/v1/completions", {"model": "alpha", "prompt": [1] * 4200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "alpha", "prompt": "hi"})
    assert r.status_code == 401
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_load_use_replace_unload_adapter(server):
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(server["runs"] / "missing")})
    assert r.status_code == 400 and "missing" in r.json()["error"]["message"]
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "dora", "lora_path": str(server["dora"])})
    assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"]
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(server["gamma"])})
    assert r.status_code == 200, r.text
    res = _client(server).completions.create(model="gamma", prompt=[4, 5, 6], max_tokens=3, temperature=0)
    assert res.usage.completion_tokens >= 1
    # replacing: gamma now serves alpha's weights
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(server["adapters"]["alpha"])})
    assert r.status_code == 200
    kwargs = dict(prompt=[4, 5, 6], max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert (
        _client(server).completions.create(model="gamma", **kwargs).choices[0].text
        == _client(server).completions.create(model="alpha", **kwargs).choices[0].text
    )
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
    r = _post(server, "/v1/completions", {"model": "gamma", "prompt": "hi"})
    assert r.status_code == 404
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 404


def _wait_idle(server) -> str:
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(server["url"] + "/metrics").text
        if (
            _metric(text, "nibblora_requests_running") == 0
            and _metric(text, "nibblora_requests_waiting") == 0
            and _metric(text, "nibblora_kv_blocks_free") == _metric(text, "nibblora_kv_blocks_total")
        ):
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.1)


def test_disconnect_frees_blocks_and_overload_answers_429(server):
    async def scenario():
        body = {
            "model": "alpha",
            "prompt": [1, 2, 3],
            "max_tokens": 4000,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        async with httpx.AsyncClient(base_url=server["url"], headers=_headers(), timeout=30) as client:
            streams, lines = [], []
            # 4 running (--max-num-seqs 4) + 3 waiting (--max-queue 3): the next one is refused.
            for _ in range(4):
                cm = client.stream("POST", "/v1/completions", json=body)
                response = await cm.__aenter__()
                streams.append(cm)
                assert response.status_code == 200
                # keep the line iterator: a dropped one closes the response, which is a disconnect
                lines.append(response.aiter_lines())
                first = await lines[-1].__anext__()  # running now, not waiting
                assert first.startswith("data: ")

            async def wait_in_queue():
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        pass

            waiting = [asyncio.create_task(wait_in_queue()) for _ in range(3)]
            for _ in range(200):
                metrics = (await client.get("/metrics")).text
                if _metric(metrics, "nibblora_requests_waiting") == 3:
                    break
                await asyncio.sleep(0.05)
            assert _metric(metrics, "nibblora_requests_running") == 4, metrics
            refused = await client.post("/v1/completions", json={**body, "stream": False})
            # hang up on all of them mid-generation (or while still queued)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            for cm in streams:
                await cm.__aexit__(None, None, None)
            return refused

    refused = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    text = _wait_idle(server)
    assert _metric(text, "nibblora_requests_rejected_total") >= 1
    assert 'nibblora_requests_total{finish_reason="abort"}' in text
    # still serving
    assert _client(server).completions.create(model="alpha", prompt=[1], max_tokens=2).usage.completion_tokens >= 1


def test_metrics_is_prometheus_text(server):
    text = httpx.get(server["url"] + "/metrics").text
    for name in (
        "nibblora_prompt_tokens_total",
        "nibblora_generation_tokens_total",
        "nibblora_adapters_device",
        "nibblora_adapter_device_hits_total",
        "nibblora_time_to_first_token_seconds_count",
        "nibblora_time_per_output_token_seconds_count",
        "nibblora_batch_sequences_count",
    ):
        assert _metric(text, name) >= 0
    assert "# TYPE nibblora_time_to_first_token_seconds histogram" in text
    assert _metric(text, "nibblora_generation_tokens_total") > 0
