"""loralib's layers: ``Linear``, ``Embedding``, ``MergedLinear``, ``Conv1d/2d/3d``.

For models people build themselves (seed 004): each *is* the torch layer it replaces, with
``lora_A``/``lora_B`` parameters, and folds its update into the weight on ``eval()`` when
``merge_weights=True`` (zero inference overhead), taking it out again on ``train()``.

Same constructor arguments, parameter names and behaviour as loralib (merge on ``eval()``,
unmerge on ``train()``), so loralib code and checkpoints work unchanged; parity is tested
against the ``loralib`` package itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALayer:
    """loralib's mixin: the hyper-parameters every LoRA layer shares."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool):
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights


class _MergeOnEval:
    """What every loralib layer shares: factor initialisation and merge/unmerge on mode switch."""

    def _reset_factors(self) -> None:
        # A random, B zero: the layer starts exactly equal to the layer it replaces.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _target_weight(self) -> torch.Tensor:
        return self.weight

    def _switch(self, mode: bool) -> None:
        if self.r <= 0 or not self.merge_weights:
            return
        if mode and self.merged:  # back to training: take the update out again
            self._target_weight().data -= self._delta()
            self.merged = False
        elif not mode and not self.merged:  # inference: fold the update in
            self._target_weight().data += self._delta()
            self.merged = True


class Linear(nn.Linear, LoRALayer, _MergeOnEval):
    """``nn.Linear`` with a low-rank update (loralib.Linear, same arguments and behaviour)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        shapes = self._factor_shapes() if r > 0 else None
        if shapes:
            self.lora_A = nn.Parameter(self.weight.new_zeros(shapes[0]))
            self.lora_B = nn.Parameter(self.weight.new_zeros(shapes[1]))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def _factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        return (self.r, self.in_features), (self.out_features, self.r)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            self._reset_factors()

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1) if self.fan_in_fan_out else weight

    def _update(self) -> torch.Tensor:
        """The (out, in) weight update before scaling."""
        return self.lora_B @ self.lora_A

    def _lora_output(self, x: torch.Tensor) -> torch.Tensor:
        # x @ A^T @ B^T: B @ A is never formed on the training path
        return self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)

    def _delta(self) -> torch.Tensor:
        return self._oriented(self._update()) * self.scaling

    def train(self, mode: bool = True) -> Linear:
        nn.Linear.train(self, mode)
        if hasattr(self, "lora_A"):
            self._switch(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._oriented(self.weight), bias=self.bias)
        if hasattr(self, "lora_A") and not self.merged:
            result = result + self._lora_output(x) * self.scaling
        return result


class Embedding(nn.Embedding, LoRALayer, _MergeOnEval):
    """``nn.Embedding`` with a low-rank update of the embedding table (A zero, B normal at init)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        **kwargs,
    ):
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

    def train(self, mode: bool = True) -> Embedding:
        nn.Embedding.train(self, mode)
        self._switch(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.r > 0 and not self.merged:
            rows = F.embedding(
                x,
                self.lora_A.transpose(0, 1),
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
            result = result + (rows @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


class MergedLinear(Linear):
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
        if out_features % len(enable_lora) != 0:
            raise ValueError("out_features must be divisible by len(enable_lora)")
        self._enable_lora = list(enable_lora)  # read by _factor_shapes during Linear.__init__
        super().__init__(
            in_features,
            out_features,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            fan_in_fan_out=fan_in_fan_out,
            merge_weights=merge_weights,
            **kwargs,
        )
        self.enable_lora = self._enable_lora
        if hasattr(self, "lora_A"):
            groups = torch.zeros((len(self.enable_lora), out_features // len(self.enable_lora)), dtype=torch.bool)
            groups[torch.tensor(self.enable_lora)] = True
            self.lora_ind = groups.view(-1)  # output rows that receive an update

    def _factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        enabled = sum(self._enable_lora)
        if not enabled:
            return None
        return (self.r * enabled, self.in_features), (self.out_features // len(self._enable_lora) * enabled, self.r)

    def _update(self) -> torch.Tensor:
        """B_i @ A_i for each enabled projection, placed at its rows of the full weight."""
        enabled = sum(self.enable_lora)
        blocks = [b @ a for a, b in zip(self.lora_A.chunk(enabled, dim=0), self.lora_B.chunk(enabled, dim=0))]
        full = self.lora_B.new_zeros((self.out_features, self.in_features))
        full[self.lora_ind.to(full.device)] = torch.cat(blocks, dim=0)
        return full

    def _lora_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout(x) @ self._update().transpose(0, 1)


class ConvLoRA(nn.Module, LoRALayer, _MergeOnEval):
    """A convolution whose kernel gets a low-rank update (loralib's ConvLoRA)."""

    def __init__(
        self,
        conv_module: type,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        if not isinstance(kernel_size, int):
            raise TypeError("kernel_size must be an int (loralib's convention)")
        if r > 0:
            # loralib's layout for Conv2d; generalised so Conv1d/Conv3d updates have the kernel's size
            # (loralib's own Conv1d/Conv3d fail with a shape error).
            spatial = self.conv.weight.dim() - 2
            self.lora_A = nn.Parameter(
                self.conv.weight.new_zeros((r * kernel_size, in_channels * kernel_size ** (spatial - 1)))
            )
            self.lora_B = nn.Parameter(
                self.conv.weight.new_zeros((out_channels // self.conv.groups * kernel_size, r * kernel_size))
            )
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            self._reset_factors()

    def _target_weight(self) -> torch.Tensor:
        return self.conv.weight

    def _delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True) -> ConvLoRA:
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
