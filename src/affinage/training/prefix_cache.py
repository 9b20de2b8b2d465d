"""Run the frozen lower blocks once, not once per epoch.

When LoRA adapts only the upper blocks (``adapter.layers_to_transform``), the blocks below the
first adapted one are frozen: for a given example their output never changes during training.
We compute it once per example, keep it, and in every later forward pass the lower blocks are
swapped for stubs that hand that output to the first adapted block. Every epoch then costs only
the upper blocks' forward and backward.

The outputs are computed as batches first need them, a window of upcoming rows at a time
(:class:`PrefixStates`): the first step comes after one window's pass, not the whole data set's,
and a run stopped early (``max_steps``, early stopping, a benchmark's probe) never pays for rows it
did not reach, nor for a validation split it never scored.

With right padding and causal attention the hidden states of real tokens do not depend on the
padding, so a cached example can be re-batched with any neighbours. Nothing here names an
architecture: the decoder's ``layers`` list is all it needs (Llama, Gemma 3, Qwen, Mistral...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from affinage.data.batching import collate
from affinage.data.template import Encoded
from affinage.runtime import machine_memory_bytes
from affinage.training.loop import training_forms

# The prefix pass keeps no activations (no gradient): a forward's memory is transient, so it runs
# fuller forwards than training's. Batches of the trainer's batch size (4 on the email router) ran
# ~400 small forwards, whose fixed cost per call dominated on CPU.
PREFIX_TOKENS_PER_FORWARD = 4096
# Rows computed at a time, in tokens: four full forwards. 1,450 of the router's emails took
# 23-26 s in windows of 16k tokens, 25 s in 32k, 27.5 s all at once and 29-30 s in 8k (whose
# groups of similar lengths are fewer and more padded).
PREFIX_TOKENS_AHEAD = 4 * PREFIX_TOKENS_PER_FORWARD


class _Inject(nn.Module):
    """Stands in for the first frozen block: returns the cached output of the last one."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _Pass(nn.Module):
    """Stands in for the other frozen blocks."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def frozen_boundary(model: nn.Module) -> int | None:
    """Index of the first block with trainable parameters, if everything below it is frozen."""
    layers = decoder_layers(model)
    if layers is None:
        return None
    boundary = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), None)
    if not boundary:
        return None
    if any(p.requires_grad for p in model.get_input_embeddings().parameters()):
        return None  # the embeddings train: nothing below the blocks is constant
    return boundary


def length_groups(lengths: Sequence[int], tokens: int) -> list[list[int]]:
    """Indices by ascending length, in groups whose padded size (rows × the longest) stays within ``tokens``
    (a longer row alone)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[index] <= tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


