"""Everything a killed run needs to go on exactly where it stopped, as one dict in one file.

Like nanoGPT's checkpoint: the step, the position in the batch stream, the counters, the best
validation so far, the adapter's factors, the optimizer's moments and the RNG states. The file
is replaced atomically, so a kill while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from affinage.atomic import write_file_atomic
from affinage.lora.peft_format import adapter_state


@dataclass
class TrainState:
    """The run's progress; ``adapter``, ``optimizer`` and the RNG fields are filled only in a snapshot."""

    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches taken from the stream: where a resumed run picks it up
    tokens: int = 0  # real (non-padding) tokens trained on
    seconds: float = 0.0  # time spent in training steps (and the one-off frozen-prefix pass)
    best_loss: float | None = None  # validation loss of the best adapter
    best_step: int | None = None
    best_score: float | None = None  # task score of the best adapter, when one is computed
    stale: int = 0  # validations since the best one: early stopping's count
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    rng: torch.Tensor | None = None  # torch's CPU generator (dropout on CPU)
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # one per GPU, when CUDA is in use

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as one plain dict of tensors and numbers (loadable with ``weights_only``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], accumulation: int = 1) -> TrainState:
        """``accumulation`` places checkpoints written before ``batches`` was saved (step x accumulation)."""
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{key: value for key, value in data.items() if key in known})
        if "batches" not in data:
            state.batches = state.step * accumulation
        return state

    def save(self, path: Path) -> None:
        """Write atomically: temp file beside ``path``, then ``os.replace``."""
        write_file_atomic(Path(path), lambda tmp: torch.save(self.to_dict(), tmp))

    @classmethod
    def load(cls, path: Path, accumulation: int = 1) -> TrainState:
        data = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        return cls.from_dict(data, accumulation)

    def snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """This state with the live adapter, optimizer and RNG states captured: what a checkpoint holds."""
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return dataclasses.replace(
            self,
            adapter=adapter_state(model),
            optimizer=optimizer.state_dict(),
            rng=torch.get_rng_state(),
            cuda_rng=cuda_rng,
        )

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the saved adapter, optimizer and RNG states back into the live objects, then drop them here."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in self.adapter.items():
                params[key.removeprefix("base_model.model.")].copy_(tensor)
        if self.optimizer:
            optimizer.load_state_dict(self.optimizer)
        if self.rng is not None:
            torch.set_rng_state(self.rng)
        if self.cuda_rng and torch.cuda.is_available() and len(self.cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(self.cuda_rng)
        self.adapter, self.optimizer, self.rng, self.cuda_rng = {}, {}, None, []

    def record_validation(self, step: int, loss: float, score: float | None, *, by_score: bool) -> bool:
        """Count one validation; whether it beats the best so far (highest score, else lowest loss)."""
        if by_score:
            improved = self.best_score is None or (score is not None and score > self.best_score)
        else:
            improved = self.best_loss is None or loss < self.best_loss
        if improved:
            self.best_loss, self.best_step, self.best_score, self.stale = loss, step, score, 0
        else:
            self.stale += 1
        return improved
