"""The OpenAI-compatible HTTP API over an AsyncEngine (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming with server-sent events), GET /v1/models,
POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, GET /health, GET /metrics (Prometheus text).
Errors use OpenAI's error object: 400 naming the field for bad input, 401 without the API key, 404 for an
unknown model/adapter, 429 when the queue is full. Tokenizing, chat rendering and adapter reading run in worker
threads; the model runs on the engine's thread; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from nibblora.errors import AdapterError, InputError
from nibblora.serve.async_engine import AsyncEngine, QueueFullError
from nibblora.serve.engine import UnknownAdapterError
from nibblora.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    error_body,
    new_id,
    now,
    usage,
)
from nibblora.serve.sampling import SamplingParams
from nibblora.serve.sequence import RequestOutput
from nibblora.serve.text import TextCodec

_FIELD_PREFIX = re.compile(r"^(\w+): ")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _input_error(err: InputError) -> APIError:
    """400 for bad input; the message starts with the field it is about ("prompt: ...")."""
    message = str(err)
    match = _FIELD_PREFIX.match(message)
    param = (
        match.group(1)
        if match
        and match.group(1) in ("prompt", "messages", "max_tokens", "stop", "temperature", "top_p", "top_k", "logprobs")
        else None
    )
    return APIError(400, message, param=param)


def create_app(
    async_engine: AsyncEngine,
    codec: TextCodec | None,
    *,
    model_name: str,
    model_root: str = "",
    api_key: str | None = None,
) -> FastAPI:
    engine = async_engine.engine

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if not async_engine.alive:
            async_engine.start()
        yield
        async_engine.stop()

    app = FastAPI(title="nibblora.serve", lifespan=lifespan)
    created = now()

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if (
            api_key
            and request.url.path.startswith("/v1")
            and request.headers.get("authorization", "") != f"Bearer {api_key}"
        ):
            return JSONResponse(
                error_body(
                    "invalid or missing API key: send 'Authorization: Bearer <key>'", "authentication_error", code=401
                ),
                status_code=401,
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"malformed JSON in the request body: {first.get('msg')}", None
        else:
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(message, param=param, code=400), status_code=400)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.status), status_code=exc.status)

    # ---- info -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not async_engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.render_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        data = [
            {
                "id": model_name,
                "object": "model",
                "created": created,
                "owned_by": "nibblora",
                "root": model_root,
                "parent": None,
            }
        ]
        for name in engine.store.names():
            ref = engine.store.lookup(name)
            if ref is not None:
                data.append(
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "nibblora",
                        "root": str(ref.path),
                        "parent": model_name,
                    }
                )
        return {"object": "list", "data": data}

    # ---- adapters ---------------------------------------------------------------------------------------
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest):
        if body.lora_name == model_name:
            raise APIError(
                400, f"lora_name: {body.lora_name!r} is the base model's name; pick another", param="lora_name"
            )
        try:  # reading and validating the folder is disk + CPU work: off the event loop
            await asyncio.to_thread(engine.add_adapter, body.lora_name, body.lora_path)
        except AdapterError as err:
            raise APIError(400, str(err), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        try:
            engine.remove_adapter(body.lora_name)
        except UnknownAdapterError as err:
            raise APIError(404, str(err), "NotFoundError", "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # ---- generation -------------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != model_name and engine.store.lookup(name) is None:
            raise APIError(
                404,
                f"The model `{name}` does not exist; GET /v1/models lists the base model and every loaded adapter",
                "NotFoundError",
                "model",
            )

    def sampling_params(req, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        room = engine.max_model_len - prompt_len
        if room <= 0:
            raise APIError(
                400,
                f"prompt: {prompt_len} tokens fill the model's context of {engine.max_model_len} "
                "tokens and leave no room to generate; shorten it",
                param=req_field(req),
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                max_tokens=min(max_tokens or room, room),
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=max(req.top_k, 0),
                seed=req.seed,
                stop=stops,
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
            )
        except InputError as err:
            raise _input_error(err) from None

    def req_field(req) -> str:
        return "messages" if isinstance(req, ChatCompletionRequest) else "prompt"

    async def submit(prompt_ids: list[int], params: SamplingParams, model: str, request_id: str) -> asyncio.Queue:
        try:
            return async_engine.submit(prompt_ids, params, None if model == model_name else model, request_id)
        except UnknownAdapterError as err:
            raise APIError(404, str(err), "NotFoundError", "model") from None
        except QueueFullError as err:
            raise APIError(429, str(err), "rate_limit_error") from None
        except InputError as err:
            raise _input_error(err) from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(
                    400,
                    "prompt: a list of several prompts is not supported; send one request per prompt",
                    param="prompt",
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            if codec is None:
                raise APIError(400, "prompt: this server has no tokenizer; send token ids", param="prompt")
            prompt_ids = await asyncio.to_thread(codec.encode, prompt, True)
        else:
            prompt_ids = list(prompt)
        params = sampling_params(req, len(prompt_ids), req.max_tokens, req.logprobs)
        request_id = new_id("cmpl")
        queue = await submit(prompt_ids, params, req.model, request_id)
        formatter = _CompletionFormat(request_id, req.model, codec, len(prompt_ids))
        return await respond(request, queue, request_id, formatter, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if codec is None:
            raise APIError(400, "messages: this server has no tokenizer to render chats with", param="messages")
        messages = [_message_dict(m) for m in req.messages]
        try:
            prompt_ids = await asyncio.to_thread(codec.encode_chat, messages, req.add_generation_prompt)
        except InputError as err:
            raise _input_error(err) from None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, len(prompt_ids), req.max_completion_tokens or req.max_tokens, logprobs)
        request_id = new_id("chatcmpl")
        queue = await submit(prompt_ids, params, req.model, request_id)
        formatter = _ChatFormat(request_id, req.model, codec, len(prompt_ids))
        return await respond(request, queue, request_id, formatter, req)

    async def respond(request: Request, queue: asyncio.Queue, request_id: str, formatter, req):
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream(queue, request_id, formatter, include_usage), media_type="text/event-stream"
            )
        outputs: list[RequestOutput] = []
        try:
            while True:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        async_engine.abort(request_id)
                        return PlainTextResponse("", status_code=499)
                    continue
                outputs.append(out)
                if out.finished:
                    break
        except asyncio.CancelledError:
            async_engine.abort(request_id)
            raise
        if outputs[-1].error:
            raise APIError(500, outputs[-1].error, "internal_error")
        return formatter.full(outputs)

    async def stream(queue: asyncio.Queue, request_id: str, formatter, include_usage: bool) -> AsyncIterator[str]:
        finished = False
        try:
            for chunk in formatter.opening():
                yield _sse(chunk)
            completion_tokens = 0
            while True:
                out: RequestOutput = await queue.get()
                completion_tokens = out.completion_tokens
                if out.error:
                    finished = True
                    yield _sse(error_body(out.error, "internal_error", code=500))
                    break
                if out.new_text or out.finished or out.logprobs:
                    yield _sse(formatter.chunk(out))
                if out.finished:
                    finished = True
                    break
            if include_usage:
                yield _sse(formatter.usage_chunk(completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server is stopping): free its blocks now
                async_engine.abort(request_id)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _message_dict(message) -> dict:
    data = message.model_dump(exclude_none=True)
    content = data.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        data["content"] = "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return data


class _CompletionFormat:
    """Responses of /v1/completions (object "text_completion")."""

    def __init__(self, request_id: str, model: str, codec: TextCodec | None, prompt_tokens: int) -> None:
        self.id, self.model, self.codec, self.prompt_tokens = request_id, model, codec, prompt_tokens
        self.created = now()
        self.offset = 0

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def _logprobs(self, outputs: list[RequestOutput]) -> dict | None:
        tokens = [t for out in outputs for t in out.logprobs]
        if not tokens:
            return None
        text = [self.codec.token_text(t.token_id) if self.codec else str(t.token_id) for t in tokens]
        offsets = []
        for s in text:
            offsets.append(self.offset)
            self.offset += len(s)
        return {
            "tokens": text,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [
                {(self.codec.token_text(i) if self.codec else str(i)): lp for i, lp in (t.top_logprobs or [])}
                for t in tokens
            ],
            "text_offset": offsets,
        }

    def opening(self) -> list[dict]:
        return []

    def chunk(self, out: RequestOutput) -> dict:
        choice = {
            "index": 0,
            "text": out.new_text,
            "logprobs": self._logprobs([out]),
            "finish_reason": out.finish_reason if out.finished else None,
        }
        return {**self._head(), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict:
        return {**self._head(), "choices": [], "usage": usage(self.prompt_tokens, completion_tokens)}

    def full(self, outputs: list[RequestOutput]) -> dict:
        last = outputs[-1]
        choice = {
            "index": 0,
            "text": "".join(o.new_text for o in outputs),
            "logprobs": self._logprobs(outputs),
            "finish_reason": last.finish_reason,
        }
        return {**self._head(), "choices": [choice], "usage": usage(self.prompt_tokens, last.completion_tokens)}


class _ChatFormat(_CompletionFormat):
    """Responses of /v1/chat/completions (objects "chat.completion" and "chat.completion.chunk")."""

    def _head(self, chunk: bool = False) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": self.created,
            "model": self.model,
        }

    def _logprobs(self, outputs: list[RequestOutput]) -> dict | None:
        tokens = [t for out in outputs for t in out.logprobs]
        if not tokens:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.codec.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in (t.top_logprobs or [])]}
                for t in tokens
            ]
        }

    def opening(self) -> list[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [{**self._head(True), "choices": [choice]}]

    def chunk(self, out: RequestOutput) -> dict:
        delta = {"content": out.new_text} if out.new_text else {}
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": self._logprobs([out]),
            "finish_reason": out.finish_reason if out.finished else None,
        }
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(self.prompt_tokens, completion_tokens)}

    def full(self, outputs: list[RequestOutput]) -> dict:
        last = outputs[-1]
        message = {"role": "assistant", "content": "".join(o.new_text for o in outputs)}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(outputs),
            "finish_reason": last.finish_reason,
        }
        return {**self._head(), "choices": [choice], "usage": usage(self.prompt_tokens, last.completion_tokens)}
