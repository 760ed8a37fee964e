"""The engine on its own thread, and asyncio queues that carry each request's outputs back to the event loop.

The HTTP handlers never run model code: they put a request in (a lock and a list append) and await its queue;
the engine thread steps whenever there is work and hands each RequestOutput to the loop with
call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback

from nibblora.serve.engine import Engine
from nibblora.serve.sampling import SamplingParams
from nibblora.serve.sequence import RequestOutput

log = logging.getLogger("nibblora.serve")


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queue allows (the server answers 429)."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 256) -> None:
        self.engine, self.max_queue = engine, max_queue
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nibblora-engine", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.wakeup.set()
        self._thread.join(timeout=10)
        self.engine.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None, request_id: str
    ) -> asyncio.Queue:
        """Queue a request (from the event loop); its outputs arrive on the returned queue.
        Raises QueueFullError, UnknownAdapterError or InputError before anything is queued."""
        if self.engine.num_waiting >= self.max_queue:
            with self.engine.metrics.lock:
                self.engine.metrics.requests_rejected += 1
            raise QueueFullError(f"the server has {self.max_queue} requests waiting already; retry later")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(prompt_ids, params, adapter, request_id)
        except BaseException:
            with self._lock:
                self._queues.pop(request_id, None)
            raise
        return queue

    def abort(self, request_id: str) -> None:
        """Cancel (client gone): the engine frees its blocks and slot on its next step."""
        with self._lock:
            known = self._queues.pop(request_id, None) is not None
        if known:
            self.engine.abort(request_id)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            target = self._queues.get(out.request_id)
            if target is not None and out.finished:
                del self._queues[out.request_id]
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, out)

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if not engine.has_work():
                engine.wakeup.wait(0.1)
                engine.wakeup.clear()
                continue
            try:
                outputs = engine.step()
            except Exception:  # noqa: BLE001 -- a bug in a step must not hang every client: log it, fail them
                message = traceback.format_exc()
                log.error("engine step failed:\n%s", message)
                self._fail_all(message.strip().splitlines()[-1])
                continue
            for out in outputs:
                self._deliver(out)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._queues)
        for request_id in ids:
            self.engine.abort(request_id)
            self._deliver(RequestOutput(request_id, [], "", True, "error", 0, 0, error=message))
