"""load_model: a Hugging Face checkpoint (full precision or bitsandbytes 4-bit) into a nibblora LlamaForCausalLM.

The model is first built on the meta device (shapes only, no memory), then every parameter is read from the
safetensors files one tensor at a time, converted and placed. Peak memory is about one model plus one tensor.
4-bit layers are built straight from the packed codes, or quantized one linear at a time as they arrive, so a
full-precision copy of the decoder never exists.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nibblora.checkpoint import Checkpoint, CheckpointError, MissingTensorError, open_checkpoint, read_config
from nibblora.models.config import ModelConfig, UnsupportedModelError
from nibblora.models.llama import LlamaForCausalLM
from nibblora.quant.bnb_format import BNB_PARTS, BNB_QUANT_TYPES, find_quant_state_key

QUANTIZE_CHOICES = (None, *BNB_QUANT_TYPES)
LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_model(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    gradient_checkpointing: bool = False,
) -> LlamaForCausalLM:
    """Load a Llama / Mistral / Qwen2 causal LM from a Hugging Face checkpoint directory.

    directory: holds config.json and model.safetensors (or model.safetensors.index.json and its shards).
    dtype: dtype of the unquantized parameters (embeddings, norms, lm_head, dense linears) and the compute dtype
        of 4-bit layers: torch.float32, torch.bfloat16 or torch.float16.
    quantize: None keeps the decoder's linears dense; "nf4" or "fp4" quantizes each linear of the decoder layers
        as it is loaded (embeddings, norms and lm_head stay in `dtype`). A checkpoint saved by transformers +
        bitsandbytes in 4-bit (config.json quantization_config.quant_method == "bitsandbytes") is loaded into
        4-bit layers whatever this says, as long as it does not ask for a different 4-bit type.
    device: where the parameters go ("cpu", "cuda", "cuda:1", ...).
    blocksize, double_quant: the 4-bit layout used by `quantize` (bitsandbytes' defaults: 64, True).
    gradient_checkpointing: recompute each decoder layer in backward (see LlamaForCausalLM).
    Returns the model in eval mode (call .train() to fine-tune).
    Raises CheckpointError (a ValueError) or its FileNotFoundError / KeyError subclasses naming the file or key.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be None, 'nf4' or 'fp4', got {quantize!r}")
    device = torch.device(device)
    # The config is judged before any weight file is opened: "not a model we support" beats "bad file".
    hf_config = read_config(directory)
    config = ModelConfig.from_hf_dict(hf_config, source=str(Path(directory) / "config.json"))
    with open_checkpoint(directory) as ckpt:
        _check_quantization_config(ckpt, quantize)
        with torch.device("meta"):
            model = LlamaForCausalLM(config, gradient_checkpointing=gradient_checkpointing)
        model.to(dtype)  # free on meta: only records the dtype each parameter will be filled in
        loader = _Filler(ckpt, model, dtype, device, quantize, blocksize, double_quant)
        loader.fill_decoder_linears()
        loader.fill_remaining_parameters()
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:  # an internal bug, not a checkpoint problem: say exactly what was left
        raise RuntimeError(f"load_model left parameters unfilled: {', '.join(still_meta)}")
    return model.eval()


def _check_quantization_config(ckpt: Checkpoint, quantize: str | None) -> None:
    qc = (ckpt.config or {}).get("quantization_config")
    if not qc:
        return
    source = ckpt.directory / "config.json"  # its schema (models/config.py) already made qc an object
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise UnsupportedModelError(
            f"{source}: quantization_config.quant_method {method!r} is not supported; "
            "nibblora loads full-precision checkpoints and bitsandbytes 4-bit (nf4/fp4) ones"
        )
    if qc.get("load_in_8bit"):
        raise UnsupportedModelError(f"{source}: bitsandbytes 8-bit checkpoints are not supported, only 4-bit")
    stored = qc.get("bnb_4bit_quant_type", "nf4")
    if stored not in BNB_QUANT_TYPES:
        raise UnsupportedModelError(f"{source}: bnb_4bit_quant_type {str(stored)[:50]!r} is not nf4 or fp4")
    if quantize is not None and quantize != stored:
        raise ValueError(
            f"{ckpt.directory} is already quantized to {stored}; it cannot be re-quantized to {quantize} "
            f"(load it with quantize=None or {stored!r})"
        )


def _bnb_quant_state_key(ckpt: Checkpoint, weight_name: str) -> str | None:
    """The `P.weight.quant_state.bitsandbytes__<type>` key if `weight_name` is stored in 4-bit, else None."""
    return find_quant_state_key(ckpt.entries.keys(), weight_name)


class _Filler:
    """Reads tensors from `ckpt` into the meta-device `model`, one at a time."""

    def __init__(self, ckpt, model, dtype, device, quantize, blocksize, double_quant):
        self.ckpt = ckpt
        self.model = model
        self.dtype = dtype
        self.device = device
        self.quantize = quantize
        self.blocksize = blocksize
        self.double_quant = double_quant

    def read(self, name: str, shape: torch.Size) -> torch.Tensor:
        """Tensor `name` in the load dtype on the load device, checked against the model's shape."""
        if name not in self.ckpt:
            raise MissingTensorError(
                f"checkpoint {self.ckpt.directory} has no tensor {name!r}, which the model needs "
                f"(model_type {self.model.config.model_type!r}, {self.model.config.num_hidden_layers} layers)"
            )
        if _bnb_quant_state_key(self.ckpt, name) is not None:
            # A 4-bit tensor where the model keeps full precision (e.g. an lm_head someone quantized): decode it.
            tensor = self._read_quantized(name).dequantize(torch.float32)
        else:
            tensor = self.ckpt.get_tensor(name)
            if not tensor.is_floating_point():
                # Casting integer codes to float would load nonsense (values in the billions) without a word.
                raise CheckpointError(
                    f"tensor {name!r} in {self.ckpt.file_of(name).name} has dtype {self.ckpt.entry(name).dtype}; "
                    "the model needs floating-point weights (F32, BF16 or F16), so the checkpoint is damaged or in "
                    "a format nibblora does not load"
                )
        if tensor.shape != shape:
            raise CheckpointError(
                f"tensor {name!r} in {self.ckpt.file_of(name).name} has shape {list(tensor.shape)}, but the config "
                f"gives {list(shape)}"
            )
        return tensor.to(device=self.device, dtype=self.dtype)

    def _read_quantized(self, weight_name: str):
        from nibblora.quant import from_bnb_state_dict

        state_key = _bnb_quant_state_key(self.ckpt, weight_name)
        names = [weight_name, state_key, *(f"{weight_name}.{s}" for s in BNB_PARTS)]
        names = [n for n in names if n in self.ckpt]  # from_bnb_state_dict names any that it needs and lacks
        try:
            return from_bnb_state_dict(self.ckpt.get_tensors(names), weight_name)
        except KeyError as err:
            raise MissingTensorError(f"{self.ckpt.directory}: {err.args[0]}") from None
        except (ValueError, TypeError) as err:
            # TypeError: a quant state whose JSON fields have the wrong types (a list where a number belongs).
            raise CheckpointError(f"{self.ckpt.directory}: {weight_name!r}: {err}") from None

    def fill_decoder_linears(self) -> None:
        """Every nn.Linear inside model.layers: 4-bit if the checkpoint stores it so or `quantize` asks, else dense."""
        for name, module in list(self.model.model.layers.named_modules(prefix="model.layers")):
            if not isinstance(module, nn.Linear):
                continue
            weight_name = f"{name}.weight"
            prequantized = _bnb_quant_state_key(self.ckpt, weight_name) is not None
            if not prequantized and self.quantize is None:
                continue  # a plain parameter, filled with the rest
            bias = self.read(f"{name}.bias", module.bias.shape) if module.bias is not None else None
            from nibblora.lora import NF4Linear  # lazy: the 4-bit layer lives in nibblora.lora

            if prequantized:
                qweight = self._read_quantized(weight_name)
                expected = (module.out_features, module.in_features)
                if tuple(qweight.shape) != expected:
                    raise CheckpointError(
                        f"4-bit tensor {weight_name!r} has shape {list(qweight.shape)}, but the config gives "
                        f"{list(expected)}"
                    )
                layer = NF4Linear.from_quantized(qweight.to(self.device), bias=bias, compute_dtype=self.dtype)
            else:
                dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
                dense.weight = nn.Parameter(self.read(weight_name, module.weight.shape), requires_grad=False)
                if bias is not None:
                    dense.bias = nn.Parameter(bias, requires_grad=False)
                layer = NF4Linear.from_linear(
                    dense,
                    quant_type=self.quantize,
                    blocksize=self.blocksize,
                    double_quant=self.double_quant,
                    compute_dtype=self.dtype,
                )
                del dense  # the full-precision weight of this one layer is all that ever existed
            self.model.set_submodule(name, layer)

    def fill_remaining_parameters(self) -> None:
        """Every parameter still on the meta device, read by its own name (HF names = our names)."""
        tied = _tied_head_names(self.model)
        for module_name, module in list(self.model.named_modules()):
            for param_name, param in list(module.named_parameters(recurse=False)):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if not param.is_meta or full in tied:
                    continue
                tensor = self.read(full, param.shape)
                setattr(module, param_name, nn.Parameter(tensor, requires_grad=param.requires_grad))


def _tied_head_names(model: LlamaForCausalLM) -> set[str]:
    # With tie_word_embeddings the head is the embedding; a checkpoint may or may not carry a copy of it.
    return {"lm_head.weight"} if model.config.tie_word_embeddings else set()
