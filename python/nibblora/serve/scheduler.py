"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running sequences (`max_num_seqs`):
1. Running sequences go first, oldest first: a decoding sequence needs one token, a sequence in the middle of a
   chunked prefill gets what the budget leaves. So a long prompt arriving never stalls the decodes already
   running; it is prefilled in chunks from the budget the decodes leave over.
2. Then waiting requests are admitted round-robin over adapters (one request per adapter per round, FIFO within
   an adapter), so a hot adapter with a thousand queued requests cannot starve a cold one. A request is admitted
   only when its adapter is in host memory (reads run in the background), a device slot can hold it, and the KV
   cache has blocks for its first chunk.
3. When a running sequence needs a block and none is free, the youngest running sequence not yet scheduled this
   step is preempted: its blocks are freed and it is re-queued at the front, to be recomputed later (prompt plus
   the tokens it already produced), as vLLM does.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from nibblora.serve.adapter_store import AdapterStore
from nibblora.serve.kv_cache import BlockAllocator
from nibblora.serve.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024


@dataclass
class ScheduledStep:
    """The step's work: (sequence, tokens to compute) pairs, and sequences that failed while being admitted."""

    work: list[tuple[Sequence, int]]
    failed: list[tuple[Sequence, str]]
    preempted: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, store: AdapterStore) -> None:
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({config.max_num_seqs}) so every running sequence can decode each step"
            )
        self.config, self.allocator, self.store = config, allocator, store
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # adapter key -> FIFO; order = turn
        self.running: list[Sequence] = []  # in admission order
        # Keep a few blocks free when admitting, so decodes of running sequences rarely need preemption.
        self.watermark = max(1, allocator.num_blocks // 100)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def add(self, seq: Sequence, front: bool = False) -> None:
        queue = self.waiting.setdefault(seq.adapter_key, deque())
        if front:
            queue.appendleft(seq)
        else:
            queue.append(seq)
        seq.status = Status.WAITING

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out wherever it is, freeing its blocks and slot. None if it is not here."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq)
                return seq
        for key, queue in self.waiting.items():
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    if not queue:
                        del self.waiting[key]
                    seq.status = Status.FINISHED
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """A running sequence is done: give back its KV blocks and adapter slot."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        if seq.slot is not None:
            self.store.release_slot(seq.slot)
            seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        self.add(seq, front=True)

    def schedule(self) -> ScheduledStep:
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep([], [])
        scheduled: set[int] = set()

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.allocator.grow(seq.block_table, seq.num_computed + n):
                victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
                if not victims:
                    break
                self._preempt(victims[-1])
                step.preempted += 1
            else:
                step.work.append((seq, n))
                scheduled.add(id(seq))
                budget -= n
                continue
            self._preempt(seq)  # nothing left to take blocks from: it waits for the others to finish
            step.preempted += 1

        while budget > 0 and len(self.running) < self.config.max_num_seqs and self.waiting:
            admitted = False
            for key in list(self.waiting):
                if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                seq = self.waiting[key][0]
                if seq.adapter is not None:
                    ready = self.store.request_host(seq.adapter)
                    if isinstance(ready, str):  # the folder broke after registration
                        self._pop(key)
                        seq.status = Status.FINISHED
                        step.failed.append((seq, ready))
                        continue
                    if not ready:
                        continue
                    slot = self.store.acquire_slot(seq.adapter)
                    if slot is None:
                        continue
                    seq.slot = slot
                n = min(seq.num_tokens - seq.num_computed, budget)
                need = self.allocator.blocks_needed(seq.block_table, seq.num_computed + n)
                if need + self.watermark > self.allocator.num_free and self.running:
                    self._release(seq)
                    return step  # memory is the limit now: wait for running sequences to finish
                if not self.allocator.grow(seq.block_table, seq.num_computed + n):
                    self._release(seq)
                    return step
                self._pop(key)
                seq.status = Status.RUNNING
                self.running.append(seq)
                step.work.append((seq, n))
                budget -= n
                admitted = True
                if key in self.waiting:
                    self.waiting.move_to_end(key)  # this adapter's turn is used: the others go first
            if not admitted:
                break
        return step

    def _pop(self, key: str) -> None:
        queue = self.waiting[key]
        queue.popleft()
        if not queue:
            del self.waiting[key]
