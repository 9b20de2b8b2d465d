"""LoRA on an embedding table (``target_modules: [embed_tokens]``), PEFT's layout.

:class:`LoRAEmbedding` wraps the model's ``nn.Embedding`` (or a subclass such as Gemma 3's
scaled embedding) as ``base_layer`` and adds ``lora_embedding_A`` (r × vocab, zero at init) and
``lora_embedding_B`` (dim × r, normal at init), PEFT's parameter and key names. The update is
``scaling * A[:, ids].T @ B.T``: a lookup of r numbers per token, never the vocab × dim
product; a base layer that scales its output (Gemma 3's ``embed_scale``) scales the update too.

With tied embeddings (SmolLM2, Gemma) the base weight is shared with the output head: the
wrapper never writes to it, so the head is unchanged, and :meth:`LoRAEmbedding.fuse` returns a
new table, leaving the head's weight alone (``fuse_lora`` then unties the model's config).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from affinage.lora import dora
from affinage.lora.layers import WrapsBase, lora_scaling


class LoRAEmbedding(WrapsBase, nn.Module):
    """A LoRA update wrapped around an existing embedding table."""

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
    ):
        super().__init__()
        # PEFT applies no dropout to embeddings and initialises them the same way whatever init_lora_weights says
        # (A zero, B normal): ``dropout`` and ``init`` are accepted for a uniform signature and ignored.
        self.base_layer = base_layer
        self.num_embeddings = base_layer.num_embeddings
        self.embedding_dim = base_layer.embedding_dim
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.init = "default"
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.num_embeddings, device=device, dtype=torch.float32))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=torch.float32))
        nn.init.normal_(self.lora_embedding_B)
        self.register_parameter("lora_magnitude_vector", None)
        if use_dora:  # one magnitude per embedding dimension (norms of the table's columns), as PEFT
            weight = dora.dense_weight(base_layer, "DoRA (adapter.use_dora)")
            self.lora_magnitude_vector = nn.Parameter(dora.weight_norm(weight, self.delta_weight(), dim=0))
        self.merged = False

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def delta_weight(self) -> torch.Tensor:
        """The update of the (vocab × dim) table."""
        return (self.lora_embedding_B @ self.lora_embedding_A).transpose(0, 1) * self.scaling

    def _embed_scale(self) -> torch.Tensor | None:
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        return scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, device=self.base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        rows = F.embedding(
            x,
            self.lora_embedding_A.transpose(0, 1),
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        update = (rows @ self.lora_embedding_B.transpose(0, 1)) * self.scaling
        embed_scale = self._embed_scale()
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        if self.lora_magnitude_vector is None:
            return result + update.to(result.dtype)
        scale = dora.magnitude_scale(self.lora_magnitude_vector, base.weight, self.delta_weight().detach(), dim=0)
        return (scale * result + scale * update).to(result.dtype)

    def fuse(self) -> nn.Embedding:
        """A copy of the base table's module (same class, e.g. Gemma's scaled one) with the update folded in."""
        base = self.base_layer
        with torch.no_grad():
            delta = self.delta_weight().float()
            weight = base.weight.float() + delta
            if self.lora_magnitude_vector is not None:  # one factor per column (embedding dimension)
                weight = (
                    weight
                    * dora.magnitude_scale(self.lora_magnitude_vector.float(), base.weight, delta, dim=0)[None, :]
                )
        fused = copy.deepcopy(base, memo={id(base.weight): base.weight})  # everything but the table, which is replaced
        fused.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
        return fused

    def extra_repr(self) -> str:
        options = [f"r={self.r}", f"alpha={self.alpha}"]
        return ", ".join(options + [name for name, on in (("rslora", self.use_rslora), ("dora", self.use_dora)) if on])
