"""NF4Linear (a frozen 4-bit linear layer) and LoRALinear (low-rank adapters over a frozen base)."""

from __future__ import annotations

import math

import torch
from torch import nn

from nibblora.lora.config import INIT_CHOICES, lora_scaling
from nibblora.lora.function import LoRALinearFunction, dequantize_base
from nibblora.quant import QuantizedTensor, QuantState, from_bnb_state_dict, quantize_4bit, to_bnb_state_dict
from nibblora.quant.bnb_format import find_quant_state_key
from nibblora.quant.names import BNB_QUANT_TYPES
from nibblora.quant.state import SUPPORTED_DTYPES, dtype_name

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_QUANT_BUFFERS = ("weight", "absmax", "quant_map", "offset", "nested_absmax", "nested_quant_map")


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as blockwise NF4/FP4 codes (nibblora.quant's format, which is
    bitsandbytes'). Each matmul dequantizes the weight to `compute_dtype` and frees it at once.

    Buffers (moved by `.to(device)`, never cast by `.to(dtype)`): `weight` uint8 [(n+1)//2, 1] packed codes,
    `absmax` (float32 [blocks], or uint8 codes with double quantization), `quant_map` float32 [16], and with
    double quantization `offset` float32 [], `nested_absmax` float32, `nested_quant_map` float32 [256].
    state_dict() uses bitsandbytes' keys: weight, weight.absmax, weight.quant_map, weight.nested_absmax,
    weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4 (or __fp4), plus bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        """An empty layer (zero codes) of the given shape, to be filled by load_state_dict; see the two
        constructors `from_quantized` and `from_linear` for the usual ways in."""
        super().__init__()
        _check_compute_dtype(compute_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        q = quantize_4bit(torch.zeros(out_features, in_features), quant_type, blocksize, double_quant=True)
        self._set_quantized(q.to(device or "cpu"))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(
        cls,
        qweight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> NF4Linear:
        """Wrap an already quantized [out, in] weight (no full-precision copy is made). The bias, if any, is kept
        as a frozen parameter in its own dtype."""
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"from_quantized expects a nibblora.quant.QuantizedTensor, got {type(qweight).__name__}")
        if len(qweight.shape) != 2:
            raise ValueError(
                f"a linear weight must be 2-D [out, in]; this QuantizedTensor has shape {list(qweight.shape)}"
            )
        if qweight.quant_type not in BNB_QUANT_TYPES:
            raise ValueError(
                f"NF4Linear holds nf4 or fp4 weights, got {qweight.quant_type!r}; "
                "quantize with quant_type='nf4' or 'fp4'"
            )
        _check_compute_dtype(compute_dtype)
        out_features, in_features = qweight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(
                f"bias has shape {list(bias.shape)}, expected [{out_features}] for a weight of shape "
                f"{list(qweight.shape)}"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.compute_dtype = compute_dtype
        layer._set_quantized(qweight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(qweight.device), requires_grad=False)
        else:
            layer.register_parameter("bias", None)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize an nn.Linear's weight. compute_dtype defaults to the linear's dtype when it is bf16/fp16/fp32."""
        weight = linear.weight.detach()
        if compute_dtype is None:
            compute_dtype = weight.dtype if weight.dtype in SUPPORTED_DTYPES else torch.bfloat16
        source = weight if weight.dtype in SUPPORTED_DTYPES else weight.float()
        q = quantize_4bit(source, quant_type, blocksize, double_quant)
        return cls.from_quantized(q, linear.bias, compute_dtype)

    def _set_quantized(self, q: QuantizedTensor) -> None:
        state = q.state
        self.quant_type, self.blocksize = state.quant_type, state.blocksize
        self.weight_dtype, self.weight_shape = state.dtype, torch.Size(state.shape)
        self.nested_blocksize = state.nested_blocksize
        self.register_buffer("weight", q.packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        self.register_buffer("offset", None if state.offset is None else state.offset.reshape(()))
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.register_buffer("nested_quant_map", state.nested_code)

    @property
    def quant_state(self) -> QuantState:
        """The QuantState over this module's current buffers (rebuilt on each access, so it follows .to())."""
        return QuantState(
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            dtype=self.weight_dtype,
            shape=self.weight_shape,
            absmax=self.absmax,
            code=self.quant_map,
            offset=self.offset,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map,
            nested_blocksize=self.nested_blocksize,
        )

    @property
    def qweight(self) -> QuantizedTensor:
        return QuantizedTensor(self.weight, self.quant_state)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight (a new tensor) in `dtype` (default: compute_dtype)."""
        return dequantize_base(self.weight, self.quant_state, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = LoRALinearFunction.apply(
            x.to(self.compute_dtype), self.weight, self.quant_state, self.bias, None, None, 1.0, 0.0, 0
        )
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would round the float32 scales and code tables: let them follow the
        # device only. The bias (a parameter) converts normally.
        for name in _QUANT_BUFFERS:
            buf = self._buffers.get(name)
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        for name, param in self._parameters.items():
            if param is not None:
                with torch.no_grad():
                    new = fn(param)
                self._parameters[name] = nn.Parameter(new, requires_grad=param.requires_grad)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, tensor in to_bnb_state_dict(self.qweight, prefix + "weight").items():
            destination[key] = tensor if keep_vars else tensor.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key = prefix + "weight"
        ours = [k for k in state_dict if k == weight_key or k.startswith(weight_key + ".")]
        if find_quant_state_key(state_dict, weight_key) is None:
            if weight_key in state_dict:
                error_msgs.append(
                    f"{weight_key}: found a weight but no bitsandbytes quant state "
                    f"({weight_key}.quant_state.bitsandbytes__nf4); a dense checkpoint must be "
                    "quantized first (nibblora.quantize or NF4Linear.from_linear)"
                )
            else:
                missing_keys.append(weight_key)
        else:
            try:
                q = from_bnb_state_dict({k: state_dict[k] for k in ours}, weight_key)
            except (KeyError, ValueError) as err:
                error_msgs.append(f"loading {weight_key}: {err}")
            else:
                if tuple(q.shape) != (self.out_features, self.in_features):
                    error_msgs.append(
                        f"{weight_key}: checkpoint weight has shape {list(q.shape)}, this layer is "
                        f"[{self.out_features}, {self.in_features}]"
                    )
                else:
                    self._set_quantized(q.to(self.weight.device))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            else:
                missing_keys.append(bias_key)
        elif strict and bias_key in state_dict:
            unexpected_keys.append(bias_key)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{dq}, compute_dtype={dtype_name(self.compute_dtype)}"
        )


def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be bfloat16, float16 or float32 (float64 for tests), got {dtype}")


class LoRAAdapter(nn.Module):
    """One adapter: lora_A [r, in], lora_B [out, r] (zero at init), its scaling and its dropout probability."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.rslora, self.dropout = r, alpha, rslora, dropout
        self.scaling = lora_scaling(r, alpha, rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        with torch.no_grad():
            if init == "kaiming":
                # peft's default: what nn.Linear does to its weight.
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / r)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, rslora={self.rslora}"


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))) over a frozen base: nn.Linear, NF4Linear or transformers' Conv1D.

    Adapters live in `self.adapters` (an nn.ModuleDict keyed by adapter name); `active_adapter` picks the one used
    (None: base only). With `merged`, the active adapter has been folded into a dense base weight.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        train_bias: bool = False,
        adapter_name: str = "default",
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = _base_shape(base)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        bias = getattr(base, "bias", None)
        if train_bias:
            if bias is None:
                raise ValueError("train_bias=True but the base layer has no bias; build it with bias=True")
            bias.requires_grad_(True)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged = False
        self.add_adapter(adapter_name, r, alpha, dropout, rslora, init, adapter_dtype)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype = torch.float32,
    ) -> LoRAAdapter:
        """Add an adapter and make it active."""
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}; pick another name")
        device = _base_device(self.base)
        adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, rslora, init, dtype, device)
        self.adapters[name] = adapter
        self.set_adapter(name)
        return adapter

    def set_adapter(self, name: str | None) -> None:
        """Route forward through adapter `name` (None: the base alone)."""
        if self.merged:
            raise RuntimeError("unmerge() before switching adapters: the active adapter is folded into the base")
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; this layer has {sorted(self.adapters)}")
        self.active_adapter = name

    @property
    def adapter(self) -> LoRAAdapter | None:
        return None if self.active_adapter is None else self.adapters[self.active_adapter]

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.base, NF4Linear)

    def _base_weight(self) -> tuple[torch.Tensor, QuantState | None]:
        """(weight as the function wants it: [out, in] dense or packed codes, quant state or None)."""
        if isinstance(self.base, NF4Linear):
            return self.base.weight, self.base.quant_state
        weight = self.base.weight
        return (weight.t() if self.fan_in_fan_out else weight), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = None if self.merged else self.adapter
        weight, state = self._base_weight()
        bias = getattr(self.base, "bias", None)
        compute_dtype = self.base.compute_dtype if state is not None else weight.dtype
        if weight.requires_grad:
            return self._compose(x, adapter)  # an unfrozen base needs its own grad: plain autograd
        p = adapter.dropout if adapter is not None and self.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else 0
        y = LoRALinearFunction.apply(
            x.to(compute_dtype),
            weight,
            state,
            bias,
            None if adapter is None else adapter.lora_A,
            None if adapter is None else adapter.lora_B,
            1.0 if adapter is None else adapter.scaling,
            p,
            seed,
        )
        return y.to(x.dtype)

    def _compose(self, x: torch.Tensor, adapter: LoRAAdapter | None) -> torch.Tensor:
        """The same output through plain modules (reference path; also used when the base is trainable)."""
        y = self.base(x)
        if adapter is None:
            return y
        xd = nn.functional.dropout(x, adapter.dropout, self.training)
        lora = nn.functional.linear(nn.functional.linear(xd.to(adapter.lora_A.dtype), adapter.lora_A), adapter.lora_B)
        return y + (lora * adapter.scaling).to(y.dtype)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """scaling * B @ A, float32 [out, in], for adapter `name` (default: the active one)."""
        name = name or self.active_adapter
        if name is None:
            raise ValueError("no active adapter: pass an adapter name")
        a = self.adapters[name]
        return (a.lora_B.detach().float() @ a.lora_A.detach().float()) * a.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the dense base weight (forward then skips the LoRA path)."""
        if self.merged:
            raise RuntimeError("this layer is already merged; unmerge() first")
        if self.is_quantized:
            raise TypeError(
                "cannot merge into a 4-bit base in place (re-quantizing would lose the adapter); "
                "merge into the dense checkpoint with nibblora.merge instead"
            )
        if self.active_adapter is None:
            raise ValueError("no active adapter to merge: call set_adapter(name) first")
        self._add_to_weight(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): subtract the folded adapter from the base weight."""
        if not self.merged:
            raise RuntimeError("this layer is not merged; nothing to unmerge")
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.base.weight
        delta = delta.t() if self.fan_in_fan_out else delta
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, active_adapter={self.active_adapter!r}"
        )


def _base_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported base layer."""
    if isinstance(base, (nn.Linear, NF4Linear)):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        # transformers' Conv1D (GPT-2) stores its weight as [in, out]: peft's fan_in_fan_out.
        in_features, out_features = base.weight.shape
        return in_features, out_features, True
    raise TypeError(f"LoRALinear wraps nn.Linear, NF4Linear or transformers' Conv1D, not {type(base).__name__}")


def _base_device(base: nn.Module) -> torch.device:
    for t in base.parameters():
        return t.device
    for t in base.buffers():
        return t.device
    return torch.device("cpu")
