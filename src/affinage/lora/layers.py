"""LoRA layers.

:class:`LoRALinear` is the wrapper injected into transformers models (loralib's own layers,
for models people build themselves, are in ``loralib_layers``; the embedding wrapper is in
``embedding``): it keeps the original (possibly quantized) layer untouched as ``base_layer``,
names its parameters like PEFT (``lora_A.weight``/``lora_B.weight``/``lora_magnitude_vector``)
and merges only when asked (:meth:`LoRALinear.fuse`).

The update is ``scaling * B(A(dropout(x)))`` with ``scaling = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA): ``B @ A`` is never materialised per token, which keeps it O(r) per token. DoRA
(``use_dora``) adds PEFT's magnitude vector (see ``dora``); PiSSA (``init="pissa"``) starts A
and B from the top-r singular vectors of W and leaves the residual as the base weight.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from affinage.errors import ConfigError
from affinage.lora import dora
from affinage.lora.fused import (
    add_rank_up,
    compute_dtype,
    dropout_mask,
    keep_scale,
    masked_projection,
)
from affinage.lora.fused_linear import lora_linears, plain_base
from affinage.lora.loralib_layers import LoRALayer
from affinage.lora.shared_input import InputGroup

INITS = ("default", "gaussian", "pissa")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class SharedDropout(nn.Module):
    """Dropout whose mask is shared by the LoRA layers that read the same input tensor.

    q/k/v read the same normed hidden state, and so do gate/up: PEFT draws and keeps three (and
    two) dropped copies of it per block. Drawing one mask per input tensor, recognised by
    identity, does 4 draws per block instead of 7 and keeps 4 masks (as bits) for backward.
    Each LoRA branch still sees inverted dropout with rate ``p``; only the masks are correlated.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The keep-mask for ``x``: drawn once per input tensor, then reused."""
        if self._last is not None and self._last[0]() is x:
            return self._last[1]
        keep = dropout_mask(x, self.p)
        # The tensor is referenced weakly: a step's activations are never kept alive by the cache
        # (the mask itself is 1 byte per element and replaced by the next input).
        self._last = (weakref.ref(x), keep)
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * self.mask(x) * keep_scale(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared"


def share_dropout(model: nn.Module) -> int:
    """One :class:`SharedDropout` per dropout rate for every injected LoRA layer; returns how many share it."""
    shared: dict[float, SharedDropout] = {}
    count = 0
    for module in model.modules():
        if isinstance(module, LoRALinear) and isinstance(module.lora_dropout, nn.Dropout) and module.lora_dropout.p > 0:
            p = module.lora_dropout.p
            module.lora_dropout = shared.setdefault(p, SharedDropout(p))
            count += 1
    return count


class WrapsBase:
    """What a LoRA wrapper exposes of the layer it wraps, and whether it is DoRA."""

    base_layer: nn.Module
    lora_magnitude_vector: nn.Parameter | None

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (what code asking a head or projection for ``.weight`` expects)."""
        return self.base_layer.weight


