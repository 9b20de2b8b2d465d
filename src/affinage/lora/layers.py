"""LoRA layers.

:class:`LoRALinear` is the wrapper injected into transformers models (loralib's own layers,
for models people build themselves, are in ``loralib_layers``): it keeps the original
  (possibly quantized) layer untouched as ``base_layer``, names its factors like PEFT
  (``lora_A.weight``/``lora_B.weight``) and merges only when asked (:meth:`LoRALinear.fuse`).

The update is ``scaling * B(A(dropout(x)))`` with ``scaling = alpha / r``: ``B @ A`` is never
materialised on the training path, which keeps it O(r) per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from affinage.lora.loralib_layers import LoRALayer


class LoRALinear(nn.Module):
    """A LoRA update wrapped around an existing linear layer (injected into HF models)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        # The factors are trained in fp32 whatever the base dtype: optimizer state needs the range.
        device = _weight_device(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()
        self.merged = False

    @classmethod
    def from_base(cls, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        return cls(base_layer, r=r, alpha=alpha, dropout=dropout)

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        compute = self.lora_A.weight.dtype if x.dtype == torch.float32 else x.dtype
        hidden = F.linear(self.lora_dropout(x).to(compute), self.lora_A.weight.to(compute))
        update = F.linear(hidden, self.lora_B.weight.to(compute))
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def fuse(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight (base must be dense)."""
        base = self.base_layer
        if not isinstance(base, nn.Linear) or type(base) is not nn.Linear:
            raise TypeError(f"cannot fuse into {type(base).__name__}; dequantize the base first")
        fused = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_((base.weight.float() + self.delta_weight().float()).to(base.weight.dtype))
            if base.bias is not None:
                fused.bias.copy_(base.bias)
        return fused

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _weight_device(layer: nn.Module) -> torch.device:
    weight = getattr(layer, "weight", None)
    return weight.device if weight is not None else torch.device("cpu")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but the LoRA factors (and biases, per loralib's ``bias`` option)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name
    if bias == "none":
        return
    if bias == "all":
        for name, parameter in model.named_parameters():
            if "bias" in name:
                parameter.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, (LoRALayer, LoRALinear)) and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True
    else:
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """Only the LoRA parameters (and biases per ``bias``): a checkpoint of a few MB."""
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    if bias == "lora_only":
        out = {}
        for key, value in state.items():
            if "lora_" in key:
                out[key] = value
                bias_key = key.split("lora_")[0] + "bias"
                if bias_key in state:
                    out[bias_key] = state[bias_key]
        return out
    raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
