"""loralib's other layers: ``Embedding``, ``MergedLinear``, ``Conv1d/2d/3d``.

Same constructor arguments, parameter names and behaviour as loralib (merge on ``eval()``,
unmerge on ``train()``), so loralib code and checkpoints work unchanged; parity is tested
against the ``loralib`` package itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from affinage.lora.layers import LoRALayer


class _MergeOnEval:
    """The merge/unmerge dance every loralib layer does, given its ``_delta()`` and target weight."""

    def _target_weight(self) -> torch.Tensor:
        return self.weight

    def _switch(self, mode: bool) -> None:
        if self.r <= 0 or not self.merge_weights:
            return
        if mode and self.merged:
            self._target_weight().data -= self._delta()
            self.merged = False
        elif not mode and not self.merged:
            self._target_weight().data += self._delta()
            self.merged = True


class Embedding(nn.Embedding, LoRALayer, _MergeOnEval):
    """``nn.Embedding`` with a low-rank update of the embedding table (A zero, B normal at init)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1, merge_weights: bool = True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0, merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).transpose(0, 1) * self.scaling

    def train(self, mode: bool = True) -> "Embedding":
        nn.Embedding.train(self, mode)
        self._switch(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.r > 0 and not self.merged:
            rows = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
            result = result + (rows @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


class MergedLinear(nn.Linear, LoRALayer, _MergeOnEval):
    """One linear layer holding several projections (q/k/v); ``enable_lora`` picks which get LoRA."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: list[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        if out_features % len(enable_lora) != 0:
            raise ValueError("out_features must be divisible by len(enable_lora)")
        self.enable_lora = list(enable_lora)
        self.fan_in_fan_out = fan_in_fan_out
        enabled = sum(self.enable_lora)
        if r > 0 and enabled:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * enabled, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features // len(self.enable_lora) * enabled, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            groups = torch.zeros((len(self.enable_lora), out_features // len(self.enable_lora)), dtype=torch.bool)
            groups[torch.tensor(self.enable_lora)] = True
            self.lora_ind = groups.view(-1)  # output rows that receive an update
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1) if self.fan_in_fan_out else weight

    def _update(self) -> torch.Tensor:
        """B_i @ A_i for each enabled projection, placed at its rows of the full weight."""
        enabled = sum(self.enable_lora)
        blocks = [b @ a for a, b in zip(self.lora_A.chunk(enabled, dim=0), self.lora_B.chunk(enabled, dim=0))]
        full = self.lora_B.new_zeros((self.out_features, self.in_features))
        full[self.lora_ind.to(full.device)] = torch.cat(blocks, dim=0)
        return full

    def _delta(self) -> torch.Tensor:
        return self._oriented(self._update()) * self.scaling

    def train(self, mode: bool = True) -> "MergedLinear":
        nn.Linear.train(self, mode)
        if hasattr(self, "lora_A"):
            self._switch(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._oriented(self.weight), bias=self.bias)
        if self.r > 0 and hasattr(self, "lora_A") and not self.merged:
            result = result + (self.lora_dropout(x) @ self._update().transpose(0, 1)) * self.scaling
        return result


class ConvLoRA(nn.Module, LoRALayer, _MergeOnEval):
    """A convolution whose kernel gets a low-rank update (loralib's ConvLoRA)."""

    def __init__(self, conv_module: type, in_channels: int, out_channels: int, kernel_size: int, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs):
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        if not isinstance(kernel_size, int):
            raise TypeError("kernel_size must be an int (loralib's convention)")
        if r > 0:
            # loralib's layout for Conv2d; generalised so Conv1d/Conv3d updates have the kernel's size
            # (loralib's own Conv1d/Conv3d fail with a shape error).
            spatial = self.conv.weight.dim() - 2
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * kernel_size, in_channels * kernel_size ** (spatial - 1))))
            self.lora_B = nn.Parameter(self.conv.weight.new_zeros((out_channels // self.conv.groups * kernel_size, r * kernel_size)))
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _target_weight(self) -> torch.Tensor:
        return self.conv.weight

    def _delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True) -> "ConvLoRA":
        nn.Module.train(self, mode)
        self._switch(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:
            return self.conv._conv_forward(x, self.conv.weight + self._delta(), self.conv.bias)
        return self.conv(x)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
