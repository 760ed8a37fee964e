"""Training-memory estimates by component for full fine-tuning, LoRA and QLoRA of a Llama-family decoder.

    est = estimate_memory("llama-2-7b", mode="qlora", r=64, target_modules="all-linear", batch_size=1, seq_len=512)
    print(est.format())            # one line per component, the phase at the peak, and the total
    est.total_bytes                # the predicted peak

Components (bytes on the training device):
    weights            the base model as stored: dtype bytes per parameter; QLoRA: 0.5 per quantized parameter
    quant_constants    QLoRA: the per-block scales (double quantization: ~0.127 bits per parameter)
    master_weights     full FT with mixed precision: an fp32 copy of every parameter (4 bytes)
    gradients          one per trainable parameter (fp32 for LoRA adapters, the model's dtype for full FT)
    optimizer_states   AdamW: two moments per trainable parameter, in the trainable parameter's precision
                       (0 on the device when paged to host memory)
    adapter            LoRA / QLoRA: A and B of every adapted projection, kept in fp32
    activations        what backward needs, as nibblora's decoder saves it: per layer all saved tensors, or only
                       the layer input with gradient checkpointing (plus one whole layer: the last, which is
                       never recomputed, during the loss; then each layer being recomputed in backward); with
                       activation offloading on CUDA, only the layer inputs not moved to pinned host memory
                       (`MemoryEstimate.pinned_host_bytes`)
    loss               the chunked lm_head + cross-entropy at the end of forward: one chunk of float32 logits
                       (and a 16-bit copy), the selected hidden states and their gradient; full FT: the
                       lm_head's float32 gradient, computed in forward
    backward_temporaries  backward of one decoder layer: the MLP's recomputed product and the gradients of the
                       gate, up and product tensors, plus two hidden-size gradients; QLoRA: the base weight
                       dequantized for a matmul (the largest projection on CUDA, one slice of it on a CPU)
    optimizer_temporaries the AdamW step (one parameter at a time): two temporaries of the largest parameter
    framework          fixed cost of the framework's own allocations (PyTorch's CPU allocator pools, the CUDA
                       workspace): measured, not derived

Not every component is alive at once. The peak is the largest of three phases (`phases`): the end of forward
(activations + loss), backward (activations + backward_temporaries) and the optimizer step (gradients +
optimizer_temporaries), each on top of what lives throughout (weights, constants, master copy, adapter, optimizer
states, framework). `total_bytes` is that peak. Validated on CPU against measured peaks on a grid of runs
(bench/memory_grid.py; docs/training.md lists the ratios); allocator fragmentation does not show in either
measure (malloc's in-use bytes on a CPU, max_memory_allocated on CUDA), so no term is spent on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nibblora.dtypes import COMPUTE_DTYPE_BYTES
from nibblora.lora.params import ALL_SEVEN, DecoderShape, projection_lora_params
from nibblora.models.loss_chunks import loss_chunk_tokens
from nibblora.quant.names import DEQUANT_SLICE_BYTES

DTYPE_BYTES = COMPUTE_DTYPE_BYTES
MODES = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "sgd")
COMPONENTS = (
    "weights",
    "quant_constants",
    "master_weights",
    "gradients",
    "optimizer_states",
    "adapter",
    "activations",
    "loss",
    "backward_temporaries",
    "optimizer_temporaries",
    "framework",
)
# Alive for the whole step; the rest belongs to one phase each (PHASES).
PERSISTENT = ("weights", "quant_constants", "master_weights", "optimizer_states", "adapter", "framework")
PHASES = {
    "forward": ("activations", "loss"),
    "backward": ("activations", "backward_temporaries"),
    "optimizer step": ("gradients", "optimizer_temporaries"),
}
# Bytes the framework itself holds once training runs (measured: malloc'd bytes after loading a 1 M-parameter model
# beyond its weights, PyTorch 2.15 on Linux; on CUDA the cuBLAS workspace, not validated).
FRAMEWORK_BYTES = {"cpu": 26 * 2**20, "cuda": 32 * 2**20}
# Activation offloading (models/offload.py): layer inputs on the device at once: the last layer's (never offloaded)
# and two in flight (the one in use and the next, copied out in forward or prefetched in backward).
OFFLOAD_RESIDENT_INPUTS = 3
# Nominal sizes for the no-argument table.
TABLE_MODELS = {"1B": "llama-3.2-1b", "7B": "llama-2-7b", "13B": "llama-2-13b", "70B": "llama-2-70b"}


@dataclass
class MemoryEstimate:
    """Bytes per component (see the module docstring) and the inputs that produced them."""

    mode: str
    params: int
    trainable_params: int
    components: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, object] = field(default_factory=dict)
    pinned_host_bytes: int = 0  # activation offloading: host buffers holding offloaded layer inputs (not on the device)

    @property
    def phases(self) -> dict[str, int]:
        """Bytes alive at the peak of each phase of a step (what lives throughout included)."""
        c = self.components
        base = sum(c.get(k, 0) for k in PERSISTENT)
        return {name: base + sum(c.get(k, 0) for k in parts) for name, parts in PHASES.items()}

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.__getitem__)

    @property
    def total_bytes(self) -> int:
        """The predicted peak: the largest phase."""
        return max(self.phases.values())

    def format(self) -> str:
        lines = [f"{self.mode}: {self.params / 1e9:.2f} B parameters, {self.trainable_params:,} trainable"]
        for name in COMPONENTS:
            lines.append(f"  {name:<22} {self.components.get(name, 0) / 1e9:>9.3f} GB")
        lines.append(f"  {'peak (' + self.peak_phase + ')':<22} {self.total_bytes / 1e9:>9.3f} GB")
        if self.pinned_host_bytes:
            lines.append(f"  {'pinned host (offload)':<22} {self.pinned_host_bytes / 1e9:>9.3f} GB")
        return "\n".join(lines)


def _shape(model: object) -> DecoderShape:
    """A DecoderShape from a preset name, a config.json path / folder, a dict or a config object."""
    if isinstance(model, (str, Path)) and (Path(model).is_dir() or str(model).endswith(".json")):
        from nibblora.checkpoint import read_config, read_json_object

        path = Path(model)
        return DecoderShape.from_config(read_config(path) if path.is_dir() else read_json_object(path))
    return DecoderShape.from_config(model)


def _targets(target_modules: str | list[str]) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return ALL_SEVEN
    names = tuple(t.rsplit(".", 1)[-1] for t in target_modules)
    unknown = [n for n in names if n not in ALL_SEVEN]
    if unknown:
        raise ValueError(f"target_modules {unknown} are not projections of a Llama decoder ({', '.join(ALL_SEVEN)})")
    return names


def layer_activation_bytes(
    shape: DecoderShape, tokens: int, dtype_bytes: int, full: bool, lora_rank_sum: int = 0, fused_norm: bool = False
) -> int:
    """Bytes one decoder layer saves for backward over `tokens` tokens (nibblora's decoder, counted tensor by tensor
    with saved_tensors_hooks; tests/test_memory.py checks the count).

    Per token: each RMSNorm keeps its input in float32 and its normalized output in the dtype ((4 + e) H bytes);
    attention keeps the q/k/v input, q and the output (H each), k and v (kv each), the log-sum-exp (4 bytes per
    head); the MLP keeps gate(x) and up(x) (the group function recomputes their product) or, with a trainable base
    (full FT), also silu(gate) and the product, plus its input; each adapter keeps its r-wide A(x).
    fused_norm (CUDA, where RMSNorm is PyTorch's fused kernel): each norm keeps its input and one float32 per token.
    """
    e = dtype_bytes
    head_dim = shape.head_dim or shape.hidden_size // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    h, i = shape.hidden_size, shape.intermediate_size
    per_token = e * ((4 if full else 2) * i + (4 if full else 2) * h + 2 * kv + lora_rank_sum)
    per_token += 2 * (e * h + 4 if fused_norm else (4 + e) * h) + 4 * (shape.num_attention_heads + 2)
    return tokens * per_token


def mlp_activation_bytes(
    shape: DecoderShape, tokens: int, dtype_bytes: int, full: bool, mlp_rank_sum: int = 0, fused_norm: bool = False
) -> int:
    """The MLP half's share of `layer_activation_bytes` (its norm, gate(x) and up(x), the adapters' A(x); with a
    trainable base also silu(gate), the product and down's input): what a layer keeps under selective
    checkpointing (`keep_mlp_layers`)."""
    e = dtype_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    norm = e * h + 4 if fused_norm else (4 + e) * h
    return tokens * (norm + 4 + e * ((4 * i + h) if full else (2 * i + mlp_rank_sum)))


def activation_bytes(
    shape: DecoderShape,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int,
    gradient_checkpointing: bool,
    lora_rank_sum: int = 0,
    full: bool = False,
    fused_norm: bool = False,
    keep_mlp_layers: int = 0,
    mlp_rank_sum: int = 0,
    offload_activations: bool = False,
) -> int:
    """Bytes of saved activations for one micro-batch at their peak.

    Without checkpointing: every layer's saved tensors (`layer_activation_bytes`). With it: each layer's input, plus
    one layer's saved tensors: the last layer's (never recomputed) until its backward, then each recomputed one's in
    turn; layers that keep their MLP (`keep_mlp_layers`,
    -1: all) also hold its activations (`mlp_activation_bytes`, of which `mlp_rank_sum` is the MLP adapters'
    ranks), and when all do, the recomputed part is the attention half only; with offload_activations only
    OFFLOAD_RESIDENT_INPUTS layer inputs are on the device, the rest in host memory. Both: RoPE's cos and sin, and the
    final norm's input (float32) and output, and the loss's gradient for the hidden states.
    """
    tokens = batch_size * seq_len
    e = dtype_bytes
    head_dim = shape.head_dim or shape.hidden_size // shape.num_attention_heads
    layer = layer_activation_bytes(shape, tokens, e, full, lora_rank_sum, fused_norm)
    if gradient_checkpointing:
        n = shape.num_hidden_layers
        kept = n if keep_mlp_layers < 0 else min(keep_mlp_layers, n)
        mlp = mlp_activation_bytes(shape, tokens, e, full, mlp_rank_sum, fused_norm)
        recomputed = layer - mlp if kept == n else layer
        inputs = min(n, OFFLOAD_RESIDENT_INPUTS) if offload_activations else n
        layers = inputs * tokens * shape.hidden_size * e + kept * mlp + recomputed
    else:
        layers = shape.num_hidden_layers * layer
    final_norm = e * shape.hidden_size + 4 if fused_norm else (4 + e) * shape.hidden_size
    model = tokens * (2 * head_dim * e + final_norm + e * shape.hidden_size)
    return layers + model


def loss_bytes(
    shape: DecoderShape, tokens: int, dtype_bytes: int, lm_head_trainable: bool, chunk_tokens: int | None = None
) -> int:
    """The chunked lm_head + cross-entropy's working set at the end of forward: one chunk of float32 logits (the
    log-sum-exp and the softmax are computed in their buffer), next to it in a 16-bit dtype the chunk's logits in
    that dtype or their gradient (never both); the selected hidden states and their gradient; with a trainable
    lm_head its float32 gradient. chunk_tokens: the chunk (None: `loss_chunk_tokens`' rule, what the model uses by
    default)."""
    e = dtype_bytes
    chunk = min(tokens, chunk_tokens or loss_chunk_tokens(tokens, shape.hidden_size, shape.vocab_size))
    per_logit = 4 + (e if e < 4 else 0)
    working = chunk * shape.vocab_size * per_logit + 2 * tokens * shape.hidden_size * e
    return working + (shape.vocab_size * shape.hidden_size * 4 if lm_head_trainable else 0)


def backward_temporary_bytes(shape: DecoderShape, tokens: int, dtype_bytes: int) -> int:
    """Backward of the MLP, the largest one: the recomputed product and silu(gate), the gradients of the product,
    up and gate ([tokens, intermediate] each), and two [tokens, hidden] gradients."""
    return tokens * (5 * shape.intermediate_size + 2 * shape.hidden_size) * dtype_bytes


def estimate_memory(
    model: object,
    mode: str = "qlora",
    *,
    r: int = 64,
    target_modules: str | list[str] = "all-linear",
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str = "bfloat16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = True,
    mixed_precision: bool = True,
    paged_optimizer: bool = False,
    double_quant: bool = True,
    blocksize: int = 64,
    device: str = "cpu",
    keep_mlp_layers: int = 0,
    document_mask: bool = False,
    loss_chunk_tokens: int | None = None,
    offload_activations: bool = False,
) -> MemoryEstimate:
    """Estimate training memory by component.

    model: a preset ("llama-2-7b", ...), a config.json (file or folder), a dict or an HF config object.
    mode: full | lora | qlora. r / target_modules: the adapter (LoRA, QLoRA). batch_size, seq_len: one
    micro-batch. dtype: weights and activations (float32 | bfloat16 | float16). optimizer: adamw (2 states) or
    sgd (none). mixed_precision: full FT in a 16-bit dtype keeps fp32 master weights and fp32 Adam states (the
    16 bytes/parameter recipe); False is pure 16-bit training (what nibblora.train does). paged_optimizer:
    optimizer states live in host memory, not on the device. device: "cpu" or "cuda" (the framework's fixed
    overhead differs). offload_activations: with gradient checkpointing on CUDA, the layer inputs but the last wait in
    pinned host memory (`pinned_host_bytes`); on a CPU they are copied within the same memory, so nothing changes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if device not in FRAMEWORK_BYTES:
        raise ValueError(f"device must be one of {', '.join(FRAMEWORK_BYTES)}, got {device!r}")
    shape = _shape(model)
    e = DTYPE_BYTES[dtype]
    total = shape.total_params()
    projections = shape.projections()
    quantizable = shape.num_hidden_layers * sum(a * b for a, b in projections.values())
    states_per_param = 2 if optimizer == "adamw" else 0
    c = dict.fromkeys(COMPONENTS, 0)
    rank_sum = mlp_rank_sum = 0
    largest = 0  # elements of the largest trainable parameter
    state_bytes = 4
    if mode == "full":
        trainable = total
        master = mixed_precision and e < 4
        c["weights"] = total * e
        c["master_weights"] = total * 4 if master else 0
        c["gradients"] = total * e  # computed in the model's dtype (then added into the master copy)
        c["optimizer_states"] = total * states_per_param * (4 if master else e)
        largest = max(shape.vocab_size * shape.hidden_size, max(a * b for a, b in projections.values()))
        state_bytes = 4 if master else e
    else:
        names = _targets(target_modules)
        trainable = shape.num_hidden_layers * sum(projection_lora_params(*projections[n], r) for n in names)
        rank_sum = r * len(names)
        mlp_rank_sum = r * len([n for n in names if n in ("gate_proj", "up_proj", "down_proj")])
        largest = max(projection_lora_params(*projections[n], r) for n in names) // 2
        c["adapter"] = trainable * 4
        c["gradients"] = trainable * 4
        c["optimizer_states"] = trainable * states_per_param * 4
        if mode == "lora":
            c["weights"] = total * e
        else:
            c["weights"] = (total - quantizable) * e + (quantizable + 1) // 2
            blocks = -(-quantizable // blocksize)
            # Double quantization: one uint8 per block + an fp32 scale and offset per 256 blocks; else fp32 per block.
            c["quant_constants"] = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    if paged_optimizer:
        c["optimizer_states"] = 0
    full = mode == "full"
    tokens = batch_size * seq_len
    offload = offload_activations and gradient_checkpointing and device == "cuda"
    c["activations"] = activation_bytes(
        shape,
        batch_size,
        seq_len,
        e,
        gradient_checkpointing,
        rank_sum,
        full,
        fused_norm=device == "cuda",
        keep_mlp_layers=keep_mlp_layers,
        mlp_rank_sum=mlp_rank_sum,
        offload_activations=offload,
    )
    if document_mask:
        c["activations"] += batch_size * seq_len * seq_len * e
    c["loss"] = loss_bytes(shape, tokens, e, lm_head_trainable=full, chunk_tokens=loss_chunk_tokens)
    c["backward_temporaries"] = backward_temporary_bytes(shape, tokens, e)
    if mode == "qlora":
        # The dense weight a 4-bit matmul dequantizes: whole on a GPU (one kernel), a slice at a time on a CPU.
        dense = max(a * b for a, b in projections.values()) * e
        c["backward_temporaries"] += dense if device == "cuda" else min(dense, DEQUANT_SLICE_BYTES)
    # AdamW one parameter at a time (foreach=False): the denominator and the update, each the size of the largest.
    c["optimizer_temporaries"] = 2 * largest * state_bytes if states_per_param else 0
    c["framework"] = FRAMEWORK_BYTES[device]
    inputs = dict(
        mode=mode,
        r=r,
        target_modules=target_modules,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        keep_mlp_layers=keep_mlp_layers,
        offload_activations=offload_activations,
        document_mask=document_mask,
        loss_chunk_tokens=loss_chunk_tokens,
        mixed_precision=mixed_precision,
        paged_optimizer=paged_optimizer,
        device=device,
    )
    pinned = (shape.num_hidden_layers - 1) * tokens * shape.hidden_size * e if offload else 0
    return MemoryEstimate(mode, total, trainable, c, inputs, pinned)


def lesson_table(batch_size: int = 1, seq_len: int = 512, r: int = 16, models: Mapping[str, str] | None = None) -> str:
    """The table for 1B, 7B, 13B and 70B: full FT (bf16 + fp32 master + AdamW), LoRA (bf16 base) and QLoRA (NF4
    base), in GB, with each column explained under it."""
    models = dict(models or TABLE_MODELS)
    header = (
        f"{'model':<6} {'params':>8} {'full FT':>9} {'16 B/param':>10} {'LoRA':>8} {'QLoRA':>8} "
        f"{'QLoRA weights':>13} {'QLoRA adapter+opt':>17}"
    )
    lines = [header, "-" * len(header)]
    for label, preset in models.items():
        kw = dict(batch_size=batch_size, seq_len=seq_len, r=r, target_modules="all-linear")
        full = estimate_memory(preset, "full", **kw)
        lora = estimate_memory(preset, "lora", **kw)
        qlora = estimate_memory(preset, "qlora", **kw)
        qc = qlora.components
        lines.append(
            f"{label:<6} {full.params / 1e9:>7.2f}B {full.total_bytes / 1e9:>8.1f}G {16 * full.params / 1e9:>9.1f}G "
            f"{lora.total_bytes / 1e9:>7.1f}G {qlora.total_bytes / 1e9:>7.1f}G "
            f"{(qc['weights'] + qc['quant_constants']) / 1e9:>12.2f}G "
            f"{(qc['adapter'] + qc['gradients'] + qc['optimizer_states']) / 1e9:>16.2f}G"
        )
    lines += [
        "",
        f"Assumptions: batch {batch_size} x {seq_len} tokens, gradient checkpointing, AdamW; LoRA/QLoRA r={r} on all "
        "seven projections (adapters in fp32).",
        "params       base-model parameters of the preset (llama-3.2-1b, llama-2-7b, llama-2-13b, llama-2-70b).",
        "full FT      mixed precision: bf16 weights (2 B) + bf16 gradients (2 B) + fp32 master copy (4 B) + two",
        "             fp32 Adam moments (8 B) = 16 bytes per parameter, plus activations.",
        "16 B/param   the rule of thumb alone: 16 x parameters (7B nominal: 112 GB). Only weights, gradients",
        "             and Adam states; no activations.",
        "LoRA         frozen bf16 base (2 B/param) + fp32 adapter, its gradient and 2 Adam states (16 B per",
        "             adapter parameter) + activations.",
        "QLoRA        the same with the base in NF4: 0.5 B/param + double-quantized scales (~0.127 bit/param);",
        "             embeddings, norms and lm_head stay bf16.",
        "QLoRA weights  the 4-bit base alone; QLoRA adapter+opt  adapter + gradients + Adam states.",
    ]
    return "\n".join(lines)
