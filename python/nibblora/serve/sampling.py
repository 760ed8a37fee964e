"""Per-request decoding settings and the sampler that turns one step's logits into next tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nibblora.errors import InputError
from nibblora.models.llama import filter_logits


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature 0 is greedy (argmax); otherwise logits / temperature, then top_k (0: off) and top_p (1.0: off),
    then a draw from the request's own generator (seeded by `seed`, so the same seed gives the same text
    whatever else is in the batch). Generation stops at max_tokens, at a stop token (EOS unless ignore_eos, and
    stop_token_ids) or when the text contains a stop string (which is cut from the output).
    logprobs: None, or how many top alternatives to report with each sampled token's log-probability.
    return_logits: keep each step's float32 logits on the output (tests compare them).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    return_logits: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = (
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens > 0, "a positive integer"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "between 0 and 100"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "0 (off) or a positive integer"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "between 0 and 20"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        )
        for name, ok, want in checks:
            if not ok:
                raise InputError(f"sampling parameters: {name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream (None for greedy)."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def sample_next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[SampledToken]:
    """One token per row of logits [rows, vocab] (float32), following each row's params."""
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        index = torch.tensor(greedy_rows, device=logits.device)
        tokens[index] = logits[index].argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(logits[i : i + 1], p.temperature, p.top_k or None, p.top_p)
        probs = row.softmax(dim=-1)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0, 0]
    ids = tokens.tolist()
    want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
    out = [SampledToken(t) for t in ids]
    if want_logprobs:
        logprobs = torch.log_softmax(logits[want_logprobs], dim=-1)
        for j, i in enumerate(want_logprobs):
            out[i].logprob = float(logprobs[j, ids[i]])
            k = params[i].logprobs
            if k:
                top = torch.topk(logprobs[j], k)
                out[i].top_logprobs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return out