class FrozenPrefix:
    def __init__(self, model: nn.Module, boundary: int):
        self.model = model
        self.boundary = boundary
        self.layers = decoder_layers(model)

    @torch.no_grad()
    def compute(
        self,
        data: Sequence[Encoded],
        pad_id: int,
        device: torch.device,
        tokens: int = PREFIX_TOKENS_PER_FORWARD,
        multiple: int = 1,
    ) -> list[torch.Tensor]:
        """Output of the last frozen block for every example (unpadded). Rows are grouped by
        :func:`length_groups` within ``tokens`` (rows × the longest row), then each group's width is rounded
        up to ``multiple`` (``collate``): a forward may hold up to ``multiple - 1`` more tokens a row."""
        captured: dict[str, torch.Tensor] = {}

        def grab(module, args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _Stop  # the upper blocks are not needed here

        handle = self.layers[self.boundary - 1].register_forward_hook(grab)
        cache: list[torch.Tensor] = [torch.empty(0)] * len(data)
        try:
            # The training forms, as the uncached forward of a step runs them; each form leaves alone what a
            # caller (the loop, when the pass runs inside a step) has already switched.
            with self._frozen_in_eval(), training_forms(self.model):
                for chunk in length_groups([len(e.input_ids) for e in data], tokens):
                    batch = collate([data[i] for i in chunk], pad_id, multiple=multiple)
                    try:
                        self.model.get_decoder()(
                            input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device),
                            use_cache=False,
                        )
                    except _Stop:
                        pass
                    for row, index in enumerate(chunk):
                        cache[index] = captured["hidden"][row, : len(data[index].input_ids)].clone()
        finally:
            handle.remove()
        return cache

    @contextmanager
    def _frozen_in_eval(self) -> Iterator[None]:
        """Everything but the trained blocks in eval mode (no dropout) for the pass, flags restored after.

        The flags are set, not ``eval()`` called: the pass may run mid-training, where a loralib layer's
        ``eval()`` would merge its factors into the base weight (and ``train()`` subtract them, rounding)."""
        upper = {id(m) for layer in self.layers[self.boundary :] for m in layer.modules()}
        lower = [m for m in self.model.modules() if id(m) not in upper]
        modes = [m.training for m in lower]
        for module in lower:
            module.training = False
        try:
            yield
        finally:
            for module, mode in zip(lower, modes):
                module.training = mode

    @contextmanager
    def injected(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward pass starts at the first trainable block with ``hidden``."""
        originals = [self.layers[i] for i in range(self.boundary)]
        self.layers[0] = _Inject(hidden)
        for i in range(1, self.boundary):
            self.layers[i] = _Pass()
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def wrap(self, loss_fn: Callable, cache: PrefixStates) -> Callable:
        """A loss function that reads batch["indices"] and starts from their states in ``cache``."""

        def cached_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
            width = batch["input_ids"].shape[1]
            rows = cache.rows(batch["indices"].tolist())
            hidden = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
            for row, states in enumerate(rows):
                hidden[row, : states.shape[0]] = states
            with self.injected(hidden):
                return loss_fn(model, batch)

        return cached_loss


class PrefixStates:
    """The frozen prefix's output for each row of ``data``, computed a window at a time on first need.

    ``windows`` partition the rows (each index in one); asking for a missing row computes its whole
    window in one pass (:meth:`FrozenPrefix.compute`). The windows are fixed up front (the first
    epoch's batches in order, :func:`affinage.training.plan.prefix_windows`), so a resumed run groups
    rows exactly as the uninterrupted one did. ``seconds`` adds up the passes' time.
    """

    def __init__(
        self,
        prefix: FrozenPrefix,
        data: Sequence[Encoded],
        windows: Sequence[Sequence[int]],
        pad_id: int,
        device: torch.device,
        multiple: int = 1,
    ) -> None:
        self.prefix, self.data, self.windows = prefix, data, [list(w) for w in windows]
        self.pad_id, self.device, self.multiple = pad_id, device, multiple
        self.window_of = {index: w for w, rows in enumerate(self.windows) for index in rows}
        if sorted(self.window_of) != list(range(len(data))) or sum(map(len, self.windows)) != len(data):
            raise ValueError("prefix windows must hold every row exactly once")
        self.states: list[torch.Tensor | None] = [None] * len(data)
        self.seconds = 0.0

    def rows(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The states of ``indices``, computing the windows of those not computed yet."""
        for window in sorted({self.window_of[i] for i in indices if self.states[i] is None}):
            self._compute(self.windows[window])
        return [self.states[i] for i in indices]

    def compute_all(self) -> None:
        """Every window now: a pass whose time is paid up front (a benchmark that counts it apart)."""
        self.rows(range(len(self.data)))

    def _compute(self, window: list[int]) -> None:
        started = time.perf_counter()
        states = self.prefix.compute([self.data[i] for i in window], self.pad_id, self.device, multiple=self.multiple)
        for index, state in zip(window, states):
            self.states[index] = state
        self.seconds += time.perf_counter() - started


def cache_fits(data: Sequence[Encoded], model: nn.Module, fraction: float = 0.25) -> bool:
    """The cache may take at most ``fraction`` of the machine's memory."""
    return cache_bytes(data, model) <= fraction * machine_memory_bytes()


def cache_bytes(data: Sequence[Encoded], model: nn.Module) -> int:
    hidden = (
        model.config.get_text_config().hidden_size
        if hasattr(model.config, "get_text_config")
        else model.config.hidden_size
    )
    element = model.get_input_embeddings().weight.element_size()  # activations' dtype, even on a 4-bit base
    return sum(len(e.input_ids) for e in data) * hidden * element
