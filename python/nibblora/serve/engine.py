"""The serving engine: one base model, many LoRA adapters, continuous batching over a paged KV cache.

    engine = Engine(load_model("base"), EngineConfig(max_loras=8), tokenizer=tok)
    engine.add_adapter("sql", "adapters/sql")
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=32, temperature=0), adapter="sql")
    while engine.has_work():
        for out in engine.step(): ...            # RequestOutput deltas
    results = engine.generate([ids1, ids2], params, adapters=["sql", None])   # offline, all at once

add_request / abort / add_adapter may be called from any thread; step() from one thread only (AsyncEngine runs it
in its own). The base model's adaptable linears are wrapped in place by BatchedLoRALinear, so pass a model that
is used for nothing else.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from nibblora.errors import AdapterError, InputError
from nibblora.lora.layers import LoRALinear, NF4Linear
from nibblora.models.llama import LlamaForCausalLM
from nibblora.serve.adapter_store import AdapterRef, AdapterStore
from nibblora.serve.kv_cache import PagedKVCache
from nibblora.serve.lora_ops import BatchedLoRALinear, KernelChooser, LoRAContext, LoRASlots
from nibblora.serve.metrics import EngineMetrics
from nibblora.serve.model_runner import BatchItem, ModelRunner
from nibblora.serve.sampling import SamplingParams, make_generator, sample_next_tokens
from nibblora.serve.scheduler import Scheduler, SchedulerConfig
from nibblora.serve.sequence import Detokenizer, RequestOutput, Sequence, Status

ADAPTABLE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
CPU_KV_CACHE_BYTES = 1 << 30


class UnknownAdapterError(InputError, KeyError):
    """A request named an adapter the engine does not know (the server answers 404)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class EngineConfig:
    """max_loras: device slots (adapters in one batch at most); max_cpu_loras: adapters kept in host memory;
    max_lora_rank: the largest rank a slot holds; max_num_seqs / max_num_batched_tokens: the per-step caps;
    block_size: tokens per KV block; kv_cache_tokens: KV capacity (None: 80% of free GPU memory, or 1 GiB on
    the CPU); max_model_len: context limit (None: the model's max_position_embeddings);
    lora_kernel: "auto" (measured per shape), "segment", "gathered" or "native" (the Rust kernel; CPU float32)."""

    max_loras: int = 8
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    lora_kernel: str = "auto"


@dataclass
class GenerationResult:
    """A whole request's result (Engine.generate)."""

    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logits: list[torch.Tensor]
    arrival: float
    first_token: float | None
    finished_at: float