class LoRALinear(WrapsBase, nn.Module):
    """A LoRA update wrapped around an existing linear layer (injected into HF models)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
    ):
        super().__init__()
        if init not in INITS:
            raise ConfigError(
                f"unknown LoRA init {init!r}", where="adapter.init", fix=f"use one of: {', '.join(INITS)}"
            )
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.init = init
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        # The factors are trained in fp32 whatever the base dtype: optimizer state needs the range.
        device = _weight_device(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        # PiSSA's initial factors (A0, B0): saving turns the adapter into a plain LoRA on the original base.
        self.register_buffer("pissa_A0", None, persistent=False)
        self.register_buffer("pissa_B0", None, persistent=False)
        self.reset_lora_parameters()
        self.register_parameter("lora_magnitude_vector", None)
        if use_dora:
            weight = dora.dense_weight(base_layer, "DoRA (adapter.use_dora)")
            self.lora_magnitude_vector = nn.Parameter(dora.weight_norm(weight, self.delta_weight(), dim=1))
        self.merged = False
        self.input_group: InputGroup | None = None  # layers reading the same tensor (see ``shared_input``)

    @classmethod
    def from_base(cls, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, **options) -> LoRALinear:
        return cls(base_layer, r=r, alpha=alpha, dropout=dropout, **options)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def reset_lora_parameters(self) -> None:
        if self.init == "pissa":
            self._pissa_init()
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)  # PEFT's init_lora_weights="gaussian"
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _pissa_init(self) -> None:
        """A, B from the top-r SVD of W (scaled so that s·B·A is that part); W becomes the residual."""
        weight = dora.dense_weight(self.base_layer, "PiSSA (adapter.init: pissa)")
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = torch.sqrt(s[: self.r] / self.scaling)
            a = root[:, None] * vh[: self.r]
            b = u[:, : self.r] * root[None, :]
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            residual = weight.float() - self.scaling * (b @ a)
        # A new parameter, not an in-place edit: a weight tied elsewhere (lm_head/embed_tokens) keeps its value.
        self.base_layer.weight = nn.Parameter(residual.to(weight.dtype), requires_grad=weight.requires_grad)
        self.pissa_A0, self.pissa_B0 = a.clone(), b.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.lora_magnitude_vector is not None:
            return self._dora_forward(x)
        # Plain LoRA: the fused update (see ``fused`` and ``fused_linear``).
        group, p = self.input_group, self._dropout_rate()
        if group is not None:  # the layers reading x share one node (or, with other bases, one A product)
            result = group.output(self, x, p)
            if result is None:
                result = self._separate(x, group.hidden(self, x, p))
        elif plain_base(self, x):
            result = lora_linears(x, [self], *self._keep_mask(x))[0]
        else:
            result = self._separate(x, masked_projection(x, self.lora_A.weight, *self._keep_mask(x)))
        return result.view(*x.shape[:-1], result.shape[-1])

    def _separate(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The base layer called on rows (2-D, so B's product accumulates into its output), plus ``B(hidden)``."""
        rows = x.reshape(-1, x.shape[-1])
        return add_rank_up(
            self.base_layer(rows), hidden.reshape(-1, hidden.shape[-1]), self.lora_B.weight, self.scaling
        )

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        compute = compute_dtype(x, self.lora_A.weight)
        dropped = self.lora_dropout(x)
        hidden = F.linear(dropped.to(compute), self.lora_A.weight.to(compute))
        update = F.linear(hidden, self.lora_B.weight.to(compute))
        return result + self._dora_extra(x, dropped, result, update, compute).to(result.dtype)

    def _dropout_rate(self) -> float:
        return getattr(self.lora_dropout, "p", 0.0) if self.training else 0.0

    def _keep_mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """The rate, and the keep-mask when dropout shares it among layers (else None: drawn where it is used)."""
        p = self._dropout_rate()
        dropout = self.lora_dropout
        return (dropout.mask(x) if p > 0 and isinstance(dropout, SharedDropout) else None), p

    def _dora_extra(
        self, x: torch.Tensor, dropped: torch.Tensor, result: torch.Tensor, update: torch.Tensor, compute: torch.dtype
    ) -> torch.Tensor:
        """``(m/‖W+sBA‖ − 1)·W·x + (m/‖W+sBA‖)·s·B(A(x))``, the norm a constant (PEFT)."""
        weight = self.base_layer.weight
        scale = dora.magnitude_scale(self.lora_magnitude_vector, weight, self.delta_weight().detach(), dim=1).to(
            compute
        )
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result if self.bias is None else result - self.bias
        else:  # with dropout the base term sees the same dropped input as the update (PEFT)
            base = F.linear(dropped, weight)
        return (scale - 1) * base.to(compute) + scale * update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def fuse(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight (base must be dense)."""
        base = self.base_layer
        if not isinstance(base, nn.Linear) or type(base) is not nn.Linear:
            raise TypeError(f"cannot fuse into {type(base).__name__}; dequantize the base first")
        fused = nn.Linear(
            self.in_features,
            self.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            delta = self.delta_weight().float()
            weight = base.weight.float() + delta
            if self.lora_magnitude_vector is not None:  # W' = m/‖W+sBA‖ ⊙ (W+sBA), row by row
                weight = (
                    weight
                    * dora.magnitude_scale(self.lora_magnitude_vector.float(), base.weight, delta, dim=1)[:, None]
                )
            fused.weight.copy_(weight.to(base.weight.dtype))
            if base.bias is not None:
                fused.bias.copy_(base.bias)
        return fused

    def extra_repr(self) -> str:
        options = [f"r={self.r}", f"alpha={self.alpha}"]
        options += [name for name, on in (("rslora", self.use_rslora), ("dora", self.use_dora)) if on]
        return ", ".join(options + ([f"init={self.init}"] if self.init != "default" else []))


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
