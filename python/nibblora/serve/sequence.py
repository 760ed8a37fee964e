"""A request as the engine tracks it (tokens, KV blocks, adapter, text so far) and what each step reports back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from nibblora.serve.adapter_store import AdapterRef
from nibblora.serve.sampling import SampledToken, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens / text (deltas) and, at the end, why it stopped.

    finish_reason: None while running; "stop" (stop token or string), "length" (max_tokens or the context),
    "abort" (cancelled) or "error" (then `error` says why).
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[SampledToken] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    error: str | None = None


class Detokenizer:
    """Token ids -> text through a `tokenizers.Tokenizer` (special tokens skipped)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Sequence:
    """One request in the engine. `num_computed` tokens of prompt + output are in the KV cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    max_total: int  # prompt + output may not exceed this (the model's context)
    generator: torch.Generator | None
    eos_ids: set[int]
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    slot: int | None = None  # device adapter slot while running (None: base only or not placed yet)
    status: Status = Status.WAITING
    first_token_time: float | None = None
    last_token_time: float | None = None
    text: str = ""  # decoded output so far (stop strings removed at the end)
    emitted_chars: int = 0  # how much of `text` has been reported
    emitted_tokens: int = 0
    finish_reason: str | None = None
    pending_logprobs: list[SampledToken] = field(default_factory=list)
    pending_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def adapter_key(self) -> str:
        return "" if self.adapter is None else f"{self.adapter.name}#{self.adapter.version}"

    def append(self, token: SampledToken, detok: Detokenizer | None) -> None:
        """Add a sampled token, update the text and decide whether the request is done."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(token.token_id)
        if self.params.logprobs is not None:
            self.pending_logprobs.append(token)
        if token.token_id in self.params.stop_token_ids or (
            token.token_id in self.eos_ids and not self.params.ignore_eos
        ):
            self.finish_reason = "stop"
        if detok is not None:
            self.text = detok.decode(self.output_ids)
            if self.params.stop:
                self._apply_stop_strings()
        if self.finish_reason is None and (
            len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_total
        ):
            self.finish_reason = "length"

    def _apply_stop_strings(self) -> None:
        longest = max(len(s) for s in self.params.stop)
        search_from = max(0, self.emitted_chars - longest)
        hits = [i for i in (self.text.find(s, search_from) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def take_output(self) -> RequestOutput:
        """The delta since the last report. Text that may still turn into a stop string, or that ends in half a
        UTF-8 character, is held back until the next token decides it."""
        finished = self.finish_reason is not None
        text_end = len(self.text)
        if not finished:
            if self.params.stop:
                text_end = max(self.emitted_chars, text_end - (max(len(s) for s in self.params.stop) - 1))
            while text_end > self.emitted_chars and self.text[text_end - 1] == "\ufffd":
                text_end -= 1
        new_text = self.text[self.emitted_chars : text_end]
        self.emitted_chars = max(self.emitted_chars, text_end)
        new_ids = self.output_ids[self.emitted_tokens :]
        self.emitted_tokens = len(self.output_ids)
        out = RequestOutput(
            self.request_id,
            new_ids,
            new_text,
            finished,
            self.finish_reason,
            len(self.prompt_ids),
            len(self.output_ids),
            self.pending_logprobs,
            self.pending_logits,
        )
        self.pending_logprobs, self.pending_logits = [], []
        return out