class Engine:
    def __init__(
        self, model: LlamaForCausalLM, config: EngineConfig | None = None, tokenizer=None, model_name: str = "base"
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.model_name = model.eval(), model_name
        self.device, self.dtype = model.device, model.dtype
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.eos_ids = _eos_ids(model)

        self.context = LoRAContext()
        targets, slots = self._wrap_linears(model, config)
        self.store = AdapterStore(
            targets,
            slots,
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            max_rank=config.max_lora_rank,
            device=self.device,
        )
        self._probe = max(slots.values(), key=lambda s: s.lora_A.shape[2] * s.lora_Bt.shape[2], default=None)
        try:
            self.kernels = KernelChooser(config.lora_kernel, native=self._probe is not None and self._probe.native_ok())
        except ValueError as err:
            raise InputError(f"serving engine: {err}") from None

        num_blocks = self._num_blocks(config)
        self.cache = PagedKVCache(model.config, num_blocks, config.block_size, self.dtype, self.device)
        self.runner = ModelRunner(model, self.cache, self.context)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.cache.allocator, self.store
        )
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self.wakeup = threading.Event()
        self._kernel_steps = {"segment": 0, "gathered": 0, "native": 0}
        self._running_after_step = self._waiting_after_step = 0

    # ---- setup --------------------------------------------------------------------------------------------
    def _wrap_linears(self, model: LlamaForCausalLM, config: EngineConfig):
        targets: dict[str, tuple[int, int]] = {}
        slots: dict[str, LoRASlots] = {}
        for i, layer in enumerate(model.model.layers):
            for suffix in ADAPTABLE:
                parent_name, attr = suffix.split(".")
                parent = getattr(layer, parent_name)
                base = getattr(parent, attr)
                name = f"model.layers.{i}.{suffix}"
                if isinstance(base, (LoRALinear, BatchedLoRALinear)):
                    raise InputError(
                        f"serving engine: {name} already carries a LoRA adapter; pass the plain base "
                        "model and give adapters to the engine (add_adapter)"
                    )
                if not isinstance(base, (nn.Linear, NF4Linear)):
                    raise InputError(f"serving engine: {name} is a {type(base).__name__}, not a linear layer")
                targets[name] = (base.in_features, base.out_features)
                slots[name] = LoRASlots.empty(
                    config.max_loras, config.max_lora_rank, base.in_features, base.out_features, self.dtype, self.device
                )
                setattr(parent, attr, BatchedLoRALinear(base, slots[name], self.context))
        return targets, slots

    def _num_blocks(self, config: EngineConfig) -> int:
        per_token = PagedKVCache.bytes_per_token(self.model.config, self.dtype)
        tokens = config.kv_cache_tokens
        if tokens is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                tokens = int(free * 0.8) // per_token
            else:
                tokens = min(CPU_KV_CACHE_BYTES // per_token, config.max_num_seqs * self.max_model_len)
        blocks = tokens // config.block_size
        if blocks * config.block_size < self.max_model_len:
            raise InputError(
                f"serving engine: the KV cache holds {blocks * config.block_size} tokens, fewer than "
                f"one full context ({self.max_model_len}); raise kv_cache_tokens or lower max_model_len"
            )
        return blocks

    # ---- adapters (any thread) ----------------------------------------------------------------------------
    def add_adapter(self, name: str, path) -> AdapterRef:
        """Read, validate and register an adapter folder under `name` (replacing one of that name)."""
        if not name or name == self.model_name:
            raise AdapterError(f"loading adapter: name {name!r} is empty or the base model's own name")
        return self.store.register(name, path)

    def remove_adapter(self, name: str) -> None:
        try:
            self.store.unregister(name)
        except KeyError:
            raise UnknownAdapterError(f"unloading adapter: no adapter named {name!r} is loaded") from None

    # ---- requests (any thread) ----------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. adapter None (or the base model's name) runs the base alone.

        Raises UnknownAdapterError for an adapter name nobody registered, InputError for an empty prompt or one
        that leaves no room to generate within the context."""
        ref = None
        if adapter is not None and adapter != self.model_name:
            ref = self.store.lookup(adapter)
            if ref is None:
                raise UnknownAdapterError(
                    f"The model `{adapter}` does not exist; GET /v1/models lists the base "
                    "model and every loaded adapter"
                )
        if not prompt_ids:
            raise InputError("prompt: the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise InputError(
                f"prompt: {len(prompt_ids)} tokens leave no room to generate within the context of "
                f"{self.max_model_len} tokens; shorten the prompt"
            )
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InputError(f"prompt: token ids must be in [0, {vocab}), got {min(prompt_ids)}..{max(prompt_ids)}")
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(
            request_id,
            list(prompt_ids),
            params,
            ref,
            self.max_model_len,
            make_generator(params, self.device),
            self.eos_ids,
        )
        with self._lock:
            self._inbox.append(seq)
        self.wakeup.set()
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its KV blocks and adapter slot are freed at the start of the next step."""
        with self._lock:
            self._aborts.append(request_id)
        self.wakeup.set()

    @property
    def num_running(self) -> int:
        """Running sequences after the last step (safe to read from any thread)."""
        return self._running_after_step

    @property
    def num_waiting(self) -> int:
        """Requests waiting: those the last step left queued plus those added since (any thread)."""
        with self._lock:
            return self._waiting_after_step + len(self._inbox)

    def _snapshot_counts(self) -> None:
        # Other threads read these numbers; the scheduler's own containers change under them during a step.
        running, waiting = len(self.scheduler.running), self.scheduler.num_waiting
        with self._lock:
            self._running_after_step, self._waiting_after_step = running, waiting

    def has_work(self) -> bool:
        with self._lock:
            if self._inbox or self._aborts:
                return True
        return bool(self.scheduler.running or self.scheduler.waiting)

    # ---- the step (engine thread) -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit, schedule, run one forward over the batch, sample; the outputs of every request that moved."""
        try:
            return self._step()
        finally:
            self._snapshot_counts()

    def _step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        with self._lock:
            inbox, aborts = self._inbox, self._aborts
            self._inbox, self._aborts = [], []
        for seq in inbox:
            self.scheduler.add(seq)
        for request_id in aborts:
            seq = self.scheduler.remove(request_id)
            if seq is not None:
                seq.finish_reason = "abort"
                outputs.append(self._finish_output(seq))

        step = self.scheduler.schedule()
        for seq, message in step.failed:
            seq.finish_reason = "error"
            out = self._finish_output(seq)
            out.error = message
            outputs.append(out)
        if not step.work:
            if self.store.loading():
                self.store.wait_for_loads()
            return outputs

        # Sort by slot so every adapter's tokens form one segment (base-only first).
        work = sorted(step.work, key=lambda w: -1 if w[0].slot is None else w[0].slot)
        items = []
        for seq, n in work:
            done = seq.num_computed + n
            items.append(
                BatchItem(
                    seq.all_ids[seq.num_computed : done],
                    seq.num_computed,
                    seq.block_table,
                    -1 if seq.slot is None else seq.slot,
                    done == seq.num_tokens,
                )
            )
        lora_batch = self.runner.build_lora_batch(items)
        lora_batch.kernel = self.kernels.choose(lora_batch, self._probe)
        self._kernel_steps[lora_batch.kernel] += 1
        self.store.wait_for_copies()
        logits = self.runner.forward(items, lora_batch)

        sampling = []
        for (seq, n), item in zip(work, items, strict=True):
            if seq.num_computed == 0 and seq.emitted_tokens == 0:
                with self.metrics.lock:
                    self.metrics.prompt_tokens += len(seq.prompt_ids)
            seq.num_computed += n
            if item.need_logits:
                sampling.append(seq)
        if sampling:
            tokens = sample_next_tokens(logits, [s.params for s in sampling], [s.generator for s in sampling])
            for row, (seq, token) in enumerate(zip(sampling, tokens, strict=True)):
                if seq.params.return_logits:
                    seq.pending_logits.append(logits[row].detach().clone())
                seq.append(token, self.detokenizer)
                if seq.finish_reason is not None:
                    self.scheduler.finish(seq)
                    outputs.append(self._finish_output(seq))
                else:
                    outputs.append(seq.take_output())
        with self.metrics.lock:
            self.metrics.steps += 1
            self.metrics.preemptions += step.preempted
            self.metrics.generation_tokens += len(sampling)
            self.metrics.batch_tokens.observe(sum(n for _, n in work))
            self.metrics.batch_seqs.observe(len(work))
        return outputs

    def _finish_output(self, seq: Sequence) -> RequestOutput:
        seq.status = Status.FINISHED
        out = seq.take_output()
        now = time.monotonic()
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival
        self.metrics.finished(
            seq.finish_reason or "abort", len(seq.prompt_ids), ttft, now - seq.arrival, len(seq.output_ids)
        )
        return out

    # ---- offline use -------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        adapters: list[str | None] | None = None,
    ) -> list[GenerationResult]:
        """Run every prompt to completion (continuous batching over all of them); results in prompt order."""
        params_list = params if isinstance(params, list) else [replace(params) for _ in prompts]
        adapters = adapters or [None] * len(prompts)
        ids = [self.add_request(p, sp, a) for p, sp, a in zip(prompts, params_list, adapters, strict=True)]
        results = {
            rid: GenerationResult(rid, len(p), [], "", None, [], time.monotonic(), None, 0.0)
            for rid, p in zip(ids, prompts, strict=True)
        }
        remaining = set(ids)
        while remaining:
            for out in self.step():
                result = results.get(out.request_id)
                if result is None:
                    continue
                if out.new_token_ids and result.first_token is None:
                    result.first_token = time.monotonic()
                result.token_ids.extend(out.new_token_ids)
                result.text += out.new_text
                result.logits.extend(out.logits)
                if out.finished:
                    if out.error:
                        raise AdapterError(out.error)
                    result.finish_reason = out.finish_reason
                    result.finished_at = time.monotonic()
                    remaining.discard(out.request_id)
        return [results[rid] for rid in ids]

    # ---- metrics -----------------------------------------------------------------------------------------
    def render_metrics(self) -> str:
        stats = self.store.stats
        gauges = {
            "nibblora_requests_running": self.num_running,
            "nibblora_requests_waiting": self.num_waiting,
            "nibblora_adapters_known": len(self.store.names()),
            "nibblora_adapters_host": self.store.host_count(),
            "nibblora_adapters_device": self.store.loaded_on_device(),
            "nibblora_adapter_host_bytes": self.store.host_bytes(),
            "nibblora_adapter_device_bytes": self.store.device_bytes(),
            "nibblora_kv_blocks_total": self.cache.allocator.num_blocks,
            "nibblora_kv_blocks_free": self.cache.allocator.num_free,
        }
        if self.device.type == "cuda":
            gauges["nibblora_device_memory_bytes"] = torch.cuda.memory_allocated(self.device)
        counters = {
            "nibblora_adapter_device_hits_total": stats.device_hits,
            "nibblora_adapter_device_misses_total": stats.device_misses,
            "nibblora_adapter_host_hits_total": stats.host_hits,
            "nibblora_adapter_host_misses_total": stats.host_misses,
            "nibblora_adapter_host_evictions_total": stats.evictions,
            "nibblora_lora_segment_steps_total": self._kernel_steps["segment"],
            "nibblora_lora_gathered_steps_total": self._kernel_steps["gathered"],
            "nibblora_lora_native_steps_total": self._kernel_steps["native"],
        }
        return self.metrics.render(gauges, counters)

    def close(self) -> None:
        self.store.close()


def _eos_ids(model: LlamaForCausalLM) -> set[int]:
    eos = model.config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
