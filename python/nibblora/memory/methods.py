"""Training-memory estimates for the methods beyond LoRA (nibblora.methods): DoRA, IA3, prompt tuning, prefix
tuning and bottleneck adapters, on the same components as estimate_memory.

    est = estimate_method_memory("llama-2-7b", "ia3", batch_size=1, seq_len=512)
    method_trainable_params(shape, "prefix", num_virtual_tokens=20)      # exact

What is exact and what is approximated:
- The trainable-parameter count is exact for the layouts nibblora.methods builds (tests compare it with the
  injected model's parameters), and so are the adapter, gradient and AdamW-state bytes (float32, 16 bytes per
  trainable parameter: value, gradient, two moments).
- The frozen base (weights, 4-bit constants), the loss chunk, backward temporaries and the framework's bytes are
  estimate_memory's for a frozen base (LoRA at rank 0).
- Activations are approximated: the frozen base's (as LoRA at rank 0 saves them) plus what each method adds per
  token, counted from its forward, not measured tensor by tensor: IA3 the k / v outputs and the down_proj input it
  scales; DoRA its LoRA ranks plus each adapted projection's base output (the magnitude's gradient needs it) and,
  as a transient, one float32 copy of the largest adapted weight for the row norms; prompt tuning the same model
  over seq_len + num_virtual_tokens tokens; prefix tuning the prefix keys and values of every layer; bottleneck
  adapters each adapter's input and its two bottleneck-wide activations.
"""

from __future__ import annotations

from nibblora.lora.params import DecoderShape, projection_lora_params
from nibblora.memory.estimate import DTYPE_BYTES, MemoryEstimate, _shape, _targets, estimate_memory

METHOD_MODES = ("dora", "ia3", "prompt", "prefix", "adapter")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


def _kv_dim(shape: DecoderShape) -> int:
    head_dim = shape.head_dim or shape.hidden_size // shape.num_attention_heads
    return shape.num_key_value_heads * head_dim


def method_trainable_params(
    shape: DecoderShape,
    mode: str,
    *,
    r: int = 64,
    target_modules: str | list[str] = "all-linear",
    ia3_targets: tuple[str, ...] = IA3_TARGETS,
    ia3_feedforward: tuple[str, ...] = IA3_FEEDFORWARD,
    num_virtual_tokens: int = 20,
    projection_hidden: int = 0,
    adapter_variant: str = "houlsby",
    bottleneck_size: int = 16,
) -> int:
    """Exact trainable parameters of `mode` on a decoder of `shape`, as nibblora.methods injects it."""
    layers, hidden = shape.num_hidden_layers, shape.hidden_size
    projections = shape.projections()  # name -> (in, out)
    if mode == "dora":  # LoRA's A and B plus one magnitude per output row
        names = _targets(target_modules)
        return layers * sum(projection_lora_params(*projections[n], r) + projections[n][1] for n in names)
    if mode == "ia3":  # one scale per output (attention) or input (feed-forward) feature
        return layers * sum(projections[n][0] if n in ia3_feedforward else projections[n][1] for n in ia3_targets)
    if mode == "prompt":
        return num_virtual_tokens * hidden
    if mode == "prefix":
        flat = layers * 2 * _kv_dim(shape)
        if not projection_hidden:
            return num_virtual_tokens * flat
        token_dim = _kv_dim(shape)
        return num_virtual_tokens * token_dim + (token_dim + 1) * projection_hidden + (projection_hidden + 1) * flat
    if mode == "adapter":
        per_layer = 2 if adapter_variant == "houlsby" else 1
        return layers * per_layer * (2 * bottleneck_size * hidden + bottleneck_size + hidden)
    raise ValueError(f"mode must be one of {', '.join(METHOD_MODES)}, got {mode!r}")


def estimate_method_memory(
    model: object,
    mode: str,
    *,
    four_bit: bool = False,
    r: int = 64,
    target_modules: str | list[str] = "all-linear",
    num_virtual_tokens: int = 20,
    projection_hidden: int = 0,
    adapter_variant: str = "houlsby",
    bottleneck_size: int = 16,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str = "bfloat16",
    gradient_checkpointing: bool = True,
    double_quant: bool = True,
    device: str = "cpu",
) -> MemoryEstimate:
    """Estimate training memory for a method of nibblora.methods (see the module docstring for what is exact).
    four_bit: the frozen base in NF4 (model.load_in_4bit)."""
    if mode not in METHOD_MODES:
        raise ValueError(f"mode must be one of {', '.join(METHOD_MODES)}, got {mode!r}")
    shape = _shape(model)
    e = DTYPE_BYTES[dtype]
    tokens_seen = seq_len + (num_virtual_tokens if mode == "prompt" else 0)
    frozen = estimate_memory(
        shape,
        "qlora" if four_bit else "lora",
        r=r if mode == "dora" else 0,
        target_modules=target_modules if mode == "dora" else "all-linear",
        batch_size=batch_size,
        seq_len=tokens_seen,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        double_quant=double_quant,
        device=device,
    )
    trainable = method_trainable_params(
        shape,
        mode,
        r=r,
        target_modules=target_modules,
        num_virtual_tokens=num_virtual_tokens,
        projection_hidden=projection_hidden,
        adapter_variant=adapter_variant,
        bottleneck_size=bottleneck_size,
    )
    c = dict(frozen.components)
    c["adapter"] = 4 * trainable
    c["gradients"] = 4 * trainable
    c["optimizer_states"] = 8 * trainable
    projections = shape.projections()
    tokens = batch_size * seq_len
    kv = _kv_dim(shape)
    largest = trainable  # elements of the largest trainable tensor (AdamW steps one parameter at a time)
    if mode == "ia3":  # the k / v outputs and the down_proj input it scales
        per_layer = tokens * e * (2 * kv + shape.intermediate_size)
        largest = max(projections[n][0] if n in IA3_FEEDFORWARD else projections[n][1] for n in IA3_TARGETS)
    elif mode == "dora":  # each adapted projection's base output; a float32 weight copy for the row norms
        names = _targets(target_modules)
        per_layer = tokens * e * sum(projections[n][1] for n in names)
        c["backward_temporaries"] += 4 * max(a * b for a, b in (projections[n] for n in names))
        largest = max(max(projection_lora_params(*projections[n], r) // 2, projections[n][1]) for n in names)
    elif mode == "adapter":  # each adapter's input and its two bottleneck-wide activations
        per_adapter = tokens * e * (shape.hidden_size + 2 * bottleneck_size)
        per_layer = per_adapter * (2 if adapter_variant == "houlsby" else 1)
        largest = bottleneck_size * shape.hidden_size
    elif mode == "prefix":  # the prefix keys and values of every layer
        per_layer = 2 * batch_size * num_virtual_tokens * kv * e
    else:  # prompt: the longer sequence is already in the frozen estimate
        per_layer = 0
    c["activations"] += per_layer * (1 if gradient_checkpointing else shape.num_hidden_layers)
    c["optimizer_temporaries"] = 2 * 4 * largest
    inputs = dict(frozen.inputs, mode=mode, four_bit=four_bit, approximated="activations")
    return MemoryEstimate(mode, frozen.params, trainable, c, inputs)


__all__ = ["METHOD_MODES", "estimate_method_memory", "method_trainable_params"]
