"""Where adapters live: known (name -> folder), host memory (an LRU of `max_cpu_loras`), device slots (`max_loras`).

    store.register("sql", "adapters/sql")   # reads and validates now (call it off the event loop)
    store.request_host("sql")               # engine thread: True when in host memory, else loading in background
    slot = store.acquire_slot(ref)          # engine thread: a device slot holding it (refcounted), or None
    store.release_slot(slot)

A registered adapter is identified by (name, version): replacing a name bumps the version, so sequences already
running keep the old weights in their slot while new requests get the new ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from nibblora.errors import AdapterError
from nibblora.serve.adapter_files import AdapterWeights, read_lora_folder
from nibblora.serve.lora_ops import LoRASlots


@dataclass(frozen=True)
class AdapterRef:
    """One registered version of an adapter: what a request holds on to."""

    name: str
    version: int
    path: Path


@dataclass
class StoreStats:
    host_hits: int = 0
    host_misses: int = 0
    device_hits: int = 0
    device_misses: int = 0
    evictions: int = 0


class AdapterStore:
    """Known adapters, their host copies (LRU) and the device slots the batched LoRA layers read.

    targets: {module name: (in, out)} of the base's adaptable linears; slots: the LoRASlots of each of them.
    max_rank: the largest rank a slot holds (adapters above it are refused at registration).
    Thread safety: register / unregister / lookups may come from any thread; slot operations from the engine
    thread only.
    """

    def __init__(
        self,
        targets: dict[str, tuple[int, int]],
        slots: dict[str, LoRASlots],
        *,
        max_loras: int,
        max_cpu_loras: int,
        max_rank: int,
        device: torch.device,
        reader: Callable[[Path, dict[str, tuple[int, int]]], AdapterWeights] = read_lora_folder,
    ) -> None:
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})")
        self.targets, self.slots = targets, slots
        self.max_loras, self.max_cpu_loras, self.max_rank = max_loras, max_cpu_loras, max_rank
        self.device = device
        self._reader = reader
        self._lock = threading.Lock()
        self._known: dict[str, AdapterRef] = {}
        self._versions = 0
        self._host: OrderedDict[AdapterRef, AdapterWeights] = OrderedDict()
        self._loading: dict[AdapterRef, Future] = {}
        self._failed: dict[AdapterRef, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nibblora-adapter-loader")
        # Device slots: which adapter each holds, how many running sequences use it, and recency for eviction.
        self.slot_owner: list[AdapterRef | None] = [None] * max_loras
        self.slot_refs = [0] * max_loras
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(max_loras))
        self.stats = StoreStats()
        self._copy_stream = None  # CUDA: slot copies run here, beside the compute stream
        self._copies_done = None

    # ---- registry (any thread) -------------------------------------------------------------------------
    def read(self, path: str | Path) -> AdapterWeights:
        """Read and validate a folder against this base (AdapterError naming the tensor on any problem)."""
        weights = self._reader(Path(path), self.targets)
        if weights.max_rank > self.max_rank:
            worst = max(weights.modules.items(), key=lambda kv: kv[1].rank)
            raise AdapterError(
                f"reading adapter: {path}: module {worst[0]!r} has rank {worst[1].rank}, above the "
                f"server's --max-lora-rank {self.max_rank}; restart with a larger --max-lora-rank"
            )
        if self.device.type == "cuda":
            for m in weights.modules.values():  # pinned, so the copy to a slot can overlap compute
                m.lora_A, m.lora_B = m.lora_A.pin_memory(), m.lora_B.t().pin_memory().t()
        return weights

    def register(self, name: str, path: str | Path) -> AdapterRef:
        """Read `path` now (validating it) and make `name` serve it; replaces an adapter of the same name."""
        weights = self.read(path)
        with self._lock:
            self._versions += 1
            ref = AdapterRef(name, self._versions, Path(path))
            self._known[name] = ref
            self._put_host(ref, weights)
        return ref

    def unregister(self, name: str) -> AdapterRef:
        """Forget `name`: new requests get 404; sequences already running finish with their slot."""
        with self._lock:
            ref = self._known.pop(name, None)
            if ref is None:
                raise KeyError(name)
            self._host.pop(ref, None)
        return ref

    def lookup(self, name: str) -> AdapterRef | None:
        with self._lock:
            return self._known.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._known)

    def host_count(self) -> int:
        with self._lock:
            return len(self._host)

    def host_bytes(self) -> int:
        with self._lock:
            return sum(w.nbytes for w in self._host.values())

    def device_bytes(self) -> int:
        """Bytes of the device slots of every module: fixed at construction (max_loras x max_rank), never grown."""
        total = 0
        for module_slots in self.slots.values():
            tensors = (module_slots.lora_A, module_slots.lora_Bt, module_slots.scaling, module_slots.rank_tensor)
            total += sum(t.nbytes for t in tensors if t is not None)
        return total

    def _put_host(self, ref: AdapterRef, weights: AdapterWeights) -> None:
        self._host[ref] = weights
        self._host.move_to_end(ref)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
            self.stats.evictions += 1

    # ---- host cache (engine thread) ----------------------------------------------------------------------
    def request_host(self, ref: AdapterRef) -> bool | str:
        """True when `ref` is in host memory; False while a background read runs; an error message if it failed."""
        with self._lock:
            if ref in self._host:
                self._host.move_to_end(ref)
                return True
            if ref in self._failed:
                return self._failed.pop(ref)
            # Read ahead at most max_loras adapters at a time: reading every queued adapter at once would make
            # them evict each other from the host LRU before their turn comes.
            if ref not in self._loading and len(self._loading) < self.max_loras:
                self.stats.host_misses += 1
                self._loading[ref] = self._pool.submit(self._load_in_background, ref)
            return False

    def _load_in_background(self, ref: AdapterRef) -> None:
        try:
            weights = self.read(ref.path)
        except AdapterError as err:
            with self._lock:
                self._failed[ref] = str(err)
                self._loading.pop(ref, None)
            return
        with self._lock:
            self._put_host(ref, weights)
            self._loading.pop(ref, None)

    def loading(self) -> bool:
        with self._lock:
            return bool(self._loading)

    def wait_for_loads(self, timeout: float = 0.05) -> None:
        with self._lock:
            futures = list(self._loading.values())
        for f in futures:
            try:
                f.result(timeout=timeout)
            except TimeoutError:
                return

    # ---- device slots (engine thread) --------------------------------------------------------------------
    def slot_of(self, ref: AdapterRef) -> int | None:
        try:
            return self.slot_owner.index(ref)
        except ValueError:
            return None

    def acquire_slot(self, ref: AdapterRef) -> int | None:
        """A slot holding `ref` with its refcount raised, copying it in if needed; None if every slot is busy
        or the adapter is not in host memory yet."""
        slot = self.slot_of(ref)
        if slot is not None:
            self.stats.device_hits += 1
        else:
            with self._lock:
                weights = self._host.get(ref)
            if weights is None:
                return None
            free = [s for s in self._slot_lru if self.slot_refs[s] == 0]
            if not free:
                return None
            self.stats.host_hits += 1
            # Prefer an empty slot, else the least recently used idle one.
            slot = next((s for s in free if self.slot_owner[s] is None), free[0])
            self.stats.device_misses += 1
            self._write_slot(slot, weights)
            self.slot_owner[slot] = ref
        self.slot_refs[slot] += 1
        self._slot_lru.move_to_end(slot)
        return slot

    def _write_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into a slot. On CUDA the copies go on a side stream from pinned memory after whatever
        compute is queued (the slot's old contents may still be read), and only the next forward waits for them
        (wait_for_copies). Each step ends with a host sync (sampling), so today this saves the host from blocking
        on the copies rather than hiding them under a forward; reads from disk are the part that overlaps compute."""

        def write_all() -> None:
            for name, module_slots in self.slots.items():
                m = weights.modules.get(name)
                module_slots.write(
                    slot,
                    None if m is None else m.lora_A,
                    None if m is None else m.lora_B,
                    0.0 if m is None else m.scaling,
                )

        if self.device.type != "cuda":
            write_all()
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        # The slot's previous contents may still be read by queued compute: start after it.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            write_all()
        self._copies_done = self._copy_stream.record_event()

    def wait_for_copies(self) -> None:
        """Make the compute stream wait for slot copies issued so far (CUDA; nothing to do on the CPU)."""
        if self._copies_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copies_done)
            self._copies_done = None

    def release_slot(self, slot: int) -> None:
        self.slot_refs[slot] -= 1
        if self.slot_refs[slot] < 0:
            raise RuntimeError(f"adapter slot {slot} released more often than acquired")

    def loaded_on_device(self) -> int:
        return sum(owner is not None for owner in self.slot_owner)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
